"""Consistency-model boundary conditions, each written once (DESIGN.md §2).

A consistency function f(x, σ) maps any point of a PF-ODE trajectory to its origin. Both
families parameterize it as f = c_skip·x + c_out·F with c_skip → 1, c_out → 0 at the smallest
noise level, so the boundary condition holds by construction:

- :func:`cm_scalings`: Song et al. 2023 (arXiv 2303.01469), Appendix C, in EDM σ space, with
  f(x, σmin) = x exactly. Used with :class:`fewstep.denoisers.EDMDenoiser`.
- :func:`lcm_scalings`: Luo et al. 2023 (arXiv 2310.04378) eq. (9) on the discrete VP grid, in the
  form of diffusers' ``LCMScheduler.get_scalings_for_boundary_condition_discrete``
  (t scaled by ``timestep_scaling`` = 10). Used by :class:`LCMConsistency`.

The discretization curricula of consistency training live here too, shared by CD, CT, iCT and ACT:
the N-point Karras grid (:func:`karras_levels`), CT's N(k) and μ(k) (:func:`ct_num_scales`,
:func:`ct_target_ema`), iCT's doubling N(k) and lognormal level sampling (:func:`ict_num_scales`,
:func:`ict_level_probs`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .denoisers import VPDenoiser, append_dims


def cm_scalings(sigma: Tensor, sigma_data: float = 0.5, sigma_min: float = 0.002) -> tuple[Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in) of Song et al. 2023 Appendix C:
    c_skip = σd²/((σ−σmin)² + σd²), c_out = (σ−σmin)·σd/√(σ² + σd²), c_in = 1/√(σ² + σd²)."""
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = (sigma - sigma_min) * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
    return c_skip, c_out, c_in


def lcm_scalings(timestep: Tensor, timestep_scaling: float = 10.0, sigma_data: float = 0.5) -> tuple[Tensor, Tensor]:
    """(c_skip, c_out) of LCM on a discrete timestep t: with τ = t·timestep_scaling,
    c_skip = σd²/(τ² + σd²), c_out = τ/√(τ² + σd²)."""
    scaled = timestep * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2).sqrt()
    return c_skip, c_out


class LCMConsistency(nn.Module):
    """f(x, σ) = c_skip(t)·x_t + c_out(t)·x̂_0(x_t, t) of Luo et al. 2023 eq. (9), in σ space.

    ``denoiser`` is a :class:`~fewstep.denoisers.VPDenoiser` (its x̂_0 is the ε/v/x_0-to-x_0 map);
    LCM's c_skip multiplies the VP sample x_t = √ᾱ·x, so that is what is skipped here too.
    """

    def __init__(self, denoiser: VPDenoiser, timestep_scaling: float = 10.0) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.timestep_scaling = timestep_scaling

    def forward(self, x: Tensor, sigma: Tensor, **cond: Tensor) -> Tensor:
        x0 = self.denoiser(x, sigma, **cond)
        t = self.denoiser.schedule.sigma_to_t(sigma).to(x.dtype)
        c_skip, c_out = (append_dims(c, x.ndim) for c in lcm_scalings(t, self.timestep_scaling))
        x_t = x / append_dims((1 + sigma.to(x.dtype) ** 2).sqrt(), x.ndim)
        return c_skip * x_t + c_out * x0


# --- discretization curricula (Song et al. 2023 Appendix C; Song & Dhariwal 2023 §3) -------------
def karras_levels(index: Tensor, num_scales: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                  rho: float = 7.0) -> Tensor:
    """σ_i of the N-point Karras grid in *increasing* order (i = 0 → σmin, i = N−1 → σmax), as
    openai/consistency_models ``consistency_losses`` indexes it:
    σ_i = (σmin^{1/ρ} + i/(N−1)·(σmax^{1/ρ} − σmin^{1/ρ}))^ρ. ``index`` may be fractional."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (lo + index.double() / (num_scales - 1) * (hi - lo)) ** rho


def ct_num_scales(step: int, total_steps: int, s0: int = 2, s1: int = 150) -> int:
    """CT's N(k) = ⌈√(k/K·((s1+1)² − s0²) + s0²) − 1⌉ + 1 (Song et al. 2023, Appendix C, eq. 27)."""
    k = min(step, total_steps) / max(total_steps, 1)
    return math.ceil(math.sqrt(k * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1


def ct_target_ema(num_scales: int, s0: int = 2, mu0: float = 0.9) -> float:
    """CT's target EMA rate μ(k) = exp(s0·ln μ0 / N(k)) (Song et al. 2023, Appendix C, eq. 28)."""
    return math.exp(s0 * math.log(mu0) / num_scales)


def ict_num_scales(step: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT's doubling curriculum N(k) = min(s0·2^⌊k/K'⌋, s1) + 1, K' = ⌊K/(log2⌊s1/s0⌋ + 1)⌋
    (Song & Dhariwal 2023, §3.4, eq. 7)."""
    k_prime = max(1, math.floor(total_steps / (math.log2(s1 // s0) + 1)))
    return min(s0 * 2 ** (step // k_prime), s1) + 1


def ict_level_probs(num_scales: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                    p_mean: float = -1.1, p_std: float = 2.0) -> Tensor:
    """iCT's discretized lognormal over the N−1 adjacent pairs (σ_i, σ_{i+1}) (Song & Dhariwal 2023,
    §3.5): p(i) ∝ erf((ln σ_{i+1} − P_mean)/(√2·P_std)) − erf((ln σ_i − P_mean)/(√2·P_std))."""
    sigmas = karras_levels(torch.arange(num_scales), num_scales, sigma_min, sigma_max, rho)
    cdf = torch.erf((sigmas.log() - p_mean) / (math.sqrt(2) * p_std))
    probs = cdf[1:] - cdf[:-1]
    return probs / probs.sum()
