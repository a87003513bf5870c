"""ODE/SDE solvers as single steps and as full samplers, k-diffusion style.

Every sampler has one signature::

    sample_x(model, x, sigmas, extra_args=None, callback=None, disable=None, generator=None) -> x

``model(x, sigma, **extra_args) -> x0`` is the denoiser contract of :mod:`fewstep.denoisers`,
``x`` starts at noise level ``sigmas[0]`` and ``sigmas`` decreases to its last entry (0 for a full
sample). Samplers hold no state between calls. The probability-flow ODE they solve is
dx/dσ = (x − D(x; σ))/σ (Karras et al. 2022, eq. 4 with σ(t) = t).

The step formulas live in the ``*_step`` functions and are shared with training (the teacher
ODE step of consistency distillation, the DDIM targets of progressive distillation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor
from tqdm.auto import trange

from .denoisers import append_dims, batch_sigma
from .schedules import vp_alpha_cumprod

Model = Callable[..., Tensor]
Callback = Callable[[dict[str, Any]], None]


# --- single steps ----------------------------------------------------------------------------
def to_d(x: Tensor, sigma: Tensor | float, denoised: Tensor) -> Tensor:
    """The PF-ODE derivative dx/dσ = (x − D)/σ (Karras et al. 2022, eq. 4)."""
    return (x - denoised) / append_dims(sigma, x.ndim)


def ddim_step(x: Tensor, denoised: Tensor, sigma: Tensor | float, sigma_next: Tensor | float) -> Tensor:
    """Deterministic DDIM (Song et al. 2021, eq. 12 with η=0) = an Euler step of the PF-ODE in σ
    space: x' = D + σ'·(x − D)/σ."""
    return denoised + append_dims(sigma_next, x.ndim) * to_d(x, sigma, denoised)


euler_step = ddim_step  # the same formula: x + (σ' − σ)·d == D + σ'·d


def heun_step(model: Model, x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor,
              extra_args: dict | None = None) -> Tensor:
    """Heun's 2nd-order step (Karras et al. 2022, Algorithm 1, lines 5–8); Euler when σ' = 0."""
    d = to_d(x, sigma, denoised)
    x_euler = x + append_dims(sigma_next - sigma, x.ndim) * d
    if _is_zero(sigma_next):
        return x_euler
    d_next = to_d(x_euler, sigma_next, model(x_euler, sigma_next, **(extra_args or {})))
    return x + append_dims(sigma_next - sigma, x.ndim) * (d + d_next) / 2


def dpm_solver_2_step(model: Model, x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor,
                      extra_args: dict | None = None) -> Tensor:
    """DPM-Solver-2 (Lu et al. 2022a, Algorithm 1 with r₁ = ½; noise prediction). In σ space the
    exponential integrator of the ε form has no linear part, so it is Euler through the λ-midpoint
    σ_s = √(σσ') (λ = −ln σ): u = x + (σ_s − σ)·ε(x, σ), x' = x + (σ' − σ)·ε(u, σ_s), ε = (x − D)/σ.
    k-diffusion's ``sample_dpm_2`` takes the same midpoint. Euler when σ' = 0."""
    if _is_zero(sigma_next):
        return denoised
    sigma_mid = (sigma * sigma_next).sqrt()
    u = x + append_dims(sigma_mid - sigma, x.ndim) * to_d(x, sigma, denoised)
    eps_mid = to_d(u, sigma_mid, model(u, sigma_mid, **(extra_args or {})))
    return x + append_dims(sigma_next - sigma, x.ndim) * eps_mid


def dpmpp_2s_step(model: Model, x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor,
                  extra_args: dict | None = None) -> Tensor:
    """DPM-Solver++(2S) (Lu et al. 2022b, Algorithm 1 with r = ½; data prediction), the single-step
    second-order solver (k-diffusion ``sample_dpmpp_2s_ancestral`` with η = 0), h = λ' − λ:
        u = (σ_s/σ)·x − (e^{−h/2} − 1)·D(x, σ),   x' = (σ'/σ)·x − (e^{−h} − 1)·D(u, σ_s),  σ_s = √(σσ').
    Returns D when σ' = 0."""
    if _is_zero(sigma_next):
        return denoised
    h = torch.log(sigma) - torch.log(sigma_next)
    sigma_mid = (sigma * sigma_next).sqrt()
    u = append_dims(sigma_mid / sigma, x.ndim) * x - append_dims(torch.expm1(-h / 2), x.ndim) * denoised
    denoised_mid = model(u, sigma_mid, **(extra_args or {}))
    return append_dims(sigma_next / sigma, x.ndim) * x - append_dims(torch.expm1(-h), x.ndim) * denoised_mid


def ode_step(solver: str, model: Model, x: Tensor, sigma: Tensor, sigma_next: Tensor,
             extra_args: dict | None = None, denoised: Tensor | None = None) -> Tensor:
    """One teacher ODE step σ → σ' with a named one-step solver, as consistency distillation uses it
    (Song et al. 2023: Euler/Heun; Luo et al. 2023 §4.2: DDIM, DPM-Solver, DPM-Solver++).
    ``sigma``/``sigma_next`` are ``[batch]``; ``denoised`` = D(x; σ) if already known."""
    if solver not in ODE_SOLVERS:
        raise ValueError(f"unknown teacher solver {solver!r}; choose one of {', '.join(ODE_SOLVERS)}")
    if denoised is None:
        denoised = model(x, sigma, **(extra_args or {}))
    if solver in ("ddim", "euler"):
        return ddim_step(x, denoised, sigma, sigma_next)
    return ODE_SOLVERS[solver](model, x, denoised, sigma, sigma_next, extra_args)


ODE_SOLVERS: dict[str, Callable[..., Tensor] | None] = {
    "ddim": None, "euler": None, "heun": heun_step, "dpm-solver": dpm_solver_2_step, "dpm-solver++": dpmpp_2s_step}


def dpmpp_2m_step(x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor,
                  old_denoised: Tensor | None = None, sigma_prev: Tensor | None = None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2, "midpoint" form as in diffusers and
    k-diffusion), with λ = −ln σ and h = λ' − λ:
        x' = (σ'/σ)·x − (e^{−h} − 1)·D̃,   D̃ = (1 + 1/2r)·D − (1/2r)·D_prev,  r = h_prev/h.
    First order (= DDIM) without a previous step, and at σ' = 0 where it returns D."""
    if _is_zero(sigma_next):
        return denoised
    lam, lam_next = -torch.log(sigma), -torch.log(sigma_next)
    h = lam_next - lam
    if old_denoised is not None:
        r = (lam - (-torch.log(sigma_prev))) / h
        denoised = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
    return append_dims(sigma_next / sigma, x.ndim) * x - append_dims(torch.expm1(-h), x.ndim) * denoised


def ancestral_sigmas(sigma: Tensor, sigma_next: Tensor, eta: float = 1.0) -> tuple[Tensor, Tensor]:
    """(σ_down, σ_up) of an ancestral step. With η = 1 this is the DDPM posterior
    q(x_{t−1} | x_t, x_0) (Ho et al. 2020 eq. 7; DDIM eq. 16 with η = 1) in σ space:
    σ_up² = σ'²(σ² − σ'²)/σ², σ_down² = σ'² − σ_up²."""
    sigma_up = torch.minimum(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2).sqrt())
    return (sigma_next**2 - sigma_up**2).sqrt(), sigma_up


