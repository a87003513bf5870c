"""Classifier-free guidance (Ho & Salimans 2022), in the diffusers/Imagen convention.

``guidance_scale`` s = 1 means no guidance; the guided prediction is
    D = D_u + s·(D_c − D_u),
which is the same whether written on ε or on x_0 (the map between them is affine in the model
output). LCM and w-conditioned students use Meng et al.'s / Luo et al.'s w = s − 1
(:func:`lcm_w`), kept here so the conversion lives in one place.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

Denoiser = Callable[..., Tensor]


def guide(cond_out: Tensor, uncond_out: Tensor, guidance_scale: float | Tensor) -> Tensor:
    """D_u + s·(D_c − D_u); ``guidance_scale`` may be a per-sample tensor broadcast over dims."""
    if torch.is_tensor(guidance_scale) and guidance_scale.ndim == 1:
        guidance_scale = guidance_scale.reshape(-1, *([1] * (cond_out.ndim - 1)))
    return uncond_out + guidance_scale * (cond_out - uncond_out)


def lcm_w(guidance_scale: float | Tensor) -> float | Tensor:
    """LCM's / Meng et al.'s guidance weight w = s − 1 (Luo et al. 2023 eq. 10 writes ε_u + (1+w)(ε_c − ε_u))."""
    return guidance_scale - 1


def guidance_scale_embedding(w: Tensor, embedding_dim: int = 256) -> Tensor:
    """Sinusoidal features of w (diffusers' ``LatentConsistencyModelPipeline.get_guidance_scale_embedding``,
    after VDM's ``get_timestep_embedding``; w is scaled by 1000). Tested equal to diffusers'."""
    w = w.float() * 1000.0
    half = embedding_dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freqs[None, :]
    emb = torch.cat([emb.sin(), emb.cos()], dim=1)
    return nn.functional.pad(emb, (0, 1)) if embedding_dim % 2 else emb


def check_guidance_scale(guidance_scale: float) -> float:
    """Reject what no sampler can serve, with a message a user can act on."""
    if not guidance_scale >= 0:  # also catches NaN
        raise ValueError(f"guidance scale must be >= 0 (1.0 = no guidance), got {guidance_scale}")
    return float(guidance_scale)


class CFGDenoiser:
    """Wrap a denoiser so each call runs the conditional and unconditional passes as one batch.

    ``uncond`` holds the conditioning of the unconditional branch (e.g. the null class label or
    the empty prompt's embedding) with the same batch size as the conditional inputs.
    ``guidance_scale`` is a number, or one per sample (a ``[batch]`` tensor, as a w-conditioned
    student's distillation draws them). With a number equal to 1 only the conditional pass runs.
    """

    def __init__(self, denoiser: Denoiser, guidance_scale: float | Tensor, uncond: dict[str, Tensor]) -> None:
        self.denoiser = denoiser
        self.guidance_scale = guidance_scale if torch.is_tensor(guidance_scale) else check_guidance_scale(guidance_scale)
        self.uncond = uncond

    @property
    def passes(self) -> int:
        """Network evaluations per call: 2 with guidance, 1 without."""
        return 1 if not torch.is_tensor(self.guidance_scale) and self.guidance_scale == 1 else 2

    def __call__(self, x: Tensor, sigma: Tensor, **cond: Tensor) -> Tensor:
        if self.passes == 1:
            return self.denoiser(x, sigma, **cond)
        both = {k: torch.cat([v, self.uncond[k]]) for k, v in cond.items()}
        d_cond, d_uncond = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **both).chunk(2)
        return guide(d_cond, d_uncond, self.guidance_scale)


def label_cfg(denoiser: Denoiser, null_label: int):
    """cond → classifier-free guidance against the null class at each sample's own scale: the teacher a
    w-conditioned student learns (``cond`` holds ``class_labels`` and ``guidance_scale``)."""
    def teacher(cond: dict[str, Tensor]) -> tuple[CFGDenoiser, dict]:
        y = cond["class_labels"]
        return CFGDenoiser(denoiser, cond["guidance_scale"], {"class_labels": torch.full_like(y, null_label)}), {"class_labels": y}
    return teacher


def prompt_cfg(denoiser: Denoiser, uncond_embedding: Tensor):
    """cond → classifier-free guidance against the empty prompt at each sample's own scale,
    ε_u + s·(ε_c − ε_u), both passes in one batch: the teacher of LCD and of latent guided distillation,
    and a text-to-image sampler's model (``cond`` holds ``encoder_hidden_states`` and ``guidance_scale``)."""
    def teacher(cond: dict[str, Tensor]) -> tuple[CFGDenoiser, dict]:
        c = cond["encoder_hidden_states"]
        uncond = {"encoder_hidden_states": uncond_embedding.to(c).expand_as(c)}
        return CFGDenoiser(denoiser, cond["guidance_scale"], uncond), {"encoder_hidden_states": c}
    return teacher
