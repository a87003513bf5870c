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

Seeds: every image of a call comes from the one generator seeded ``seed``, as diffusers' pipelines draw a
batch from ``generator=torch.Generator().manual_seed(seed)``. Images go in chunks of ``batch_size`` (256),
in order; each chunk draws its start noise [n, C, h, w] and then each step's noise (stochastic samplers
only). So image i's start noise is the i-th [C, h, w] block of the stream: with a deterministic sampler
(euler/ddim, heun, dpmpp-2m, 1-step consistency) image i is the same in a call of i + 1 images as in a longer
one, whenever C·h·w is a multiple of 16 (every SD/SDXL latent and pixel size fewstep ships); a stochastic
sampler's step noise is drawn for the whole chunk, so its image i depends on the chunk's other images too.
``network_batch`` (the CLI's ``--batch-size``) only splits each chunk's network and VAE calls: it never changes
an image. The size (``height``/``width``, the model's own by default) changes the blocks' shape, hence the noise.

A negative prompt (text-to-image pipelines, guidance ≠ 1, classifier-free guidance around the network) is
the unconditional branch instead of the empty prompt, as diffusers' ``negative_prompt``.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..core.guidance import CFGDenoiser, check_guidance_scale
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


def condition_batch(model: Model, cond: Any, start: int, b: int, size: tuple[int, int] | None = None,
                    ) -> tuple[dict[str, Tensor], bool]:
    """The denoiser kwargs of images start … start + b at ``size`` (None: the model's own), and whether they
    are unconditional."""
    at = {} if size is None else {"size": size}
    if cond is None:
        return model.conditioner.null(b, model.device, **at), True
    return model.conditioner(cond[start:start + b], model.device, **at), False


def sample_shape(model: Model, height: int | None, width: int | None) -> tuple[tuple[int, int, int], tuple | None]:
    """(the shape of one sample in the denoiser's space at ``height`` × ``width`` pixels, the size to condition
    on: None when it is the model's own). A pipeline takes multiples of its VAE's factor f (latents H/f × W/f,
    diffusers' rule); a pixel model only its own size."""
    channels, h, w = model.shape
    f = model.codec.factor
    height, width = height or h * f, width or w * f
    if (height, width) == (h * f, w * f):
        return model.shape, None
    if not model.codec.resizable:
        raise FewstepError(f"{model.path} is a pixel model of {w}×{h} images only; it cannot sample {width}×{height} "
                           f"(drop --height/--width)")
    bad = [f"{name} {v}" for name, v in (("height", height), ("width", width)) if v % f]
    if bad:
        raise FewstepError(f"{' and '.join(bad)} not a multiple of {f}, {model.path}'s VAE factor (its latents are "
                           f"1/{f} of the image each way); use e.g. {max(f, height // f * f)}×{max(f, width // f * f)} "
                           f"(height × width)")
    return (channels, height // f, width // f), (height, width)


def negative_prompts(model: Model, negative_prompt: str | Sequence[str] | None, cond: Any, n: int,
                     guidance: float) -> list[str] | None:
    """The negative prompt of each of the ``n`` images (one for all, or one each), or None; refused where there
    is no unconditional branch for it to replace (diffusers ignores it there, fewstep says so instead)."""
    if negative_prompt is None:
        return None
    if not model.conditioner.text:
        raise FewstepError(f"{model.path} is not a text-to-image pipeline; a negative prompt applies to those")
    if cond is None:
        raise FewstepError("a negative prompt needs prompts to guide away from it; give prompts too")
    if model.takes_guidance:
        raise FewstepError(f"{model.path} takes the guidance scale as an input of its network (one pass a step, no "
                           f"unconditional branch), as an LCM or a guided student does: a negative prompt has "
                           f"nothing to replace (diffusers ignores negative_prompt for such a model); drop it")
    if guidance == 1:
        raise FewstepError("at guidance scale 1 there is no unconditional branch for a negative prompt to replace "
                           "(diffusers ignores negative_prompt at guidance_scale <= 1): raise --guidance-scale above "
                           "1, or drop the negative prompt")
    negatives = model.conditioner.check(negative_prompt)
    if len(negatives) not in (1, n):
        raise FewstepError(f"give one negative prompt or one per image ({n}), got {len(negatives)}")
    return negatives * n if len(negatives) == 1 else negatives


def guided_batch(model: Model, kwargs: dict[str, Tensor], guidance: float, negatives: list[str] | None,
                 size: tuple[int, int] | None, b: int, network_batch: int | None) -> tuple[Any, dict[str, Tensor]]:
    """(denoiser, extra_args) of ``b`` images: :meth:`Model.guided`, with the negative prompts' conditioning (at
    the same size) as the unconditional branch when given; with ``network_batch``, a denoiser that runs at most
    that many images (and their unconditional twins) per call, each slice guided against its own slice."""
    at = {} if size is None else {"size": size}
    negative = None if negatives is None else model.conditioner(negatives, model.device, **at)

    def guided(kw: dict[str, Tensor], neg: dict[str, Tensor] | None) -> tuple[Any, dict[str, Tensor]]:
        return model.guided(kw, guidance) if neg is None else (CFGDenoiser(model.denoiser, guidance, neg), kw)

    den, extra = guided(kwargs, negative)
    n = network_batch
    if n is None or b <= n:
        return den, extra
    starts = range(0, b, n)
    parts = [guided(_rows(kwargs, i, n, b), None if negative is None else _rows(negative, i, n, b))[0] for i in starts]

    def sliced(x: Tensor, sigma: Tensor, **cond: Tensor) -> Tensor:
        return torch.cat([part(x[i:i + n], _rows(sigma, i, n, b), **_rows(cond, i, n, b))
                          for part, i in zip(parts, starts)])
    return sliced, extra


def _rows(v: Any, i: int, n: int, b: int) -> Any:
    """Rows i … i + n of a per-image tensor (one with ``b`` rows) or of each in a dict; anything else as it is."""
    if isinstance(v, dict):
        return {k: _rows(t, i, n, b) for k, t in v.items()}
    return v[i:i + n] if torch.is_tensor(v) and v.dim() > 0 and len(v) == b else v


def in_slices(fn, n: int | None):
    """``fn(x)`` (a codec's encode or decode) on at most ``n`` rows at a time, the results concatenated."""
    if n is None:
        return fn
    return lambda x: fn(x) if len(x) <= n else torch.cat([fn(x[i:i + n]) for i in range(0, len(x), n)])


def sampler_options(model: Model, sampler: str, eta: float | None = None) -> dict:
    """Model-specific keyword arguments of a sampler: multistep consistency sampling re-noises to
    √(σ'² − σ_end²) (Song et al. 2023, Algorithm 1; σ_end = σmin for an EDM-space model); TCD's γ sampler takes
    γ = ``eta`` (default 0.3, TCDScheduler's) and the discrete VP schedule whose timesteps decide its s."""
    if eta is not None and sampler != "tcd":
        raise FewstepError(f"--eta (TCD's γ) applies to --sampler tcd, not {sampler}")
    if sampler == "tcd":
        from ..core.parameterizations import parameterization
        from ..core.solvers import TCD_GAMMA

        space = parameterization("tcd").space          # the noise space whose timesteps TCD's s is taken on
        if model.config.param.space is not space:
            raise FewstepError(f"--sampler tcd runs models of the {space.name} space (a diffusers SD pipeline, a TCD "
                               f"model); {model.path} is a model of the {model.config.param.space.name} space")
        gamma = TCD_GAMMA if eta is None else float(eta)
        if not 0 <= gamma <= 1:
            raise FewstepError(f"--eta (TCD's γ) must be in [0, 1] (0 deterministic, 1 fully stochastic), got {eta}")
        return {"gamma": gamma, "schedule": model.schedule}
    return {"sigma_end": model.sigma_end} if sampler == "consistency" else {}


@torch.no_grad()
def generate(model: Model, cond: Any = None, num: int | None = None, steps: int | None = None,
             sampler: str | None = None, guidance_scale: float | None = None, seed: int = 0, batch_size: int = 256,
             init_images: Tensor | None = None, strength: float = 1.0, mask: Tensor | None = None,
             sigmas: Tensor | None = None, progress: bool = False, *, labels: Any = None,
             prompts: Sequence[str] | None = None, clamp_x0: bool = False, rho: float | None = None,
             negative_prompt: str | Sequence[str] | None = None, height: int | None = None, width: int | None = None,
             network_batch: int | None = None, eta: float | None = None) -> Tensor:
    """Images in [−1, 1], [N, C, H, W], of any model (module docstring).

    ``cond`` (or ``labels=`` / ``prompts=``): class labels for a class-conditional model, prompts for a
    text-to-image one, one per image or one for ``num`` images; none: ``num`` unconditional images.
    ``steps``, ``sampler``, ``guidance_scale``: default the model's. ``init_images`` (in [−1, 1]) with
    ``strength``: img2img; with ``mask`` (1 = keep, broadcast against the images): inpainting.
    ``sigmas`` overrides the step grid. ``clamp_x0``: every x0-estimate clipped to the data range before the
    solver uses it (pixel models); ``rho``: the Karras grid's ρ (see "Heun at 2–4 steps" in BENCHMARKS.md for both).
    ``negative_prompt`` (one, or one per image): the unconditional branch of CFG (diffusers' ``negative_prompt``).
    ``height``/``width``: pipelines, in pixels, multiples of the VAE factor (default the model's size; the
    init images' size for img2img). ``batch_size``: images per noise chunk (module docstring: changing it
    changes the images of calls with more images than it); ``network_batch``: images per network and VAE call
    (with CFG each call also carries their unconditional twins), never changing the images. ``eta``: γ of TCD's
    strategic stochastic sampling (``sampler`` "tcd", the default of a TCD model; None: 0.3, as TCDScheduler's).
    """
    cond = next((c for c in (cond, labels, prompts) if c is not None), None)
    if mask is not None and init_images is None:
        raise FewstepError("inpainting needs the image to fill in (init_images) beside its mask")
    if init_images is not None:
        ih, iw = init_images.shape[-2:]
        if (height or ih, width or iw) != (ih, iw):
            raise FewstepError(f"the init images are {iw}×{ih}; img2img keeps their size (drop --height/--width)")
        height, width = ih, iw
    shape, size = sample_shape(model, height, width)
    cond, n = conditions(model, cond, len(init_images) if init_images is not None else num)
    steps = steps or model.config.default_steps
    model = serving(model, steps if sigmas is None else len(sigmas) - 1)
    sampler = sampler or model.config.default_sampler
    if model.config.is_lcm and sampler != "consistency":
        raise FewstepError(f"{model.path} is a latent consistency model; it samples with --sampler consistency")
    spec = get_sampler(sampler)
    options = sampler_options(model, sampler, eta)
    guidance = guidance_or_default(model, guidance_scale)
    negatives = negative_prompts(model, negative_prompt, cond, n, guidance)
    _warn_double_guidance(model, guidance)
    grid = sampling_grid(model, steps, sampler, strength if init_images is not None else 1.0, rho) \
        if sigmas is None else sigmas
    generator = torch.Generator().manual_seed(seed)
    step_noise = model.step_noise(generator)     # the steps' noise in the layout the model's pipeline draws it
    encode, decode = in_slices(model.codec.encode, network_batch), in_slices(model.codec.decode, network_batch)
    out = []
    for start in tqdm(range(0, n, batch_size), disable=not progress or n <= batch_size, desc="batches", leave=False):
        b = min(batch_size, n - start)
        kwargs, unconditional = condition_batch(model, cond, start, b, size)
        den, extra = guided_batch(model, kwargs, 1.0 if unconditional else guidance,
                                  None if negatives is None else negatives[start:start + b], size, b, network_batch)
        if clamp_x0:
            den = _clipped(den, model.codec.clip)
        init = None if init_images is None else init_images[start:start + b]
        x = _start(shape, model, grid, b, init, encode, pure_noise=mask is not None and strength == 1,
                   generator=generator)
        if mask is None:
            x = spec.fn(den, x, grid, extra_args=extra, generator=step_noise, disable=not progress, **options)
        else:
            y = encode(init).to(model.device)
            x = sample_replacing(den, x, grid, extra, inpainting(model.codec.mask(mask)), y, clip=model.codec.clip,
                                 consistency=model.config.kind == "consistency", sigma_end=model.sigma_end,
                                 generator=step_noise)
        images = decode(x).cpu()
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


def _start(shape: tuple[int, int, int], model: Model, grid: Tensor, b: int, init: Tensor | None, encode,
           pure_noise: bool, generator: torch.Generator) -> Tensor:
    """x at σ₀ = grid[0]: the prior (no init image, or inpainting at full strength, as diffusers), or the
    init image's encoding plus σ₀·z (img2img); ``shape``: one sample's, at the size being generated."""
    noise = torch.randn((b, *shape), generator=generator)
    if init is None or pure_noise:
        x = noise * model.schedule.prior_std(grid[0])
    else:
        x = encode(init).cpu() + noise * grid[0]
    return x.to(model.device)


def nfe(model: Model, sampler: str, steps: int, guidance_scale: float) -> int:
    """Network evaluations per image: the sampler's per step, times the guided denoiser's passes (CFG's
    two count as two; a guidance-conditioned student's guidance is free)."""
    den, _ = model.guided(model.conditioner.null(1, model.device), guidance_scale)
    return get_sampler(sampler).nfe(steps) * getattr(den, "passes", 1)


def generate_latent(model: Model, prompts: Sequence[str], steps: int | None = None, sampler: str | None = None,
                    guidance_scale: float | None = None, seed: int = 0, batch_size: int = 256,
                    init_images: Tensor | None = None, strength: float = 1.0, progress: bool = False, *,
                    negative_prompt: str | Sequence[str] | None = None, height: int | None = None,
                    width: int | None = None, network_batch: int | None = None) -> Tensor:
    """:func:`generate` with prompts (the name the Python API had for text-to-image pipelines)."""
    if not prompts:
        raise FewstepError("nothing to sample: give at least one prompt")
    return generate(model, list(prompts), steps=steps, sampler=sampler, guidance_scale=guidance_scale, seed=seed,
                    batch_size=batch_size, init_images=init_images, strength=strength, progress=progress,
                    negative_prompt=negative_prompt, height=height, width=width, network_batch=network_batch)
