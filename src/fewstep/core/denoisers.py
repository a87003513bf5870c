"""One model contract: ``denoiser(x, sigma, **cond) -> x0``.

``x`` lives in σ space (x = x_0 + σ·ε, see :mod:`fewstep.schedules`), ``sigma`` is a tensor of
shape ``[batch]`` and the result is the model's estimate of x_0 (Karras et al. 2022's D(x; σ)).
Samplers, objectives and editing only ever see this contract (the k-diffusion convention);
the wrappers below adapt a backbone to it:

- :class:`EDMDenoiser`: the EDM preconditioning (Karras et al. 2022, eq. 7 / Table 1), or the
  consistency-model boundary scalings (Song et al. 2023, eq. 7 / Appendix C), wrapping any
  backbone ``net(x, c_noise, **cond)``.
- :class:`VPDenoiser`: a discrete-time diffusers UNet (``UNet2DModel`` or
  ``UNet2DConditionModel``) that predicts ε, v or x_0 on a 1000-step VP schedule.
- :class:`LCMConsistency`: a latent consistency model's f(x, σ) over a :class:`VPDenoiser`.

The consistency boundary conditions are written here once (DESIGN.md §2), shared by training and sampling:

- :func:`cm_scalings`: Song et al. 2023 (arXiv 2303.01469), Appendix C, in EDM σ space, with
  f(x, σmin) = x exactly (used with :class:`EDMDenoiser`).
- :func:`lcm_scalings`: Luo et al. 2023 (arXiv 2310.04378) eq. (9) on the discrete VP grid, in the
  form of diffusers' ``LCMScheduler.get_scalings_for_boundary_condition_discrete``
  (t scaled by ``timestep_scaling`` = 10), used by :class:`LCMConsistency`.

Every denoiser also tells its output scalings (c_skip, c_out), so an objective can put its loss
in the network's own output space (weight 1/c_out², EDM eq. 8).
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor, nn

from .schedules import VPSchedule, vp_alpha_cumprod

PredictionType = Literal["epsilon", "v_prediction", "sample"]


def append_dims(x: Tensor | float, ndim: int) -> Tensor | float:
    """Append singleton dims so a ``[batch]`` tensor broadcasts against an image batch (a number or a
    0-dim tensor broadcasts as it is): the one broadcast helper of fewstep."""
    if not torch.is_tensor(x) or x.ndim == 0:
        return x
    return x.reshape(x.shape + (1,) * (ndim - x.ndim))


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP / compile wrapper."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def batch_sigma(sigma: Tensor, x: Tensor) -> Tensor:
    """σ as a ``[batch]`` tensor of ``x``'s batch size (a 0-dim σ is expanded)."""
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma


def edm_scalings(sigma: Tensor, sigma_data: float = 0.5) -> tuple[Tensor, Tensor, Tensor]:
    """EDM preconditioning (Karras et al. 2022, Table 1): (c_skip, c_out, c_in)."""
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
    return c_skip, c_out, c_in


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


def edm_noise_embedding(sigma: Tensor) -> Tensor:
    """EDM's c_noise(σ) = ¼·ln σ (Karras et al. 2022, Table 1)."""
    return sigma.log() / 4


