"""ACT's discriminator (Kong et al. 2024; kong13661/ACT ``train_cifar10.py``): the down half of a
diffusers UNet with the generator's time (and class) embedding, one logit per image."""

from __future__ import annotations

import torch.nn.functional as F
from diffusers import UNet2DModel
from torch import Tensor, nn

from ..core.denoisers import edm_noise_embedding


class Discriminator(nn.Module):
    """D(x, σ[, y]) → one logit per image: conv_in, time (and class) embedding, down blocks and mid
    block of a diffusers ``UNet2DModel``, then GroupNorm-SiLU-mean-pool-linear."""

    def __init__(self, image_size: int, channels: int, num_classes: int = 0, width: int = 32) -> None:
        super().__init__()
        unet = UNet2DModel(sample_size=image_size, in_channels=channels, out_channels=channels, layers_per_block=1,
                           block_out_channels=(width, 2 * width, 2 * width),
                           down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                           num_class_embeds=num_classes + 1 if num_classes else None, norm_num_groups=8,
                           attention_head_dim=min(32, 2 * width))
        self.conv_in, self.time_proj, self.time_embedding = unet.conv_in, unet.time_proj, unet.time_embedding
        self.class_embedding = unet.class_embedding
        self.down_blocks, self.mid_block = unet.down_blocks, unet.mid_block
        self.norm = nn.GroupNorm(8, 2 * width)
        self.head = nn.Linear(2 * width, 1)

    def forward(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor:
        emb = self.time_embedding(self.time_proj(edm_noise_embedding(sigma)).to(x.dtype))
        if self.class_embedding is not None and class_labels is not None:
            emb = emb + self.class_embedding(class_labels).to(x.dtype)
        h = self.conv_in(x)
        for block in self.down_blocks:
            h, _ = block(h, emb)
        h = self.mid_block(h, emb)
        return self.head(F.silu(self.norm(h)).mean((2, 3))).squeeze(1)
