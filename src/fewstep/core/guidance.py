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

from .denoisers import append_dims

Denoiser = Callable[..., Tensor]
Cond = dict[str, Tensor]


def guide(cond_out: Tensor, uncond_out: Tensor, guidance_scale: float | Tensor) -> Tensor:
    """D_u + s·(D_c − D_u); ``guidance_scale`` may be a per-sample tensor broadcast over dims."""
    return uncond_out + append_dims(guidance_scale, cond_out.ndim) * (cond_out - uncond_out)


def sample_guidance_scales(n: int, lo: float, hi: float, device=None) -> Tensor:
    """s ~ U[lo, hi] per sample, i.e. w = s − 1 ~ U[w_min, w_max] (Meng et al. 2023 §3.1; Luo et al.
    2023 Algorithm 1): what every w-conditioned student trains on."""
    return lo + (hi - lo) * torch.rand(n, device=device)


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


def per_sample_cfg(denoiser: Denoiser, null: Callable[[Cond], Cond]):
    """cond → classifier-free guidance at each sample's own scale ``cond["guidance_scale"]`` against
    ``null(cond)`` (the null label, the empty prompt), both passes in one batch: the teacher a
    w-conditioned student learns (guided distillation, LCD)."""
    def teacher(cond: Cond) -> tuple[CFGDenoiser, Cond]:
        c = {k: v for k, v in cond.items() if k != "guidance_scale"}
        return CFGDenoiser(denoiser, cond["guidance_scale"], null(c)), c
    return teacher