def ancestral_step(x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor, noise: Tensor,
                   eta: float = 1.0) -> Tensor:
    """A DDIM step to σ_down then fresh noise of std σ_up."""
    sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_next, eta)
    return ddim_step(x, denoised, sigma, sigma_down) + append_dims(sigma_up, x.ndim) * noise


def stochastic_ddim_step(x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor, sigma_skip: Tensor,
                         noise: Tensor) -> Tensor:
    """Meng et al. 2023's stochastic step (§3.3, "N-step stochastic sampling"): a DDIM step of twice the
    length, σ → σ_skip (the level after σ'), then noise back up to σ': x' = DDIM(x; σ → σ_skip) +
    √(σ'² − σ_skip²)·z, the forward process from σ_skip to σ' in σ space."""
    back = (torch.as_tensor(sigma_next, dtype=x.dtype, device=x.device) ** 2
            - torch.as_tensor(sigma_skip, dtype=x.dtype, device=x.device) ** 2).clamp(min=0).sqrt()
    return ddim_step(x, denoised, sigma, sigma_skip) + append_dims(back, x.ndim) * noise


def consistency_step(denoised: Tensor, sigma_next: Tensor, noise: Tensor, sigma_end: float = 0.0) -> Tensor:
    """Multistep consistency sampling's re-noising (Song et al. 2023, Algorithm 1):
    x' = f(x, σ) + √(σ'² − σ_end²)·z; σ_end = σmin for CM, 0 for LCM (Luo et al. 2023, Algorithm 3)."""
    if _is_zero(sigma_next):
        return denoised
    return denoised + append_dims((sigma_next**2 - sigma_end**2).clamp(min=0).sqrt(), denoised.ndim) * noise


