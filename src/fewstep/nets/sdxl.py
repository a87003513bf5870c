"""SDXL's networks: the UNet's added conditioning, the two text encoders' embeddings, and the tiny
SDXL-format teacher's parts (Podell et al. 2023, *SDXL*, §2.1–2.2; diffusers'
``StableDiffusionXLPipeline.encode_prompt`` and ``_get_add_time_ids``).

An SDXL UNet (``addition_embed_type="text_time"``) takes, beside the hidden states, the pooled text
embedding of the second encoder and six "time ids" (original size, crop top-left, target size) through
``added_cond_kwargs``. :class:`AddedCondUNet` takes them as flat keyword arguments instead, like every other
condition fewstep batches, so classifier-free guidance, dropout and caching treat them alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .unets import TinySDConfig


class AddedCondUNet(nn.Module):
    """``net(x, t, encoder_hidden_states, text_embeds, time_ids[, timestep_cond])`` → an SDXL UNet's output."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    @property
    def config(self):
        return self.unet.config

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def forward(self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor, text_embeds: Tensor,
                time_ids: Tensor, timestep_cond: Tensor | None = None):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, timestep_cond=timestep_cond,
                         added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids})


def takes_added_cond(unet: nn.Module) -> bool:
    return getattr(getattr(unet, "config", None), "addition_embed_type", None) == "text_time"


def sdxl_embeddings(text_encoder: nn.Module, text_encoder_2: nn.Module, ids: Tensor, ids_2: Tensor,
                    ) -> tuple[Tensor, Tensor]:
    """(the penultimate hidden states of both encoders, concatenated on the feature axis; the second
    encoder's projected pooled embedding): what SDXL's UNet is conditioned on (diffusers' ``encode_prompt``
    with ``clip_skip=None``). Gradients flow when the encoders train."""
    first = text_encoder(ids, output_hidden_states=True)
    second = text_encoder_2(ids_2, output_hidden_states=True)
    return torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1), second[0]


def time_ids(original: tuple[int, int], crop: tuple[int, int] = (0, 0), target: tuple[int, int] | None = None) -> Tensor:
    """SDXL's micro-conditioning (Podell et al. §2.2): original size, crop top-left, target size, as one row."""
    return torch.tensor([[*original, *crop, *(target or original)]], dtype=torch.float32)


@dataclass
class TinySDXLConfig(TinySDConfig):
    """The tiny SDXL-format teacher: SD's sizes plus a second, projecting text encoder and the UNet's
    pooled-text + time-id embedding."""

    text_width_2: int = 64
    projection_dim: int = 64
    addition_time_embed_dim: int = 16


def build_text_encoder_2(cfg: TinySDXLConfig, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_width_2, intermediate_size=4 * cfg.text_width_2,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_width_2 // 16,
        max_position_embeddings=cfg.max_length, projection_dim=cfg.projection_dim,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))


def build_sdxl_unet(cfg: TinySDXLConfig):
    from diffusers import UNet2DConditionModel

    n = len(cfg.unet_channels)
    return UNet2DConditionModel(
        sample_size=cfg.image_size // 2 ** (len(cfg.vae_channels) - 1), in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels, block_out_channels=cfg.unet_channels, layers_per_block=cfg.unet_layers,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=cfg.text_width + cfg.text_width_2,
        attention_head_dim=[c // cfg.head_dim for c in cfg.unet_channels], norm_num_groups=16,
        addition_embed_type="text_time", addition_time_embed_dim=cfg.addition_time_embed_dim,
        projection_class_embeddings_input_dim=6 * cfg.addition_time_embed_dim + cfg.projection_dim)
