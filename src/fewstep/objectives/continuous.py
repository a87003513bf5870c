"""Continuous-time consistency models: sCD and sCT (Lu & Song 2025, *Simplifying, Stabilizing and Scaling
Continuous-Time Consistency Models*, arXiv 2410.11081, Algorithm 1), one callable.

In TrigFlow (x_t = cos(t)·x_0 + sin(t)·z, z ~ N(0, σ_d²I); :mod:`fewstep.core.trigflow`) the consistency function
f_θ(x_t, t) = cos(t)·x_t − σ_d·sin(t)·F_θ(x_t/σ_d, t) is trained, in the limit of CD/CT's Δt → 0, by the gradient
of the surrogate (their eq. 8 with the §4 stabilisers)

    L(θ, φ) = e^{w_φ(t)}/D · ‖F_θ − F_θ⁻ − g‖² − w_φ(t),
    g = −cos²(t)·(σ_d·F_θ⁻ − dx_t/dt) − r·cos(t)·sin(t)·(x_t + σ_d·dF_θ⁻/dt),   g ← g/(‖g‖ + c),

where F_θ⁻ is F_θ under stop-gradient (no EMA target), dx_t/dt is the PF-ODE's velocity — the teacher's
σ_d·F_teacher(x_t/σ_d, t) at the guidance scale the student learns (sCD), or cos(t)·z − sin(t)·x_0 (sCT) — and
cos(t)·sin(t)·dF_θ⁻/dt is one JVP of F_θ⁻ in (x_t, t) with the tangent cos(t)·sin(t)·(dx_t/dt, 1)
(:func:`fewstep.core.tangents.jvp`, exact by forward-mode AD, or a finite difference). The stabilisers:
r = min(1, k/H) is the tangent warm-up, c = 0.1 the tangent normalisation, w_φ the adaptive weighting (a
small network of t, :class:`AdaptiveWeight`) and 1/(σ_d·tan t) the prior weighting; t is drawn as
σ_d·tan t ~ lognormal(P_mean, P_std) (P_mean = −1.0, P_std = 1.4).

Follows NVlabs/FastGen ``fastgen/methods/consistency_model/sCM.py`` (``_compute_scm_loss``, ``_scm_pred_to_loss``;
the paper's authors released no code) and its ``configs/methods/config_scm.py``. Where fewstep differs:
- ‖g‖ is the root-mean-square over the sample's D elements (FastGen's ``g_norm_spatial_invariance = True``, its
  default; the paper writes ‖g‖), and the squared error is the mean over D (the paper's 1/D); FastGen divides by D
  once more (``divide_x_0_spatial_dim``), a constant factor the learned w_φ absorbs (it shifts w_φ by ln D) and
  Adam is invariant to.
- w_φ has its own Adam (the run's learning rate, β = (0.9, 0.99), FastGen's optimizer betas) stepped after each
  student step, as ACT's discriminator is (:mod:`fewstep.objectives.adversarial`), so the saved student is the
  consistency model alone; FastGen's EDM networks carry it as a ``logvar`` head of the UNet.
- t is clamped to σ ∈ [σ_min, σ_max] of the student's schedule (0.002, 80 for EDM), FastGen's ``min_t``/``max_t``.
- The tangent warm-up H defaults to 2% of the run (FastGen's 10k of a 500k-iteration CIFAR-10 run) instead of a
  fixed 10k iterations: fewstep's runs are hundreds of steps.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..core.denoisers import append_dims
from ..core.tangents import jvp
from ..core.trigflow import trigflow_F
from .base import ConditionFn, TeacherFn, load_optimizer_state, optimizer_state, rng_state, set_rng_state, unwrap


class AdaptiveWeight(nn.Module):
    """w_φ(t) of sCM (Lu & Song 2025 §4.3, "adaptive weighting"): EDM2's uncertainty head (Karras et al. 2024,
    ``training/networks_edm2.py``: ``logvar_fourier = MPFourier(128)``, ``logvar_linear = MPConv(128, 1)``) — fixed
    random Fourier features of the time, then one linear layer. Starts at w = 0 (the linear layer is zero)."""

    def __init__(self, channels: int = 128, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", 2 * math.pi * torch.randn(channels, generator=g))
        self.register_buffer("phases", 2 * math.pi * torch.rand(channels, generator=g))
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: Tensor) -> Tensor:
        features = torch.cos(t.float()[:, None] * self.freqs + self.phases) * math.sqrt(2)
        return self.linear(features).squeeze(-1)


def tangent(F_minus: Tensor, dF_dt: Tensor, x_t: Tensor, dx_dt: Tensor, t: Tensor, sigma_data: float,
            warmup: float, const: float) -> Tensor:
    """sCM's normalised tangent g (module docstring; FastGen ``_scm_pred_to_loss``): ``dF_dt`` is
    cos(t)·sin(t)·dF_θ⁻/dt, the JVP with the cos·sin-scaled tangent."""
    t64 = t.to(torch.float64)
    cos, sin = (append_dims(v.to(x_t.dtype), x_t.ndim) for v in (torch.cos(t64), torch.sin(t64)))
    g = -cos * cos * (sigma_data * F_minus - dx_dt) - warmup * (cos * sin * x_t + sigma_data * dF_dt)
    norm = g.flatten(1).square().mean(1).sqrt()
    return g / append_dims(norm + const, g.ndim)


class ContinuousConsistencyLoss:
    """The sCD / sCT objective for :func:`fewstep.training.train` (module docstring).

    ``teacher`` (sCD) maps the student's conditioning to ``(denoiser, extra_args)`` of the teacher's (guided)
    PF-ODE, as for :class:`fewstep.objectives.consistency.ConsistencyLoss`; None: sCT. ``schedule`` is the student's
    (σ_d, σ_min, σ_max). ``total_steps`` sets the default tangent warm-up."""

    def __init__(self, schedule, total_steps: int, teacher: TeacherFn | None = None,
                 condition: ConditionFn | None = None, p_mean: float = -1.0, p_std: float = 1.4,
                 tangent_warmup: int | None = None, tangent_const: float = 0.1, adaptive_weighting: bool = True,
                 prior_weighting: bool = True, jvp_method: str = "auto", lr: float = 1e-4) -> None:
        self.schedule = schedule
        self.sigma_data = float(schedule.sigma_data)
        self.teacher = teacher
        self.condition = condition or (lambda batch: {})
        self.p_mean, self.p_std = p_mean, p_std
        self.warmup_steps = tangent_warmup if tangent_warmup is not None else max(1, math.ceil(0.02 * total_steps))
        self.tangent_const = tangent_const
        self.prior_weighting = prior_weighting
        self.jvp_method = jvp_method
        self.weighting = AdaptiveWeight() if adaptive_weighting else None
        self.optimizer = (torch.optim.Adam(self.weighting.parameters(), lr=lr, betas=(0.9, 0.99))
                          if self.weighting is not None else None)
        self.step = 0
        self._logs: dict[str, float] = {}

    def sample_t(self, n: int, device) -> Tensor:
        """t = arctan(σ/σ_d), ln σ ~ N(P_mean, P_std²), σ within the schedule's range (FastGen's
        ``t_hat = atan2(sigma_t, alpha_t·sigma_data)``)."""
        sigma = (torch.randn(n) * self.p_std + self.p_mean).exp()
        sigma = sigma.clamp(float(self.schedule.sigma_min), float(self.schedule.sigma_max))
        return torch.atan(sigma.double() / self.sigma_data).float().to(device)

    def warmup(self) -> float:
        """r = min(1, k/H): the tangent warm-up (Lu & Song 2025 §4.2)."""
        return min(1.0, self.step / self.warmup_steps)

    def velocity(self, x0: Tensor, z: Tensor, x_t: Tensor, t: Tensor, cond: dict) -> Tensor:
        """dx_t/dt of the PF-ODE: the teacher's σ_d·F (sCD) or the forward process's cos(t)·z − sin(t)·x_0 (sCT)."""
        if self.teacher is not None:
            den, extra = self.teacher(cond)
            return self.sigma_data * trigflow_F(den, x_t, t, self.sigma_data, **extra)
        cos, sin = (append_dims(v, x0.ndim) for v in (torch.cos(t), torch.sin(t)))
        return cos * z - sin * x0

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        x0 = batch["images"]
        cond = self.condition(batch)
        t = self.sample_t(len(x0), x0.device)
        z = torch.randn_like(x0) * self.sigma_data
        cos, sin = (append_dims(v, x0.ndim) for v in (torch.cos(t), torch.sin(t)))
        x_t = cos * x0 + sin * z
        with torch.no_grad():
            dx_dt = self.velocity(x0, z, x_t, t, cond)
        student, sd = unwrap(model), self.sigma_data
        rng = rng_state(x0.device)
        F_online = trigflow_F(model, x_t, t, sd, **cond)
        set_rng_state(rng)            # F_θ⁻ and its tangent with the online pass's dropout mask
        scale = torch.cos(t) * torch.sin(t)
        F_minus, dF_dt = jvp(lambda x, s: trigflow_F(student, x, s, sd, **cond), (x_t, t),
                             (append_dims(scale, x0.ndim) * dx_dt, scale), self.jvp_method)
        g = tangent(F_minus, dF_dt, x_t, dx_dt, t, sd, self.warmup(), self.tangent_const)
        error = (F_online.float() - F_minus.float() - g.float()).flatten(1).square().mean(1)
        weight = 1 / (sd * torch.tan(t.double())).float() if self.prior_weighting else torch.ones_like(t)
        logvar = self.weighting.to(x0.device)(t) if self.weighting is not None else torch.zeros_like(t)
        loss = (weight * torch.exp(-logvar) * error + logvar).mean()
        self._logs = {"tangent_warmup": self.warmup(), "scm_error": float(error.detach().mean()),
                      "logvar": float(logvar.detach().mean())}
        return loss, dict(self._logs)

    # --- trainer hooks -------------------------------------------------------------------------
    def after_step(self, model: nn.Module, step: int) -> None:
        """The step counter (the warm-up's k) and w_φ's own Adam step on the gradient the student's backward left."""
        self.step = step
        if self.optimizer is None:
            return
        if dist.is_available() and dist.is_initialized():
            for p in self.weighting.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= dist.get_world_size()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Tensor]:
        state = {"step": torch.tensor(self.step)}
        if self.weighting is not None:
            state.update({f"weighting.{k}": v for k, v in self.weighting.state_dict().items()})
            state.update(optimizer_state(self.optimizer, "wopt."))
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.step = int(state["step"])
        if self.weighting is not None:
            self.weighting.load_state_dict({k[10:]: v for k, v in state.items() if k.startswith("weighting.")})
            load_optimizer_state(self.optimizer, state, "wopt.")

