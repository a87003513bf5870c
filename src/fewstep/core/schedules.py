"""Noise schedules: what noise levels exist, for training and for sampling.

fewstep works in the "σ space" of Karras et al. 2022 (EDM, arXiv 2206.00364, §2):
x_σ = x_0 + σ·ε.  A discrete variance-preserving (VP) model sees x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε,
which is the same point scaled by √ᾱ_t, with σ_t = √((1−ᾱ_t)/ᾱ_t) (EDM eq. 1 / Table 1).
Every sampler and objective in fewstep therefore takes σ; VP models convert σ back to their
timestep at the edge (:class:`fewstep.denoisers.VPDenoiser`).

A schedule object has exactly two jobs (the smalldiffusion style):
``sample_sigmas`` draws noise levels for training, ``grid`` returns a decreasing sampling grid
that ends in 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor

BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
TimestepSpacing = Literal["leading", "trailing", "linspace"]


def make_betas(
    kind: BetaSchedule, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> Tensor:
    """β_t of a discrete DDPM schedule, in float64, with the names and formulas of diffusers.

    - ``linear``: Ho et al. 2020 (β from 1e-4 to 0.02).
    - ``scaled_linear``: Stable Diffusion's (√β linear from √0.00085 to √0.012).
    - ``squaredcos_cap_v2``: Nichol & Dhariwal 2021 cosine ᾱ(t) = cos²((t+s)/(1+s)·π/2), s=0.008,
      β capped at 0.999 (diffusers' ``betas_for_alpha_bar``).
    """
    n = num_train_timesteps
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
    if kind == "squaredcos_cap_v2":
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return torch.tensor([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)],
                            dtype=torch.float64)
    raise ValueError(f"unknown beta schedule {kind!r}; choose linear, scaled_linear or squaredcos_cap_v2")


def vp_sigma(alphas_cumprod: Tensor) -> Tensor:
    """σ = √((1−ᾱ)/ᾱ): the σ-space noise level of a VP noise level ᾱ."""
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def vp_alpha_cumprod(sigma: Tensor) -> Tensor:
    """ᾱ = 1/(1+σ²): the inverse of :func:`vp_sigma`."""
    return 1 / (1 + sigma**2)


def karras_levels(index: Tensor, num_scales: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                  rho: float = 7.0) -> Tensor:
    """Karras et al. 2022 eq. (5), the one formula of the Karras grid, in *increasing* order as
    openai/consistency_models ``consistency_losses`` indexes it (i = 0 → σmin, i = N−1 → σmax):
    σ_i = (σmin^{1/ρ} + i/(N−1)·(σmax^{1/ρ} − σmin^{1/ρ}))^ρ, float64. ``index`` may be fractional."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (lo + torch.as_tensor(index).double() / (num_scales - 1) * (hi - lo)) ** rho


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """The n-level Karras grid from σmax down to σmin (no 0): :func:`karras_levels` read backwards."""
    return karras_levels(torch.arange(n - 1, -1, -1), n, sigma_min, sigma_max, rho)


def append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def spaced_timesteps(n: int, num_train_timesteps: int = 1000, spacing: TimestepSpacing = "trailing",
                     steps_offset: int = 0) -> Tensor:
    """Decreasing integer timesteps for an ``n``-step sampler, as diffusers' ``timestep_spacing``.

    ``trailing`` (Lin et al. 2023, "Common diffusion noise schedules are flawed", Table 2) starts at
    the last training timestep, which is what few-step sampling needs; ``leading`` is the DDIM
    paper's; ``linspace`` is DPM-Solver's.
    """
    if not 1 <= n <= num_train_timesteps:
        raise ValueError(f"steps must be between 1 and {num_train_timesteps}, got {n}")
    T = num_train_timesteps
    if spacing == "leading":
        ts = (np.arange(0, n) * (T // n)).round()[::-1] + steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / n)) - 1
    elif spacing == "linspace":
        ts = np.linspace(0, T - 1, n).round()[::-1]
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}")
    return torch.from_numpy(ts.astype(np.int64).copy())


def skipped_timesteps(num_train_timesteps: int, skip: int) -> Tensor:
    """LCM's skipped grid {k−1, 2k−1, …, T−1} (Luo et al. 2023 §4.3), increasing: the timesteps LCD
    trains on and LCM samples on (:func:`lcm_timesteps`)."""
    return torch.arange(1, num_train_timesteps // skip + 1) * skip - 1


def lcm_timesteps(n: int, original_steps: int = 50, num_train_timesteps: int = 1000, strength: float = 1.0) -> Tensor:
    """The LCM inference grid (Luo et al. 2023 §4.3; diffusers ``LCMScheduler.set_timesteps``).

    The skipped grid with k = T // original_steps (:func:`skipped_timesteps`) is the grid the model
    was distilled on; ``n`` evenly spaced indices of it (in decreasing order) are sampled.
    ``strength`` < 1 keeps only the lower ⌊original_steps·strength⌋ of it, for img2img.
    """
    origin = skipped_timesteps(num_train_timesteps, num_train_timesteps // original_steps)[:int(original_steps * strength)]
    if n < 1 or n > len(origin):
        raise ValueError(
            f"{n} steps cannot be served by an LCM grid of {len(origin)} timesteps "
            f"(original_steps={original_steps}, strength={strength}); use 1..{len(origin)} steps")
    origin = origin.flip(0)
    idx = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
    return origin[torch.from_numpy(idx)]


@dataclass(frozen=True)
class VPSchedule:
    """A discrete 1000-step VP (DDPM) schedule, as used by Stable Diffusion and diffusers UNets."""

    beta_schedule: BetaSchedule = "linear"
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    alphas_cumprod: Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        betas = make_betas(self.beta_schedule, self.num_train_timesteps, self.beta_start, self.beta_end)
        object.__setattr__(self, "alphas_cumprod", torch.cumprod(1 - betas, dim=0))

    @classmethod
    def from_diffusers_config(cls, config: dict) -> "VPSchedule":
        """Build from a diffusers scheduler config (``scheduler/scheduler_config.json``)."""
        return cls(beta_schedule=config.get("beta_schedule", "linear"),
                   num_train_timesteps=config.get("num_train_timesteps", 1000),
                   beta_start=config.get("beta_start", 1e-4), beta_end=config.get("beta_end", 0.02))

    @property
    def sigmas(self) -> Tensor:
        """σ_t for t = 0 … T−1 (increasing), float64."""
        return vp_sigma(self.alphas_cumprod)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """σ at (possibly fractional) timesteps t, interpolating log σ linearly between integers."""
        log_sigmas = self.sigmas.log()
        t = t.to(torch.float64).clamp(0, self.num_train_timesteps - 1)
        lo = t.floor().long()
        hi = (lo + 1).clamp(max=self.num_train_timesteps - 1)
        w = t - lo
        return ((1 - w) * log_sigmas[lo] + w * log_sigmas[hi]).exp()

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """The inverse of :meth:`t_to_sigma` (k-diffusion's ``DiscreteSchedule.sigma_to_t``): σ on the
        grid maps to its integer t exactly; σ outside [σ_0, σ_{T−1}] is clamped to the ends. The bracketing
        index is ``searchsorted``'s (left), written as the count of grid levels below σ: ONNX has no
        searchsorted, and ``fewstep serve`` exports this to ONNX Runtime."""
        log_sigmas = self.sigmas.log()
        log_sigma = sigma.to(torch.float64).log().clamp(log_sigmas[0], log_sigmas[-1])
        hi = (log_sigmas < log_sigma[..., None]).sum(-1).clamp(1, self.num_train_timesteps - 1)
        lo = hi - 1
        w = (log_sigma - log_sigmas[lo]) / (log_sigmas[hi] - log_sigmas[lo])
        return (lo + w.clamp(0, 1)).to(sigma.dtype if sigma.is_floating_point() else torch.float32)

    def prior_std(self, sigma: Tensor) -> Tensor:
        """Std of the σ-space start x = z/√ᾱ, z ~ N(0, I): the VP prior at σ, √(1 + σ²), as diffusers'
        pipelines draw their initial latents (``init_noise_sigma`` = 1 in VP space)."""
        return vp_alpha_cumprod(sigma).rsqrt()

    # -- the two jobs --------------------------------------------------------------------------
    def sample_sigmas(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Training noise levels: t ~ U{0..T−1} (Ho et al. 2020, Algorithm 1), returned as σ_t."""
        t = torch.randint(0, self.num_train_timesteps, (n,), generator=generator)
        return self.sigmas[t].float()

    def grid(self, n: int, spacing: TimestepSpacing = "trailing") -> Tensor:
        """An ``n``-step sampling grid: σ at diffusers-spaced timesteps, then 0."""
        return append_zero(self.sigmas[spaced_timesteps(n, self.num_train_timesteps, spacing)]).float()

    def karras_grid(self, n: int, rho: float = 7.0) -> Tensor:
        """Karras σ grid spanning this schedule's own σ range (diffusers' ``use_karras_sigmas``)."""
        return append_zero(karras_sigmas(n, self.sigma_min, self.sigma_max, rho)).float()

    def sampling_grid(self, n: int, sampler: str | None = None, rho: float | None = None) -> Tensor:
        """The grid every sampler of a VP model runs on: :meth:`grid` (``rho`` belongs to EDM σ-space models)."""
        if rho is not None:
            raise ValueError("--rho sets the Karras grid of an EDM σ-space model; this model samples on a VP grid")
        return self.grid(n)

    def consistency_levels(self, index: Tensor, num_scales: int) -> Tensor:
        """Level i of an N-point consistency grid, increasing: σ at N timesteps evenly spaced over 0 … T−1
        (LCD instead trains on the skipped grid, ``Curriculum("lcm")``)."""
        t = torch.as_tensor(index).double() / (num_scales - 1) * (self.num_train_timesteps - 1)
        return self.t_to_sigma(t)


@dataclass(frozen=True)
class EDMSchedule:
    """Continuous σ noise levels of Karras et al. 2022 (EDM), used by pixel-space CM/CT/ACT models.

    Defaults are EDM's Table 1: σ ∈ [0.002, 80], ρ = 7, σ_data = 0.5, ln σ ~ N(−1.2, 1.2²).
    """

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2

    def prior_std(self, sigma: Tensor) -> Tensor:
        """Std of the σ-space start at σmax: σ (EDM Algorithm 1, line 1: x_0 ~ N(0, σ_0² I))."""
        return torch.as_tensor(sigma)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """EDM's model time is σ itself (σ(t) = t, Karras et al. 2022 Table 1); the network sees c_noise = ¼ ln σ."""
        return torch.as_tensor(t)

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        return torch.as_tensor(sigma)

    def sampling_grid(self, n: int, sampler: str | None = None, rho: float | None = None) -> Tensor:
        """DDIM's uniform-timestep grid for ``ddim`` (so it differs from Euler only in its discretization, as in
        Karras et al. 2022 Table 1), the Karras grid (of ``rho``, default the schedule's) for every other sampler."""
        if rho is None and sampler == "ddim":
            return self.ddim_grid(n)
        return self.grid(n, rho)

    def consistency_levels(self, index: Tensor, num_scales: int) -> Tensor:
        """Level i of the N-point Karras grid, increasing (:func:`karras_levels`)."""
        return karras_levels(index, num_scales, self.sigma_min, self.sigma_max, self.rho)

    def sample_sigmas(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Training noise levels: ln σ ~ N(P_mean, P_std²) (EDM Table 1, "Noise distribution")."""
        return (torch.randn(n, generator=generator) * self.p_std + self.p_mean).exp()

    def grid(self, n: int, rho: float | None = None) -> Tensor:
        """An ``n``-step sampling grid: the EDM eq. (5) grid of n+1 levels from σmax to σmin with its
        last level (σmin) replaced by 0. Every step does work; the usual "n levels, then 0" wastes the
        last step on σmin → 0, which matters at 1–4 steps."""
        sigmas = karras_sigmas(n + 1, self.sigma_min, self.sigma_max, self.rho if rho is None else rho)
        return append_zero(sigmas[:-1]).float()

    def ddim_grid(self, n: int) -> Tensor:
        """DDIM's own discretization, as Karras et al. 2022 (Table 1, "DDIM" column) define it for a
        σ-space model: the σ of the 1000-step linear-β DDPM schedule at ``n`` uniformly spaced timesteps,
        restricted to this schedule's [σmin, σmax], the last replaced by 0 (as in :meth:`grid`)."""
        sigmas = VPSchedule("linear").sigmas
        inside = ((sigmas >= self.sigma_min) & (sigmas <= self.sigma_max)).nonzero().flatten()
        lo, hi = int(inside[0]), int(inside[-1])
        idx = torch.linspace(hi, lo, n + 1, dtype=torch.float64).round().long()[:-1]
        return append_zero(sigmas[idx]).float()
