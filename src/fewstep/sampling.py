"""Generate images from a loaded model: the one place that turns (model, labels, steps, sampler,
guidance scale, seed) into pixels, used by the CLI, the demo and evaluation."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .errors import FewstepError
from .guidance import CFGDenoiser, check_guidance_scale
from .models import LoadedModel
from .schedules import EDMSchedule
from .solvers import get_sampler


def sampling_grid(model: LoadedModel, steps: int, sampler: str = "dpmpp-2m") -> Tensor:
    """The default n-step σ grid of a model, ending in 0. A grid tuned for the model and stored in its
    ``sampling_sigmas`` (e.g. by ``fewstep eval --tune-sigmas``) comes first. EDM models: DDIM's
    uniform-timestep grid for ``ddim`` (so it differs from Euler only in its discretization, as in
    Karras et al. 2022 Table 1), the Karras ρ = 7 grid for every other sampler (for multistep
    consistency sampling: σmax, then the Karras levels). Discrete VP models: diffusers' "trailing" timesteps."""
    if steps < 1:
        raise FewstepError(f"steps must be at least 1, got {steps}")
    tuned = model.config.sampling_sigmas.get(str(steps))
    if tuned is not None and sampler == model.config.default_sampler:
        return torch.tensor(tuned, dtype=torch.float32)
    schedule = model.schedule
    if isinstance(schedule, EDMSchedule):
        return schedule.ddim_grid(steps) if sampler == "ddim" else schedule.grid(steps)
    return schedule.grid(steps, "trailing")


def check_labels(model: LoadedModel, labels: Sequence[int] | Tensor | None) -> Tensor | None:
    cfg = model.config
    if labels is None:
        return None
    labels = torch.as_tensor(labels, dtype=torch.long)
    if not cfg.class_names:
        raise FewstepError(f"{model.path} is unconditional; it takes no labels")
    bad = [int(v) for v in labels.unique() if not 0 <= v < cfg.num_classes]
    if bad:
        raise FewstepError(f"label {bad[0]} is not one of {model.path}'s classes 0..{cfg.num_classes - 1} "
                           f"({', '.join(cfg.class_names)})")
    return labels


def conditioned(model: LoadedModel, labels: Tensor | None, guidance_scale: float) -> tuple[Callable[..., Tensor], dict]:
    """The denoiser to sample with and its ``extra_args``: for a class-conditional model, CFG with the
    null label as the unconditional branch; otherwise the bare denoiser."""
    if model.config.guidance_embedding:  # a guided student: s is an input, one pass (fewstep.guided)
        from .guided import w_conditioned
        return w_conditioned(model, labels, guidance_scale)
    if labels is None:
        return model.denoiser, {}
    null = torch.full_like(labels, model.config.null_label)
    return CFGDenoiser(model.denoiser, guidance_scale, {"class_labels": null}), {"class_labels": labels}


@torch.no_grad()
def generate(model: LoadedModel, labels: Sequence[int] | Tensor | None = None, num: int | None = None,
             steps: int = 50, sampler: str = "dpmpp-2m", guidance_scale: float = 1.0, seed: int = 0,
             batch_size: int = 256, progress: bool = False, sigmas: Tensor | None = None) -> Tensor:
    """Sample images in [−1, 1], shape [N, C, H, W].

    ``labels`` (one per image) for a class-conditional model, else ``num`` images. The initial
    noise and any sampler noise come from one generator seeded with ``seed``, batch by batch, so
    the same call gives the same images. ``sigmas`` overrides the step grid (``steps`` is then ignored).
    """
    spec = get_sampler(sampler)
    try:
        guidance_scale = check_guidance_scale(guidance_scale)
    except ValueError as e:
        raise FewstepError(str(e)) from None
    labels = check_labels(model, labels)
    if model.config.serves_steps:  # a progressive student folder: the student of this step count
        from .progressive import serving_model
        model = serving_model(model, steps if sigmas is None else len(sigmas) - 1)
    n = len(labels) if labels is not None else num
    if not n or n < 1:
        raise FewstepError("nothing to sample: give labels or num >= 1")
    cfg = model.config
    sigmas = sampling_grid(model, steps, sampler) if sigmas is None else sigmas
    device = next(model.denoiser.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    out = []
    for start in tqdm(range(0, n, batch_size), disable=not progress or n <= batch_size, desc="batches", leave=False):
        b = min(batch_size, n - start)
        x = torch.randn(b, cfg.channels, cfg.image_size, cfg.image_size, generator=generator) * sigmas[0]
        den, extra = conditioned(model, None if labels is None else labels[start:start + b].to(device), guidance_scale)
        out.append(spec.fn(den, x.to(device), sigmas, extra_args=extra, generator=generator,
                           disable=not progress, **sampler_options(model, sampler)).clamp(-1, 1).cpu())
    return torch.cat(out)


def sampler_options(model: LoadedModel, sampler: str) -> dict:
    """Model-specific keyword arguments of a sampler: multistep consistency sampling re-noises to
    √(σ'² − σmin²) for a CM (Song et al. 2023, Algorithm 1)."""
    if sampler == "consistency" and model.config.parameterization == "cm":
        return {"sigma_end": model.schedule.sigma_min}
    return {}


def nfe(model: LoadedModel, sampler: str, steps: int, guidance_scale: float) -> int:
    """Network evaluations per image (CFG's two passes count as two)."""
    per = 2 if (model.config.class_names and guidance_scale != 1 and not model.config.guidance_embedding) else 1
    return get_sampler(sampler).nfe(steps) * per
