"""Consistency-model boundary conditions, each written once (DESIGN.md §2).

A consistency function f(x, σ) maps any point of a PF-ODE trajectory to its origin. Both
families parameterize it as f = c_skip·x + c_out·F with c_skip → 1, c_out → 0 at the smallest
noise level, so the boundary condition holds by construction:

- :func:`cm_scalings`: Song et al. 2023 (arXiv 2303.01469), Appendix C, in EDM σ space, with
  f(x, σmin) = x exactly. Used with :class:`fewstep.denoisers.EDMDenoiser`.
- :func:`lcm_scalings`: Luo et al. 2023 (arXiv 2310.04378) eq. (9) on the discrete VP grid, in the
  form of diffusers' ``LCMScheduler.get_scalings_for_boundary_condition_discrete``
  (t scaled by ``timestep_scaling`` = 10). Used by :class:`LCMConsistency`.
"""

from __future__ import annotations

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
