"""Editing in a few sampler steps with a (distilled) diffusion model: SDEdit image-to-image and
inpainting on the model's own N-step grid (for the guided and progressive students of Meng et al.
2023 §5, "text-guided image-to-image translation" and inpainting in 2–4 steps).

- :func:`img2img` (SDEdit, Meng et al. 2022; diffusers' ``strength``): noise the input to the level
  σ_k of the N-step grid with k = N − round(strength·N), then run the model's sampler over the rest
  of the grid — round(strength·N) network evaluations (guided students: one pass each). A progressive
  student is run on exactly the levels it was distilled for.
- :func:`inpaint` (the replacement method, Song et al. 2021 §D / Algorithm 4 of Song et al. 2023 with
  A = I, in its DDIM form): at each grid level the x0-estimate's known pixels are replaced by the
  reference before the DDIM step (:func:`fewstep.solvers.ddim_step`), so the step keeps the model's own
  noise direction and the last estimate keeps the known pixels exactly.

Conditioning is :func:`fewstep.sampling.conditioned` (classifier-free guidance for a teacher, one pass
for a w-conditioned student); without labels the null label (unconditional) is used.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .editing import _conditioned, _device, inpainting
from .errors import FewstepError
from .models import LoadedModel
from .sampling import sampler_options, sampling_grid
from .solvers import ddim_step, get_sampler


def _serving(model: LoadedModel, steps: int) -> LoadedModel:
    if model.config.serves_steps:
        from .progressive import serving_model
        return serving_model(model, steps)
    return model


def start_index(steps: int, strength: float) -> int:
    """Where SDEdit starts on an N-step grid: index N − round(strength·N) (diffusers' img2img rule)."""
    if not 0 < strength <= 1:
        raise FewstepError(f"--strength must be in (0, 1], got {strength}")
    run = round(strength * steps)
    if run < 1:
        raise FewstepError(f"strength {strength:g} of {steps} steps runs no step; raise --strength to at least "
                           f"{0.5 / steps:.2g} or use more --steps")
    return steps - run


@torch.no_grad()
def img2img(model: LoadedModel, images: Tensor, strength: float, steps: int | None = None,
            labels: Tensor | Sequence[int] | None = None, guidance_scale: float | None = None,
            sampler: str | None = None, seed: int = 0) -> Tensor:
    """SDEdit: ``images`` in [−1, 1] noised to σ_k of the ``steps``-step grid, then sampled to 0."""
    steps = steps or model.config.default_steps
    sampler = sampler or model.config.default_sampler
    model = _serving(model, steps)
    grid = sampling_grid(model, steps, sampler)[start_index(steps, strength):]
    device = _device(model)
    generator = torch.Generator().manual_seed(seed)
    x = images + grid[0] * torch.randn(images.shape, generator=generator, dtype=images.dtype)
    den, extra = _conditioned(model, labels, guidance_scale, len(images), device)
    out = get_sampler(sampler).fn(den, x.to(device), grid, extra_args=extra, generator=generator,
                                  **sampler_options(model, sampler))
    return out.clamp(-1, 1).cpu()


@torch.no_grad()
def inpaint(model: LoadedModel, images: Tensor, known: Tensor, steps: int | None = None,
            labels: Tensor | Sequence[int] | None = None, guidance_scale: float | None = None, seed: int = 0) -> Tensor:
    """Generate the pixels where ``known`` is 0 in ``steps`` DDIM steps, keeping the others exactly."""
    steps = steps or model.config.default_steps
    model = _serving(model, steps)
    grid = sampling_grid(model, steps, "ddim" if model.config.serves_steps else model.config.default_sampler)
    constraint = inpainting(known)
    device = _device(model)
    generator = torch.Generator().manual_seed(seed)
    y = images.to(device)
    x = (grid[0] * torch.randn(images.shape, generator=generator, dtype=images.dtype)).to(device)
    den, extra = _conditioned(model, labels, guidance_scale, len(images), device)
    grid = grid.to(device, x.dtype)
    for i in range(steps):
        x0 = constraint.replace(den(x, grid[i].expand(len(x)), **extra).clamp(-1, 1), y)
        x = ddim_step(x, x0, grid[i], grid[i + 1])
    return x.cpu()
