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

from .unets import TinySDConfig, build_cond_unet, build_text_encoder
from .wrapped import WrappedUNet


class AddedCondUNet(WrappedUNet):
    """``net(x, t, encoder_hidden_states, text_embeds, time_ids[, timestep_cond])`` → an SDXL UNet's output."""

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
    return build_text_encoder(cfg, tokenizer, cfg.text_width_2, cfg.projection_dim)


def build_sdxl_unet(cfg: TinySDXLConfig):
    return build_cond_unet(cfg, cross_attention_dim=cfg.text_width + cfg.text_width_2, addition_embed_type="text_time",
                           addition_time_embed_dim=cfg.addition_time_embed_dim,
                           projection_class_embeddings_input_dim=6 * cfg.addition_time_embed_dim + cfg.projection_dim)