TCD_GAMMA = 0.3   # TCDScheduler.step's default eta (scheduling_tcd.py:599; "0.3 often yields good results", TCD README)


def tcd_timestep_s(t_next: Tensor, gamma: float) -> Tensor:
    """Strategic stochastic sampling's intermediate timestep s = ⌊(1 − γ)·t_prev⌋ (Zheng et al. 2024, Algorithm 4;
    diffusers ``TCDScheduler.step``, scheduling_tcd.py:645), with the integer timestep ``t_next`` of the next
    grid level (0 after the last step). Computed as TCDScheduler does it, a float32 product of γ's complement and
    a long tensor, so the floor agrees with it at every timestep."""
    if not 0 <= gamma <= 1:
        raise ValueError(f"gamma (eta) must be in [0, 1], got {gamma}")
    return torch.floor((1 - gamma) * t_next.long()).long()


def tcd_step(x: Tensor, denoised: Tensor, sigma: Tensor, sigma_s: Tensor, sigma_next: Tensor,
             noise: Tensor | None) -> Tensor:
    """One step of TCD's strategic stochastic sampling (Zheng et al. 2024, Algorithm 4; ``TCDScheduler.step``,
    scheduling_tcd.py:656–691), in σ space: the trajectory consistency function to s ≤ t_prev, then the forward
    process back up to the next level,

        x_s = D + σ_s·(x − D)/σ                (the DDIM / first-order exponential-integrator step t → s, eq. 9's
                                                semi-linear f_θ(x_t, t, s) with the network's ε: :func:`ddim_step`)
        x'  = x_s + √(σ'² − σ_s²)·z            (VP: √(ᾱ'/ᾱ_s)·x_s + √(1 − ᾱ'/ᾱ_s)·z, divided by √ᾱ')

    ``noise`` None: x' = x_s (γ = 0, and the last step, where TCDScheduler adds none). The one copy of the γ step:
    :func:`sample_tcd` runs it, and TCD's loss (:mod:`fewstep.objectives.trajectory`) uses its first line."""
    x_s = ddim_step(x, denoised, sigma, sigma_s)
    if noise is None:
        return x_s
    up = (torch.as_tensor(sigma_next, dtype=x.dtype, device=x.device) ** 2
          - torch.as_tensor(sigma_s, dtype=x.dtype, device=x.device) ** 2).clamp(min=0).sqrt()
    return x_s + append_dims(up, x.ndim) * noise


# --- samplers ----------------------------------------------------------------------------------
def _denoise(model: Model, x: Tensor, sigmas: Tensor, i: int, extra_args: dict | None,
             callback: Callback | None) -> Tensor:
    """D(x; σ_i), reported to ``callback`` as k-diffusion does."""
    denoised = model(x, batch_sigma(sigmas[i], x), **(extra_args or {}))
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_next": sigmas[i + 1], "denoised": denoised})
    return denoised


