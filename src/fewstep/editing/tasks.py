"""``fewstep edit``'s tasks by name: each returns the rows of its picture (the reference, what the model is
given, the result). Zero-shot tasks run Algorithm 4 (:mod:`fewstep.editing.zero_shot`); img2img, and
inpainting with a diffusion model in ``steps`` sampler steps, run :func:`fewstep.sampling.generate`."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from ..errors import FewstepError
from ..models.handle import Model
from ..sampling.constrained import inpainting
from ..sampling.generate import generate
from .constraints import half_mask, luminance, superresolution
from .zero_shot import colorize, denoise, edit, interpolate, stroke, superres

TASKS = ("inpaint", "colorize", "superres", "denoise", "interpolate", "stroke", "img2img")


def run_task(model: Model, task: str, images: Tensor | None, *, known: Tensor | None = None,
             factor: int = 4, noise_sigma: float = 0.5, add_noise: bool = True, frames: int = 8,
             sigma_start: float = 1.5, pairs: int = 1, labels: Tensor | Sequence[int] | None = None,
             sigmas: Sequence[float] | None = None, guidance_scale: float | None = None,
             seed: int = 0, steps: int | None = None, strength: float = 0.5) -> list[tuple[str, Tensor]]:
    """Run one task by name; return the rows of its picture as (name, images): the reference, what
    the model is given, the result. ``interpolate`` ignores ``images`` and gives one row of frames
    per pair (``pairs``, or one per label). This is what ``fewstep edit`` draws."""
    opts: dict[str, Any] = dict(labels=labels, guidance_scale=guidance_scale, seed=seed)
    if task == "interpolate":
        n = len(labels) if labels is not None and len(labels) > 1 else pairs
        g = torch.Generator().manual_seed(seed)
        shape = (n, model.config.channels, model.config.image_size, model.config.image_size)
        z0, z1 = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        out = interpolate(model, z0, z1, frames, sigmas=sigmas, **opts)
        return [(f"pair {i}", row) for i, row in enumerate(out)]
    if images is None:
        raise FewstepError(f"task {task} needs input images")
    if task == "img2img":  # SDEdit in N sampler steps on the model's own grid
        return [("input", images), (f"strength {strength:g}", generate(
            model, labels, steps=steps, guidance_scale=guidance_scale, seed=seed, init_images=images, strength=strength))]
    if task == "inpaint" and steps is not None and model.config.kind == "diffusion":  # the same loop, N steps
        known = half_mask(images.shape[-1], "bottom") if known is None else known
        return [("reference", images), ("known part", inpainting(known).degrade(images)),
                (f"inpainted, {steps} steps", generate(model, labels, steps=steps, guidance_scale=guidance_scale,
                                                       seed=seed, init_images=images, mask=known))]
    if task == "inpaint":
        constraint = inpainting(half_mask(images.shape[-1], "bottom") if known is None else known)
        return [("reference", images), ("known part", constraint.degrade(images)),
                ("inpainted", edit(model, images, sigmas, constraint, **opts))]
    if task == "colorize":
        return [("reference", images), ("luminance", luminance(images).expand_as(images)),
                ("colorized", colorize(model, images, sigmas=sigmas, **opts))]
    if task == "superres":
        return [("reference", images), (f"{factor}x{factor} means", superresolution(factor).degrade(images)),
                ("super-resolved", superres(model, images, factor, sigmas=sigmas, **opts))]
    if task == "denoise":
        if noise_sigma <= 0:
            raise FewstepError(f"the noise level must be positive, got {noise_sigma}")
        noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
        noisy = images + noise_sigma * noise if add_noise else images
        return [("reference", images), (f"noisy, sd {noise_sigma:g}", noisy),
                ("denoised", denoise(model, noisy, noise_sigma, refine=sigmas or (), **opts))]
    if task == "stroke":
        return [("strokes", images), (f"edited from {sigma_start:g}", stroke(model, images, sigma_start, sigmas=sigmas,
                                                                          **opts))]
    raise FewstepError(f"unknown editing task {task!r}; choose one of {', '.join(TASKS)}")
