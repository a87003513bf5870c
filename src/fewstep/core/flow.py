"""Flow matching (rectified flow), the noise space of SD3 and FLUX, registered as one more parameterization.

Rectified flow (Liu et al. 2022; Esser et al. 2024, *Scaling Rectified Flow Transformers*, §2–3.1) interpolates
x_t = (1 − t)·x_0 + t·ε for t ∈ [0, 1], and the network predicts the velocity v = ε − x_0 at time t, fed as
``t · num_train_timesteps`` (diffusers' ``FlowMatchEulerDiscreteScheduler``: ``timesteps = sigmas * 1000``, its
"sigmas" being this t). In fewstep's σ space (x_σ = x_0 + σ·ε, :mod:`fewstep.core.schedules`) the same point is
x_σ = x_t / (1 − t), so

    σ = t / (1 − t),   t = σ / (1 + σ),   x_t = x_σ / (1 + σ),   x̂_0 = x_t − t·v̂,

i.e. the preconditioning c_in = 1/(1+σ), c_skip = 1/(1+σ), c_out = −σ/(1+σ) (:class:`FlowDenoiser`), and the
velocity loss ‖v̂ − (ε − x_0)‖² is the σ-space loss ‖D − x_0‖²/c_out² (:func:`fewstep.objectives.base.weighted_mse`).
An Euler step in σ space (:func:`fewstep.core.solvers.euler_step`) is then exactly the flow Euler step
x_{t'} = x_t + (t' − t)·v̂ of ``FlowMatchEulerDiscreteScheduler.step`` (tests/test_parameterizations.py).

Its consistency function is the same adapter: x̂_0 = x_t − t·v̂ meets f(x, 0) = x exactly at t = 0, which is how
diffusers' ``FlowMatchLCMScheduler`` reads a flow consistency model (boundary at σ = 0, re-noised along the flow).

Deviation: t = 1 is σ = ∞, which no σ-space arithmetic holds, so the grids stop at ``t_max`` = 1 − 10⁻⁵ (σ = 10⁵);
diffusers starts its first step at exactly t = 1. The first step then differs by at most 10⁻⁵ relative (the
later steps are the same formula); the prior at t_max is ε/(1 − t_max), diffusers' ε in x_t.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .denoisers import Preconditioned
from .parameterizations import NoiseSpace, register_space
from .schedules import append_zero


def flow_t(sigma: Tensor) -> Tensor:
    """Flow time of a σ-space level: t = σ/(1 + σ)."""
    return sigma / (1 + sigma)


def flow_sigma(t: Tensor) -> Tensor:
    """σ of a flow time: σ = t/(1 − t)."""
    return t / (1 - t)


def shift_time(t: np.ndarray | Tensor, shift: float) -> np.ndarray | Tensor:
    """diffusers' static time shift t ↦ s·t/(1 + (s − 1)·t) (Esser et al. 2024 eq. 23; ``shift`` in
    ``FlowMatchEulerDiscreteScheduler``: 3.0 for SD3): more steps spent at high noise."""
    return shift * t / (1 + (shift - 1) * t)


def dynamic_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                  max_shift: float = 1.15) -> float:
    """The static shift equal to FLUX's resolution-dependent one at ``image_seq_len`` packed tokens: FluxPipeline's
    ``calculate_shift`` gives μ linear in the token count, and the scheduler's exponential ``time_shift(μ, 1, t)`` =
    e^μ/(e^μ + 1/t − 1) is :func:`shift_time` with s = e^μ."""
    mu = base_shift + (max_shift - base_shift) / (max_seq_len - base_seq_len) * (image_seq_len - base_seq_len)
    return float(np.exp(mu))


@dataclass(frozen=True)
class FlowSchedule:
    """Rectified-flow noise levels: training t ~ logit-normal(m, s) then shifted (Esser et al. 2024 §3.1, "rf/lognorm
    (0.00, 1.00)" and the shift of SD3's scheduler); sampling grids as ``FlowMatchEulerDiscreteScheduler``.

    ``base_grid``: the unshifted times a pipeline hands its scheduler — "scheduler" (its own
    linspace(1, shift(1/T), n), as StableDiffusion3Pipeline leaves it) or "flux" (FluxPipeline's
    ``np.linspace(1, 1/n, n)``)."""

    shift: float = 1.0
    num_train_timesteps: int = 1000
    logit_mean: float = 0.0
    logit_std: float = 1.0
    t_max: float = 1 - 1e-5                     # the σ-space stand-in for t = 1 (module docstring)
    base_grid: str = "scheduler"                # "scheduler" (SD3) | "flux"

    @classmethod
    def from_diffusers_config(cls, config: dict, base_grid: str = "scheduler", image_seq_len: int | None = None
                              ) -> "FlowSchedule":
        """A flow-matching scheduler's config (FlowMatchEulerDiscreteScheduler's or FlowMatchLCMScheduler's) as the
        schedule of a pipeline whose ``base_grid`` it is; a dynamic (resolution-dependent, exponential) shift as the
        static shift it equals at ``image_seq_len`` tokens (:func:`dynamic_shift`): exact at that size (the model's
        own), where FluxPipeline would shift other sizes' grids differently."""
        from ..errors import FewstepError

        shift = float(config.get("shift", 1.0))
        if config.get("use_dynamic_shifting"):
            if config.get("time_shift_type", "exponential") != "exponential" or image_seq_len is None:
                raise FewstepError("this flow scheduler shifts its times linearly by resolution (time_shift_type "
                                   "linear); fewstep reads exponential (FLUX's) or static shifts")
            shift = dynamic_shift(image_seq_len, *(config.get(k, d) for k, d in (
                ("base_image_seq_len", 256), ("max_image_seq_len", 4096), ("base_shift", 0.5), ("max_shift", 1.15))))
        for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "shift_terminal",
                    "invert_sigmas"):
            if config.get(key):
                raise FewstepError(f"this flow scheduler sets {key}; fewstep samples flow models on the plain "
                                   f"shifted grid (FlowMatchEulerDiscreteScheduler's default)")
        return cls(shift=shift, num_train_timesteps=int(config.get("num_train_timesteps", 1000)), base_grid=base_grid)

    @property
    def sigmas(self) -> Tensor:
        """The σ of each training timestep i = 0..T−1 (t = shift((i + 1)/T), ``FlowMatchEulerDiscreteScheduler``'s
        ``sigmas`` in increasing order; t = 1 held at ``t_max``): the discrete grid LCD skips along."""
        T = self.num_train_timesteps
        return self.t_to_sigma(shift_time(torch.arange(1, T + 1, dtype=torch.float64) / T, self.shift))

    @property
    def t_min(self) -> float:
        """The scheduler's smallest time, shift(1/T) (its ``sigma_min``)."""
        return float(shift_time(1 / self.num_train_timesteps, self.shift))

    @property
    def sigma_min(self) -> float:
        return float(flow_sigma(torch.tensor(self.t_min, dtype=torch.float64)))

    @property
    def sigma_max(self) -> float:
        return float(flow_sigma(torch.tensor(self.t_max, dtype=torch.float64)))

    def t_to_sigma(self, t: Tensor) -> Tensor:
        return flow_sigma(t.to(torch.float64).clamp(0, self.t_max))

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        return flow_t(sigma)

    def prior_std(self, sigma: Tensor) -> Tensor:
        """x_t = ε at the top of the grid is x_σ = (1 + σ)·ε."""
        return 1 + torch.as_tensor(sigma)

    def sample_sigmas(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """t = shift(sigmoid(u)), u ~ N(m, s²) (SD3's logit-normal sampling), as σ."""
        u = torch.randn(n, generator=generator) * self.logit_std + self.logit_mean
        return self.t_to_sigma(shift_time(torch.sigmoid(u.double()), self.shift)).float()

    def times(self, n: int) -> np.ndarray:
        """The n decreasing times of ``FlowMatchEulerDiscreteScheduler.set_timesteps(n)`` (no dynamic shift):
        linspace(T·1, T·t_min, n)/T between the scheduler's own (already shifted) bounds, shifted once more, as it
        does; the first, t = 1, becomes t_max in σ (:meth:`t_to_sigma`)."""
        T = self.num_train_timesteps
        if self.base_grid == "flux":      # FluxPipeline: sigmas = np.linspace(1.0, 1 / n, n), then shifted
            return shift_time(np.linspace(1.0, 1 / n, n), self.shift)
        times = np.linspace(1.0 * T, self.t_min * T, n) / T
        return shift_time(times, self.shift)

    def grid(self, n: int) -> Tensor:
        return append_zero(self.t_to_sigma(torch.from_numpy(self.times(n)))).float()

    def sampling_grid(self, n: int, sampler: str | None = None, rho: float | None = None) -> Tensor:
        if rho is not None:
            raise ValueError("--rho sets the Karras grid of an EDM σ-space model; a flow model samples on its shifted "
                             "time grid (FlowMatchEulerDiscreteScheduler's)")
        return self.grid(n)

    @staticmethod
    def img2img_start(steps: int, strength: float) -> int:
        """The first level img2img runs from on an N-step grid, as diffusers' flow img2img pipelines round it
        (``FluxImg2ImgPipeline.get_timesteps`` / ``StableDiffusion3Img2ImgPipeline.get_timesteps``:
        t_start = ⌊N − N·strength⌋, the same float arithmetic), where the UNet pipelines take N − ⌊N·strength⌋."""
        return int(max(steps - min(steps * strength, steps), 0))

    def consistency_levels(self, index: Tensor, num_scales: int) -> Tensor:
        """Level i of an N-point consistency grid, increasing: N times uniform in [t_min, t_max], shifted — the
        flow analogue of the Karras grid (uniform steps in the time the model was trained on)."""
        u = self.t_min + torch.as_tensor(index).double() / (num_scales - 1) * (self.t_max - self.t_min)
        return self.t_to_sigma(shift_time(u, self.shift))


class FlowDenoiser(Preconditioned):
    """A velocity-predicting backbone as a σ-space denoiser (module docstring): ``net(x_t, t·T, **cond) -> v``."""

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in) = (1/(1+σ), −σ/(1+σ), 1/(1+σ))."""
        c_in = 1 / (1 + sigma)
        return c_in, -sigma * c_in, c_in

    def noise_input(self, sigma: Tensor) -> Tensor:
        """The backbone's timestep: t·T, as diffusers' flow pipelines pass ``scheduler.timesteps``."""
        return flow_t(sigma) * self.schedule.num_train_timesteps


register_space(NoiseSpace("flow", FlowSchedule, lambda net, schedule, options: FlowDenoiser(net, schedule), "flow",
                          lambda schedule: 0.0, "FlowMatchEulerDiscreteScheduler", "FlowMatchLCMScheduler",
                          default_sampler="euler"))
