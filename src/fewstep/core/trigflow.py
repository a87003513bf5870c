"""TrigFlow, the noise space of continuous-time consistency models (Lu & Song 2025, *Simplifying, Stabilizing and
Scaling Continuous-Time Consistency Models*, arXiv 2410.11081, §2 and §3), registered as one more parameterization.

x_t = cos(t)·x_0 + sin(t)·σ_d·z for t ∈ [0, π/2], and the network F_θ(x_t/σ_d, c_noise(t)) predicts
σ_d·F = cos(t)·σ_d·z − sin(t)·x_0 (the "v" of TrigFlow), so x̂_0 = cos(t)·x_t − sin(t)·σ_d·F_θ (their eq. 6 with the
consistency parameterization f_θ(x_t, t) = cos(t)·x_t − sin(t)·σ_d·F_θ, which meets f(x, 0) = x exactly). In
fewstep's σ space (x_σ = x_0 + σ·z) the same point is x_σ = x_t/cos(t):

    σ = σ_d·tan(t),   t = arctan(σ/σ_d),   c_skip = cos²t,   c_out = −σ_d·sin t,   c_in = cos t/σ_d,

which is EDM's preconditioning (Karras et al. 2022, Table 1) with F's sign flipped and c_noise(t) = t: the paper's
remark that TrigFlow "unifies EDM and flow matching". diffusers' ``SCMScheduler`` runs such a model
(``pred_x0 = cos(s)·sample − sin(s)·model_output`` on ``sample`` = x_t/σ_d). Training levels: ln σ = ln(σ_d·tan t)
~ N(P_mean, P_std²) (the paper's proposal distribution, P_mean = −1.0, P_std = 1.4 on CIFAR-10 / ImageNet 64).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .denoisers import Preconditioned, append_dims
from .parameterizations import SPACES, NoiseSpace, Parameterization, register, register_space
from .schedules import EDMSchedule


@dataclass(frozen=True)
class TrigFlowSchedule(EDMSchedule):
    """TrigFlow levels: EDM's σ range, Karras grids and lognormal training levels (with sCM's P_mean, P_std), the
    model time t = arctan(σ/σ_d), the prior σ_d·z at t_max, and sCM's 2-step grid through the intermediate time
    (``SCMScheduler``'s ``intermediate_timesteps`` = 1.3)."""

    p_mean: float = -1.0
    p_std: float = 1.4
    intermediate_t: float = 1.3

    def t_to_sigma(self, t: Tensor) -> Tensor:
        return self.sigma_data * torch.tan(t.to(torch.float64))

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        return torch.atan(sigma / self.sigma_data)

    def prior_std(self, sigma: Tensor) -> Tensor:
        """x_t = σ_d·z at the top is x_σ = σ_d·z/cos t: std √(σ² + σ_d²)."""
        sigma = torch.as_tensor(sigma)
        return (sigma**2 + self.sigma_data**2).sqrt()

    def grid(self, n: int, rho: float | None = None) -> Tensor:
        if n == 2 and rho is None:   # sCM's 2-step sampler: t_max, then the intermediate time (SCMScheduler)
            mid = self.t_to_sigma(torch.tensor(self.intermediate_t)).float()
            return torch.tensor([self.sigma_max, float(mid), 0.0])
        return super().grid(n, rho)


class TrigFlowDenoiser(Preconditioned):
    """A TrigFlow backbone ``net(x_t/σ_d, t, **cond) -> F`` as a σ-space denoiser (module docstring)."""

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        t = self.schedule.sigma_to_t(sigma)
        sd = self.schedule.sigma_data
        return torch.cos(t) ** 2, -sd * torch.sin(t), torch.cos(t) / sd

    def noise_input(self, sigma: Tensor) -> Tensor:
        """c_noise(t) = t (Lu & Song 2025, TrigFlow's time conditioning)."""
        return self.schedule.sigma_to_t(sigma)


def trigflow_F(denoiser, x_t: Tensor, t: Tensor, sigma_data: float = 0.5, **cond) -> Tensor:
    """The TrigFlow network output F(x_t/σ_d, t) of any σ-space denoiser, by SNR matching: x_t = cos(t)·x_0 +
    sin(t)·σ_d·z is the σ-space point x_σ = x_t/cos t at σ = σ_d·tan t (same signal-to-noise ratio), and with
    x̂_0 = D(x_σ, σ) the consistency parameterization x̂_0 = cos(t)·x_t − σ_d·sin(t)·F gives

        F = (cos(t)·x_t − x̂_0) / (σ_d·sin t),

    the conversion NVlabs/FastGen's ``TrigFlowPrecond`` makes of an EDM/VP/flow network
    (``fastgen/methods/consistency_model/sCM.py``: ``_convert_trigflow_to_net_input`` then ``x0_to_flow``/σ_d;
    Lu & Song 2025 §2: TrigFlow unifies EDM and flow matching). ``t`` is ``[batch]`` in (0, π/2); the per-sample
    coefficients are formed in float64 (forward-mode AD passes through them: sCM's tangent is a JVP of this
    function in (x_t, t)). For an EDM or TrigFlow denoiser F is its backbone's output (negated for EDM)."""
    t64 = t.to(torch.float64)
    cos, sin = torch.cos(t64), torch.sin(t64)
    x0 = denoiser(x_t / append_dims(cos.to(x_t.dtype), x_t.ndim), (sigma_data * torch.tan(t64)).to(x_t.dtype), **cond)
    return (append_dims(cos.to(x_t.dtype), x_t.ndim) * x_t - x0) / append_dims((sigma_data * sin).to(x_t.dtype), x_t.ndim)


TRIGFLOW = register_space(NoiseSpace("trigflow", TrigFlowSchedule, lambda net, schedule, options: TrigFlowDenoiser(net, schedule),
                          "trigflow", lambda schedule: 0.0, "SCMScheduler", "SCMScheduler", default_sampler="euler"))
# sCM's students of EDM teachers: TrigFlow's consistency function x̂_0 = cos(t)·x_t − σ_d·sin(t)·F on the teacher's
# EDM-preconditioned backbone, F = −F_EDM with c_noise = ¼·ln(σ_d·tan t) (EDM's c_skip = cos²t and c_in = cos t/σ_d are
# TrigFlow's; TrigFlowDenoiser's docstring): the conversion Lu & Song 2025 make of EDM/EDM2 models (§5, "we convert the
# pretrained EDM models to TrigFlow") and FastGen's TrigFlowPrecond, so the student starts as the teacher exactly.
register(Parameterization("trigflow-edm", TRIGFLOW, SPACES["edm"].build))   # EDM's own adapter
