"""Sampling under a linear constraint: the one replacement loop of inpainting and zero-shot editing.

Given a reference y, an invertible linear map A and which coordinates of A·y are known, every step puts
the known coordinates of A·y into the model's x0-estimate before stepping on (Song et al. 2023,
*Consistency Models*, Algorithm 4; the replacement method of Song et al. 2021, §D):

    x0 ← A⁻¹[ A·y on the known coordinates, A·x0 elsewhere ],   x0 = f(x, σ_i) or D(x; σ_i)

then, for a consistency model, re-noise to the next level (x ← x0 + √(σ'² − σ_end²)·z, multistep
consistency sampling) and, for a diffusion model, take the DDIM step from x with that x0
(:func:`fewstep.core.solvers.ddim_step`), which keeps the model's own noise direction. The last
estimate is returned, so the known part of the output equals the reference's (up to the float error
of A⁻¹A). Inpainting is A = I (:func:`inpainting`); :mod:`fewstep.editing` adds colorization and
super-resolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..core.solvers import consistency_step, ddim_step

Transform = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Constraint:
    """The linear constraint of Algorithm 4: keep the coordinates of A·y where ``known`` is True.

    ``A`` maps images [B, C, H, W] to coefficients of any shape, ``A_inv`` maps them back, and
    ``known`` (bool, broadcast against A(x)) is the complement of the paper's mask Ω (what a user draws).
    """

    A: Transform
    A_inv: Transform
    known: Tensor

    def replace(self, x: Tensor, y: Tensor) -> Tensor:
        """A⁻¹[(A·y) on the known coordinates, (A·x) elsewhere] (Algorithm 4, lines 5 and 9)."""
        known = self.known.to(x.device)
        return self.A_inv(torch.where(known, self.A(y.to(x)), self.A(x)))

    def degrade(self, y: Tensor) -> Tensor:
        """A⁻¹[(A·y) on the known coordinates, 0 elsewhere]: all the loop sees of y (line 2)."""
        return self.replace(torch.zeros_like(y), y)


def _identity(x: Tensor) -> Tensor:
    return x


def inpainting(known: Tensor) -> Constraint:
    """Inpainting: A = I, ``known`` a pixel mask (1 = keep the reference's pixel, 0 = generate),
    any shape that broadcasts against [B, C, H, W] ([H, W], [1, H, W], [B, 1, H, W], …)."""
    return Constraint(_identity, _identity, known.bool())


@torch.no_grad()
def sample_replacing(denoiser: Callable[..., Tensor], x: Tensor, sigmas: Tensor, extra: dict,
                     constraint: Constraint | None = None, y: Tensor | None = None, *, consistency: bool,
                     clip: Transform = _identity, sigma_end: float = 0.0,
                     generator: torch.Generator | None = None) -> Tensor:
    """The replacement loop (module docstring) from ``x`` at ``sigmas[0]`` down the grid ``sigmas`` (ending
    in 0). ``clip`` keeps each estimate in the data's range (pixels) before the replacement; with no
    ``constraint`` it is plain multistep consistency sampling (or DDIM) from ``x``."""
    sigmas = sigmas.to(x.device, x.dtype)
    for i in range(len(sigmas) - 1):
        x0 = clip(denoiser(x, sigmas[i].expand(len(x)), **extra))
        if constraint is not None:
            x0 = constraint.replace(x0, y)
        if not consistency:
            x = ddim_step(x, x0, sigmas[i], sigmas[i + 1])
            continue
        last = i == len(sigmas) - 2
        noise = None if last else torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        x = consistency_step(x0, sigmas[i + 1], noise, sigma_end)
    return x
