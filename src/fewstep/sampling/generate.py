"""``generate``: the one place that turns (model, labels or prompts, steps, sampler, guidance scale, seed,
optionally an init image with a strength and a mask) into images, for every kind of model; used by the
CLI, the demo, editing, evaluation and the bench.

The start is the model's prior at the grid's first level, z·σ₀ in EDM σ space and z·√(1 + σ₀²) on a VP
schedule (diffusers' initial latents), drawn before any step noise from one seeded generator, batch by
batch: the order diffusers' pipelines use, so the same seed gives the same images here and in
``LatentConsistencyModelPipeline``. Image-to-image (SDEdit, Meng et al. 2022): the init image's encoding
noised to the first level of the truncated grid (:func:`fewstep.sampling.grids.sampling_grid`).
Inpainting (a ``mask`` of known pixels): the replacement loop of :mod:`fewstep.sampling.constrained` on
the model's grid, in its own space (a latent is known where all its pixels are); the known pixels of the
result are the init image's.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..core.guidance import check_guidance_scale
from ..core.solvers import get_sampler
from ..errors import FewstepError
from ..models.folders import serving
from ..models.handle import Model
from .constrained import inpainting, sample_replacing
from .grids import sampling_grid


def guidance_or_default(model: Model, guidance_scale: float | None) -> float:
    try:
        return check_guidance_scale(model.config.default_guidance_scale if guidance_scale is None else guidance_scale)
    except ValueError as e:
        raise FewstepError(str(e)) from None


def conditions(model: Model, cond: Any, n: int | None) -> tuple[Any, int]:
    """(checked conditions, one per image, or None for unconditional; the image count). One condition is
    repeated ``n`` times; none means unconditional (the null label, the empty prompt)."""
    if cond is None:
        if not n or n < 1:
            raise FewstepError("nothing to sample: give labels or prompts, or a number of images >= 1")
        return None, n
    cond = model.conditioner.check(cond)
    if len(cond) == 0:
        raise FewstepError("nothing to sample: give at least one label or prompt")
    if n is not None and len(cond) != n:
        if len(cond) != 1:
            noun = "prompt" if model.conditioner.text else "label"
            raise FewstepError(f"give one {noun} or one per image ({n}), got {len(cond)} {noun}s")
        cond = cond.expand(n) if torch.is_tensor(cond) else cond * n
    return cond, len(cond)


def condition_batch(model: Model, cond: Any, start: int, b: int) -> tuple[dict[str, Tensor], bool]:
    """The denoiser kwargs of images start … start + b, and whether they are unconditional."""
    if cond is None:
        return model.conditioner.null(b, model.device), True
    return model.conditioner(cond[start:start + b], model.device), False


def sampler_options(model: Model, sampler: str) -> dict:
    """Model-specific keyword arguments of a sampler: multistep consistency sampling re-noises to
    √(σ'² − σ_end²) (Song et al. 2023, Algorithm 1; σ_end = σmin for an EDM-space model)."""
    return {"sigma_end": model.sigma_end} if sampler == "consistency" else {}


@torch.no_grad()
def generate(model: Model, cond: Any = None, num: int | None = None, steps: int | None = None,
             sampler: str | None = None, guidance_scale: float | None = None, seed: int = 0, batch_size: int = 256,
             init_images: Tensor | None = None, strength: float = 1.0, mask: Tensor | None = None,
             sigmas: Tensor | None = None, progress: bool = False, *, labels: Any = None,
             prompts: Sequence[str] | None = None, clamp_x0: bool = False, rho: float | None = None) -> Tensor:
    """Images in [−1, 1], [N, C, H, W], of any model (module docstring).

    ``cond`` (or ``labels=`` / ``prompts=``): class labels for a class-conditional model, prompts for a
    text-to-image one, one per image or one for ``num`` images; none: ``num`` unconditional images.
    ``steps``, ``sampler``, ``guidance_scale``: default the model's. ``init_images`` (in [−1, 1]) with
    ``strength``: img2img; with ``mask`` (1 = keep, broadcast against the images): inpainting.
    ``sigmas`` overrides the step grid. ``clamp_x0``: every x0-estimate clipped to the data range before the
    solver uses it (pixel models); ``rho``: the Karras grid's ρ (see "Heun at 2–4 steps" in BENCHMARKS.md for both).
    """
    cond = next((c for c in (cond, labels, prompts) if c is not None), None)
    if mask is not None and init_images is None:
        raise FewstepError("inpainting needs the image to fill in (init_images) beside its mask")
    cond, n = conditions(model, cond, len(init_images) if init_images is not None else num)
    steps = steps or model.config.default_steps
    model = serving(model, steps if sigmas is None else len(sigmas) - 1)
    sampler = sampler or model.config.default_sampler
    if model.config.is_lcm and sampler != "consistency":
        raise FewstepError(f"{model.path} is a latent consistency model; it samples with --sampler consistency")
    spec = get_sampler(sampler)
    guidance = guidance_or_default(model, guidance_scale)
    _warn_double_guidance(model, guidance)
    grid = sampling_grid(model, steps, sampler, strength if init_images is not None else 1.0, rho) \
        if sigmas is None else sigmas
    generator = torch.Generator().manual_seed(seed)
    out = []
    for start in tqdm(range(0, n, batch_size), disable=not progress or n <= batch_size, desc="batches", leave=False):
        b = min(batch_size, n - start)
        kwargs, unconditional = condition_batch(model, cond, start, b)
        den, extra = model.guided(kwargs, 1.0 if unconditional else guidance)
        if clamp_x0:
            den = _clipped(den, model.codec.clip)
        init = None if init_images is None else init_images[start:start + b]
        x = _start(model, grid, b, init, pure_noise=mask is not None and strength == 1, generator=generator)
        if mask is None:
            x = spec.fn(den, x, grid, extra_args=extra, generator=generator, disable=not progress,
                        **sampler_options(model, sampler))
        else:
            y = model.codec.encode(init).to(model.device)
            x = sample_replacing(den, x, grid, extra, inpainting(model.codec.mask(mask)), y, clip=model.codec.clip,
                                 consistency=model.config.kind == "consistency", sigma_end=model.sigma_end,
                                 generator=generator)
        images = model.codec.decode(x).cpu()
        out.append(images if mask is None else torch.where(mask.bool(), init, images))
    images = torch.cat(out)
    if not torch.isfinite(images).all():
        raise FewstepError(f"sampling {model.path} gave non-finite values (NaN or inf): the model's weights, a LoRA "
                           f"weight or the noise levels are broken; nothing was written")
    return images


def _clipped(denoiser, clip):
    def clipped(x: Tensor, sigma: Tensor, **cond) -> Tensor:
        return clip(denoiser(x, sigma, **cond))
    return clipped


def _warn_double_guidance(model: Model, guidance: float) -> None:
    """A consistency model distilled from a guided ODE has that guidance built in; CFG at s ≠ 1 on top of it
    applies guidance twice (and two passes per step): say so."""
    built_in = model.config.training.get("distilled_guidance_scale", 1.0) or 1.0
    if model.config.kind == "consistency" and built_in != 1 and guidance != 1 and not model.takes_guidance:
        warnings.warn(f"{model.path} has guidance s = {built_in:g} distilled in; --guidance-scale {guidance:g} applies "
                      f"classifier-free guidance again on top of it (two passes a step). Use 1 for the distilled "
                      f"guidance alone", stacklevel=3)


def _start(model: Model, grid: Tensor, b: int, init: Tensor | None, pure_noise: bool,
           generator: torch.Generator) -> Tensor:
    """x at σ₀ = grid[0]: the prior (no init image, or inpainting at full strength, as diffusers), or the
    init image's encoding plus σ₀·z (img2img)."""
    noise = torch.randn((b, *model.shape), generator=generator)
    if init is None or pure_noise:
        x = noise * model.schedule.prior_std(grid[0])
    else:
        x = model.codec.encode(init).cpu() + noise * grid[0]
    return x.to(model.device)


def nfe(model: Model, sampler: str, steps: int, guidance_scale: float) -> int:
    """Network evaluations per image: the sampler's per step, times the guided denoiser's passes (CFG's
    two count as two; a guidance-conditioned student's guidance is free)."""
    den, _ = model.guided(model.conditioner.null(1, model.device), guidance_scale)
    return get_sampler(sampler).nfe(steps) * getattr(den, "passes", 1)


def generate_latent(model: Model, prompts: Sequence[str], steps: int | None = None, sampler: str | None = None,
                    guidance_scale: float | None = None, seed: int = 0, batch_size: int = 256,
                    init_images: Tensor | None = None, strength: float = 1.0, progress: bool = False) -> Tensor:
    """:func:`generate` with prompts (the name the Python API had for text-to-image pipelines)."""
    if not prompts:
        raise FewstepError("nothing to sample: give at least one prompt")
    return generate(model, list(prompts), steps=steps, sampler=sampler, guidance_scale=guidance_scale, seed=seed,
                    batch_size=batch_size, init_images=init_images, strength=strength, progress=progress)