class Preconditioned(nn.Module):
    """D(x; σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x; c_noise(σ)) (Karras et al. 2022, eq. 7): the one forward of
    every adapter of a backbone into the σ-space contract. A subclass says its ``scalings`` (c_skip, c_out, c_in)
    and ``noise_input`` (what the backbone is given as its time: ¼ ln σ, a VP timestep, flow time × 1000, …)."""

    def __init__(self, net: nn.Module, schedule=None) -> None:
        super().__init__()
        self.net = net
        self.schedule = schedule

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def noise_input(self, sigma: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        sigma = batch_sigma(sigma.to(x.dtype), x)
        c_skip, c_out, c_in = (append_dims(c, x.ndim) for c in self.scalings(sigma))
        out = _call(self.net, c_in * x, self.noise_input(sigma), cond)
        return c_skip * x + c_out * out[:, : x.shape[1]].to(x.dtype)


class EDMDenoiser(Preconditioned):
    """D(x; σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x; c_noise(σ)), with swappable c_skip/c_out.

    ``scalings`` maps σ to (c_skip, c_out, c_in); the default is EDM's, and
    :func:`cm_scalings` gives a consistency model with f(x, σmin) = x.
    The backbone is a diffusers ``UNet2DModel``/``UNet2DConditionModel`` (``.sample`` of its output
    is taken) or any module returning a tensor.
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5,
                 scalings: Callable[..., tuple[Tensor, Tensor, Tensor]] | None = None) -> None:
        super().__init__(net)
        self.sigma_data = sigma_data
        self.scalings_fn = scalings or edm_scalings

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.scalings_fn(sigma, self.sigma_data)

    def noise_input(self, sigma: Tensor) -> Tensor:
        return edm_noise_embedding(sigma)


class VPDenoiser(Preconditioned):
    """Adapter for a discrete-time VP diffusers UNet predicting ε, v or x_0.

    With ᾱ = 1/(1+σ²) the UNet sees x_t = √ᾱ·x at timestep t(σ), and its prediction is turned
    into x_0 (Salimans & Ho 2022 for v):
        ε:  x_0 = x − σ·ε̂
        v:  x_0 = ᾱ·x − σ√ᾱ·v̂
        x_0: x_0 = x̂_0
    which in EDM's notation is c_skip ∈ {1, ᾱ, 0}, c_out ∈ {−σ, −σ√ᾱ, 1}.
    """

    def __init__(self, net: nn.Module, schedule: VPSchedule, prediction_type: PredictionType = "epsilon") -> None:
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unknown prediction_type {prediction_type!r}; use epsilon, v_prediction or sample")
        super().__init__(net, schedule)
        self.prediction_type = prediction_type

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in) of this parameterization."""
        alpha_bar = vp_alpha_cumprod(sigma)
        c_in = alpha_bar.sqrt()
        if self.prediction_type == "epsilon":
            return torch.ones_like(sigma), -sigma, c_in
        if self.prediction_type == "v_prediction":
            return alpha_bar, -sigma * alpha_bar.sqrt(), c_in
        return torch.zeros_like(sigma), torch.ones_like(sigma), c_in

    def noise_input(self, sigma: Tensor) -> Tensor:
        return self.schedule.sigma_to_t(sigma)


class LCMConsistency(nn.Module):
    """f(x, σ) = c_skip(t)·x_t + c_out(t)·x̂_0(x_t, t) of Luo et al. 2023 eq. (9), in σ space.

    ``denoiser`` is a :class:`VPDenoiser` (its x̂_0 is the ε/v/x_0-to-x_0 map); LCM's c_skip multiplies
    the VP sample x_t = √ᾱ·x, so that is what is skipped here too.
    """

    def __init__(self, denoiser: VPDenoiser, timestep_scaling: float = 10.0) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.timestep_scaling = timestep_scaling

    @property
    def net(self) -> nn.Module:
        return self.denoiser.net

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.denoiser.scalings(sigma)

    def forward(self, x: Tensor, sigma: Tensor, **cond: Tensor) -> Tensor:
        sigma = batch_sigma(sigma.to(x.dtype), x)
        x0 = self.denoiser(x, sigma, **cond)
        t = self.denoiser.schedule.sigma_to_t(sigma).to(x.dtype)
        c_skip, c_out = (append_dims(c, x.ndim) for c in lcm_scalings(t, self.timestep_scaling))
        x_t = x * append_dims(vp_alpha_cumprod(sigma).sqrt(), x.ndim)
        return c_skip * x_t + c_out * x0


def _call(net: nn.Module, x: Tensor, noise_cond: Tensor, cond: dict) -> Tensor:
    """``net(x, c_noise, **cond)`` in the network's own precision (a half-precision UNet gets half inputs, an
    fp32 student the embeddings a bf16 teacher's text encoder made; the σ-space arithmetic around it stays in
    ``x``'s dtype)."""
    dtype = getattr(net, "dtype", None)
    if isinstance(dtype, torch.dtype):
        x = x.to(dtype)
        cond = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in cond.items()}
    out = net(x, noise_cond, **cond)
    return out.sample if hasattr(out, "sample") else out
