"""Text-to-image and image-to-image sampling of latent pipelines (SD-format teachers and LCMs), on the
same σ-space samplers as every other fewstep model.

- A diffusion teacher samples with any of :data:`fewstep.solvers.SAMPLERS` on diffusers' "trailing"
  timesteps, with classifier-free guidance (conditional and empty-prompt passes in one batch).
- An LCM samples with multistep consistency sampling (Luo et al. 2023, Algorithm 3) on its skipped
  grid (:func:`fewstep.schedules.lcm_timesteps`, = ``LCMScheduler.set_timesteps``), the guidance
  scale going in through ψ(w): one evaluation per step.

The initial noise is the VP prior z ~ N(0, I) at the first timestep, i.e. x = z·√(1 + σ₀²) in σ space,
drawn before any step noise from one seeded generator: the order diffusers' pipelines use, so the
same seed gives the same images here and in ``LatentConsistencyModelPipeline``.
img2img (SDEdit, Meng et al. 2021): the image's latent noised to the first level of the truncated
grid (``strength`` of the way), then the same samplers.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .errors import FewstepError
from .guidance import check_guidance_scale, prompt_cfg
from .guided import check_trained_range
from .lcm import LCMStudent
from .schedules import append_zero, lcm_timesteps, spaced_timesteps
from .sd import LatentModel
from .solvers import get_sampler


def latent_grid(model: LatentModel, steps: int, strength: float = 1.0) -> Tensor:
    """The σ grid (ending in 0) of ``steps`` steps; ``strength`` < 1 keeps the last part (img2img) as
    diffusers' img2img pipelines do: the LCM grid of the truncated skipped grid, or the last
    ⌊steps·strength⌋ steps of a diffusion model's grid."""
    if not 0 < strength <= 1:
        raise FewstepError(f"strength must be in (0, 1], got {strength}")
    schedule = model.schedule
    T = schedule.num_train_timesteps
    if model.is_lcm:
        try:
            ts = lcm_timesteps(steps, model.original_inference_steps, T, strength)
        except ValueError as e:
            raise FewstepError(str(e)) from None
    else:
        if steps < 1:
            raise FewstepError(f"steps must be at least 1, got {steps}")
        ts = spaced_timesteps(steps, T, "trailing")
        keep = min(int(steps * strength), steps)
        if keep < 1:
            raise FewstepError(f"strength {strength} of {steps} steps runs no step; raise --strength or --steps")
        ts = ts[steps - keep:]
    return append_zero(schedule.sigmas[ts]).float()


def latent_denoiser(model: LatentModel, prompts: Sequence[str], guidance_scale: float):
    """(denoiser, extra_args) for ``prompts``: a student that takes s as an input (an LCM's consistency
    function, a guided-distillation student; refused outside its trained range), or the model with
    classifier-free guidance against the empty prompt."""
    cond = {"encoder_hidden_states": model.encode_prompts(prompts), "guidance_scale": guidance_scale}
    den = LCMStudent.of(model) if model.is_lcm else model.denoiser
    if model.takes_guidance:
        if "guidance_range" in model.info:
            check_trained_range(tuple(model.info["guidance_range"]), guidance_scale, model.path)
        return den, {**cond, "guidance_scale": torch.full((len(prompts),), guidance_scale)}
    # a diffusion model, or an LCM-LoRA: CFG around it (diffusers' pipelines do the same with LCMScheduler)
    return prompt_cfg(den, model.encode_prompts([""])[0])(cond)


def latent_nfe(model: LatentModel, sampler: str, steps: int, guidance_scale: float) -> int:
    """UNet evaluations per image: CFG's two passes count as two; a w-conditioned student's guidance is free."""
    one_pass = model.takes_guidance or guidance_scale == 1
    return get_sampler(sampler).nfe(steps) * (1 if one_pass else 2)


@torch.no_grad()
def generate_latent(model: LatentModel, prompts: Sequence[str], steps: int | None = None, sampler: str | None = None,
                    guidance_scale: float | None = None, seed: int = 0, batch_size: int = 250,
                    init_images: Tensor | None = None, strength: float = 1.0, progress: bool = False) -> Tensor:
    """Images in [−1, 1] for ``prompts``; ``init_images`` (same count, in [−1, 1]) for img2img."""
    if not prompts:
        raise FewstepError("nothing to sample: give at least one prompt")
    steps = steps or model.default_steps
    if model.info.get("serves_steps"):   # a progressive folder: the student distilled for this count
        from .progressive import serving_pipeline
        model = serving_pipeline(model, steps)
    sampler = sampler or model.default_sampler
    if model.is_lcm and sampler != "consistency":
        raise FewstepError(f"{model.path} is a latent consistency model; it samples with --sampler consistency")
    spec = get_sampler(sampler)
    try:
        guidance_scale = check_guidance_scale(model.default_guidance_scale if guidance_scale is None
                                              else guidance_scale)
    except ValueError as e:
        raise FewstepError(str(e)) from None
    if init_images is not None and len(init_images) != len(prompts):
        raise FewstepError(f"img2img needs one prompt per image: {len(prompts)} prompts for {len(init_images)} images")
    sigmas = latent_grid(model, steps, strength if init_images is not None else 1.0)
    device = next(model.unet.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    out = []
    for start in tqdm(range(0, len(prompts), batch_size), disable=not progress, desc="batches", leave=False):
        batch = list(prompts[start:start + batch_size])
        shape = (len(batch), *model.latent_shape)
        if init_images is None:
            x = torch.randn(shape, generator=generator) * (1 + sigmas[0] ** 2).sqrt()
        else:
            z0 = model.encode_images(init_images[start:start + len(batch)].to(device)).cpu()
            x = z0 + torch.randn(shape, generator=generator) * sigmas[0]
        den, extra = latent_denoiser(model, batch, guidance_scale)
        latents = spec.fn(den, x.to(device), sigmas.to(device), extra_args=extra, generator=generator, disable=True)
        out.append(model.decode(latents).cpu())
    return torch.cat(out)
