"""Tiny models and data shared by the tests (seconds on a CPU)."""

import torch
from diffusers import UNet2DModel

from fewstep.denoisers import EDMDenoiser
from fewstep.objectives import DenoisingLoss
from fewstep.schedules import EDMSchedule


def tiny_unet(num_classes: int = 3, channels: int = 1, size: int = 8, dropout: float = 0.1) -> UNet2DModel:
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=1,
                       block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), num_class_embeds=num_classes + 1,
                       norm_num_groups=4, dropout=dropout)


def tiny_setup(model_seed: int = 0, n: int = 32):
    """(denoiser, objective, data) with dropout on, so resume must restore the RNG stream too.
    The data is always the same; ``model_seed`` sets the initial weights."""
    torch.manual_seed(model_seed)
    g = torch.Generator().manual_seed(0)
    data = {"images": torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, "labels": torch.randint(0, 3, (n,), generator=g)}
    return EDMDenoiser(tiny_unet()), DenoisingLoss(EDMSchedule(), null_label=3, label_dropout=0.2), data
