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

Every denoiser also tells its output scalings (c_skip, c_out), so an objective can put its loss
in the network's own output space (weight 1/c_out², EDM eq. 8).
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor, nn

from .schedules import VPSchedule

PredictionType = Literal["epsilon", "v_prediction", "sample"]


def append_dims(x: Tensor, ndim: int) -> Tensor:
    """Append singleton dims so a ``[batch]`` tensor broadcasts against an image batch."""
    return x.reshape(x.shape + (1,) * (ndim - x.ndim))


def edm_scalings(sigma: Tensor, sigma_data: float = 0.5) -> tuple[Tensor, Tensor, Tensor]:
    """EDM preconditioning (Karras et al. 2022, Table 1): (c_skip, c_out, c_in)."""
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
    return c_skip, c_out, c_in


def edm_noise_embedding(sigma: Tensor) -> Tensor:
    """EDM's c_noise(σ) = ¼·ln σ (Karras et al. 2022, Table 1)."""
    return sigma.log() / 4


class EDMDenoiser(nn.Module):
    """D(x; σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x; c_noise(σ)), with swappable c_skip/c_out.

    ``scalings`` maps σ to (c_skip, c_out, c_in); the default is EDM's, and
    :func:`fewstep.consistency.cm_scalings` gives a consistency model with f(x, σmin) = x.
    The backbone is a diffusers ``UNet2DModel``/``UNet2DConditionModel`` (``.sample`` of its output
    is taken) or any module returning a tensor.
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5,
                 scalings: Callable[..., tuple[Tensor, Tensor, Tensor]] | None = None) -> None:
        super().__init__()
        self.net = net
        self.sigma_data = sigma_data
        self.scalings_fn = scalings or edm_scalings

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.scalings_fn(sigma, self.sigma_data)

    def forward(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        sigma = sigma.to(x.dtype).expand(x.shape[0]) if sigma.ndim == 0 else sigma.to(x.dtype)
        c_skip, c_out, c_in = (append_dims(c, x.ndim) for c in self.scalings(sigma))
        out = _call(self.net, c_in * x, edm_noise_embedding(sigma), cond)
        return c_skip * x + c_out * out.to(x.dtype)


class VPDenoiser(nn.Module):
    """Adapter for a discrete-time VP diffusers UNet predicting ε, v or x_0.

    With ᾱ = 1/(1+σ²) the UNet sees x_t = √ᾱ·x at timestep t(σ), and its prediction is turned
    into x_0 (Salimans & Ho 2022 for v):
        ε:  x_0 = x − σ·ε̂
        v:  x_0 = ᾱ·x − σ√ᾱ·v̂
        x_0: x_0 = x̂_0
    which in EDM's notation is c_skip ∈ {1, ᾱ, 0}, c_out ∈ {−σ, −σ√ᾱ, 1}.
    """

    def __init__(self, net: nn.Module, schedule: VPSchedule, prediction_type: PredictionType = "epsilon") -> None:
        super().__init__()
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unknown prediction_type {prediction_type!r}; use epsilon, v_prediction or sample")
        self.net = net
        self.schedule = schedule
        self.prediction_type = prediction_type

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in) of this parameterization."""
        alpha_bar = 1 / (1 + sigma**2)
        c_in = alpha_bar.sqrt()
        if self.prediction_type == "epsilon":
            return torch.ones_like(sigma), -sigma, c_in
        if self.prediction_type == "v_prediction":
            return alpha_bar, -sigma * alpha_bar.sqrt(), c_in
        return torch.zeros_like(sigma), torch.ones_like(sigma), c_in

    def forward(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        sigma = sigma.to(x.dtype).expand(x.shape[0]) if sigma.ndim == 0 else sigma.to(x.dtype)
        c_skip, c_out, c_in = (append_dims(c, x.ndim) for c in self.scalings(sigma))
        t = self.schedule.sigma_to_t(sigma)
        out = _call(self.net, c_in * x, t, cond)
        return c_skip * x + c_out * out[:, : x.shape[1]].to(x.dtype)


def _call(net: nn.Module, x: Tensor, noise_cond: Tensor, cond: dict) -> Tensor:
    out = net(x, noise_cond, **cond)
    return out.sample if hasattr(out, "sample") else out