def _range(sigmas: Tensor, disable: bool | None):
    return trange(len(sigmas) - 1, disable=True if disable is None else disable, desc="sampling", leave=False)


@torch.no_grad()
def sample_euler(model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                 callback: Callback | None = None, disable: bool | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
    """Euler = deterministic DDIM: one network evaluation per step."""
    sigmas = sigmas.to(x.device, x.dtype)
    for i in _range(sigmas, disable):
        x = ddim_step(x, _denoise(model, x, sigmas, i, extra_args, callback), sigmas[i], sigmas[i + 1])
    return x


sample_ddim = sample_euler


@torch.no_grad()
def sample_heun(model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                callback: Callback | None = None, disable: bool | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """Heun (EDM Algorithm 1): 2 evaluations per step, 1 on the last step to σ = 0."""
    sigmas = sigmas.to(x.device, x.dtype)
    for i in _range(sigmas, disable):
        denoised = _denoise(model, x, sigmas, i, extra_args, callback)
        x = heun_step(model, x, denoised, batch_sigma(sigmas[i], x), batch_sigma(sigmas[i + 1], x), extra_args)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                    callback: Callback | None = None, disable: bool | None = None,
                    generator: torch.Generator | None = None) -> Tensor:
    """DPM-Solver++(2M): second order from the second step on, one evaluation per step."""
    sigmas = sigmas.to(x.device, x.dtype)
    old = None
    for i in _range(sigmas, disable):
        denoised = _denoise(model, x, sigmas, i, extra_args, callback)
        x = dpmpp_2m_step(x, denoised, sigmas[i], sigmas[i + 1], old, sigmas[i - 1] if i > 0 else None)
        old = denoised
    return x


@torch.no_grad()
def sample_ddpm(model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                callback: Callback | None = None, disable: bool | None = None,
                generator: torch.Generator | None = None, eta: float = 1.0) -> Tensor:
    """Stochastic DDPM / ancestral sampling (η = 1: the DDPM posterior on the chosen grid)."""
    sigmas = sigmas.to(x.device, x.dtype)
    for i in _range(sigmas, disable):
        denoised = _denoise(model, x, sigmas, i, extra_args, callback)
        x = ancestral_step(x, denoised, sigmas[i], sigmas[i + 1], _randn(x, generator), eta)
    return x


@torch.no_grad()
def sample_consistency(model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                       callback: Callback | None = None, disable: bool | None = None,
                       generator: torch.Generator | None = None, sigma_end: float = 0.0) -> Tensor:
    """Multistep consistency sampling (Song et al. 2023 Algorithm 1; LCM Algorithm 3): denoise with
    the consistency function ``model``, re-noise to the next σ, repeat."""
    sigmas = sigmas.to(x.device, x.dtype)
    for i in _range(sigmas, disable):
        denoised = _denoise(model, x, sigmas, i, extra_args, callback)
        noise = None if _is_zero(sigmas[i + 1]) else _randn(x, generator)
        x = consistency_step(denoised, sigmas[i + 1], noise, sigma_end)
    return x


@torch.no_grad()
def sample_ddim_stochastic(model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                           callback: Callback | None = None, disable: bool | None = None,
                           generator: torch.Generator | None = None) -> Tensor:
    """Meng et al. 2023's stochastic N-step sampler for (progressively) distilled models: every step but
    the last is :func:`stochastic_ddim_step` (DDIM to σ_{i+2}, noise back to σ_{i+1}); the last step,
    with no level after σ_{N} = 0 to skip to, is plain DDIM. One evaluation per step, as DDIM."""
    sigmas = sigmas.to(x.device, x.dtype)
    n = len(sigmas) - 1
    for i in _range(sigmas, disable):
        denoised = _denoise(model, x, sigmas, i, extra_args, callback)
        if i + 2 > n:
            x = ddim_step(x, denoised, sigmas[i], sigmas[i + 1])
        else:
            x = stochastic_ddim_step(x, denoised, sigmas[i], sigmas[i + 1], sigmas[i + 2], _randn(x, generator))
    return x


@torch.no_grad()
def sample_tcd(model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
               callback: Callback | None = None, disable: bool | None = None,
               generator: torch.Generator | None = None, gamma: float = TCD_GAMMA, schedule=None) -> Tensor:
    """TCD's strategic stochastic sampling (Zheng et al. 2024, Algorithm 4) = diffusers' ``TCDScheduler`` loop with
    ``eta`` = γ, on a discrete VP ``schedule`` (its integer timesteps decide s, :func:`tcd_timestep_s`). ``model``
    is the σ-space denoiser of an ε-prediction UNet: D(x, σ) = x − σ·ε̂, so x_s is f_θ(x_t, t, s). γ = 0 is
    deterministic (DDIM between the grid's levels), γ = 1 denoises fully each step and re-noises (multistep
    consistency sampling). Fresh noise is drawn only where TCDScheduler draws it (γ > 0, not the last step), from
    ``generator``, so the same seed gives its images.

    The last step ends at s = 0, the timestep-0 level σ_0 > 0 (scheduling_tcd.py:641–653: ``prev_timestep`` 0 is
    ᾱ_0, not 1), and TCDScheduler hands the VAE that VP sample √ᾱ_0·x_s: this sampler returns it too (a 0.04 %
    scale and σ_0·ε̂ ≈ 0.03 of noise apart from x̂_0 on SD's schedule), so its images are diffusers'."""
    if schedule is None:
        raise ValueError("sample_tcd needs the model's discrete VP schedule (its timesteps decide s)")
    sigmas = sigmas.to(x.device, x.dtype)
    table = schedule.sigmas.to(x.device)
    for i in _range(sigmas, disable):
        denoised = _denoise(model, x, sigmas, i, extra_args, callback)
        last = i == len(sigmas) - 2
        t_next = torch.zeros((), dtype=torch.long) if _is_zero(sigmas[i + 1]) else \
            schedule.sigma_to_t(sigmas[i + 1].double()).round().long()
        sigma_s = table[tcd_timestep_s(t_next, gamma)].to(x.dtype)
        noise = _randn(x, generator) if gamma > 0 and not last else None
        x = tcd_step(x, denoised, sigmas[i], sigma_s, sigmas[i + 1], noise)
        if last:
            x = x * vp_alpha_cumprod(sigma_s).sqrt()
    return x


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler by name, with its cost: network evaluations for an n-step grid ending in 0."""

    fn: Callable[..., Tensor]
    nfe: Callable[[int], int]
    stochastic: bool = False


SAMPLERS: dict[str, SamplerSpec] = {
    "ddim": SamplerSpec(sample_ddim, lambda n: n),
    "euler": SamplerSpec(sample_euler, lambda n: n),
    "heun": SamplerSpec(sample_heun, lambda n: 2 * n - 1),
    "dpmpp-2m": SamplerSpec(sample_dpmpp_2m, lambda n: n),
    "ddpm": SamplerSpec(sample_ddpm, lambda n: n, stochastic=True),
    "ddim-stochastic": SamplerSpec(sample_ddim_stochastic, lambda n: n, stochastic=True),
    "consistency": SamplerSpec(sample_consistency, lambda n: n, stochastic=True),
    "tcd": SamplerSpec(sample_tcd, lambda n: n, stochastic=True),
}


def get_sampler(name: str) -> SamplerSpec:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}") from None


def _is_zero(sigma: Tensor | float) -> bool:
    return bool((torch.as_tensor(sigma) == 0).all())


def _randn(x: Tensor, generator) -> Tensor:
    """Fresh noise like ``x`` from ``generator``: a ``torch.Generator``, or a noise source with its own layout
    (``randn_like``: FLUX's step noise is drawn on packed latents, :class:`fewstep.nets.flow_transformers.PackedNoise`)."""
    if hasattr(generator, "randn_like"):
        return generator.randn_like(x)
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
