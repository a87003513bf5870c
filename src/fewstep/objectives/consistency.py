"""Consistency distillation and training losses (Song et al. 2023; Song & Dhariwal 2023), one callable.

CD, CT and iCT are the same loss (Song et al. 2023, eq. 7 and 10),

    E[ λ(σ_n, σ_{n+1}) · d( f_θ(x + σ_{n+1}·z, σ_{n+1}),  f_θ⁻(x̂_{σ_n}, σ_n) ) ],

on adjacent levels σ_n < σ_{n+1} of an N-point Karras grid; they differ only in
- how x̂_{σ_n} is made: one teacher ODE step (Euler or Heun) from x + σ_{n+1}·z (CD), or
  x + σ_n·z with the same z (CT, iCT: the one-sample estimate of the score);
- the curriculum N(k) and target EMA μ(k) (fixed for CD; CT's and iCT's schedules in
  :mod:`fewstep.objectives.curricula`; iCT's μ = 0: the target is the online network under stop-gradient);
- how the pair is drawn (uniform; iCT: discretized lognormal) and weighted (1; iCT: 1/(σ_{n+1} − σ_n));
  ECT (Geng et al. 2024) is CT with continuous pairs (t, r = r(t, stage)), 1/(t − r) weights and, where r is
  clamped to 0, the data itself as the target (the "ect" curriculum);
- the distance d (:mod:`fewstep.objectives.distances`).

Latent consistency distillation and fine-tuning (Luo et al. 2023, Algorithm 1; LCF §4.5) are the same
loss again, on the discrete VP grid: levels k timesteps apart on the skipped grid {k−1, 2k−1, …, T−1}
(the "lcm" curriculum), a teacher step with DDIM / DPM-Solver / DPM-Solver++ on the
classifier-free-guided ODE at a per-sample guidance scale that the student also takes as input
(see :mod:`fewstep.methods.lcm`), and a fixed target EMA μ = 0.95.

Structure follows openai/consistency_models ``cm/karras_diffusion.py: consistency_losses``: the same
dropout mask for the online and target branches (the RNG state is restored before the target pass),
the target network a separate EMA copy updated after each optimizer step (``after_step``; LCM-LoRA
keeps it as a second adapter on the one UNet instead, :class:`fewstep.nets.lora.EMAAdapter`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.denoisers import append_dims
from ..core.solvers import ODE_SOLVERS, ode_step
from .base import ConditionFn, TeacherFn, is_fsdp_module, rng_state, set_rng_state, unwrap
from .curricula import Curriculum
from .distances import Distance


class EMACopy:
    """The target network f_θ⁻ as a separate EMA copy of the student, made on first use (openai/
    consistency_models); while μ = 0 and no copy exists the target is the online network itself (iCT's
    stop-gradient). Another target (e.g. :class:`fewstep.nets.lora.EMAAdapter`) has the same four methods."""

    def __init__(self) -> None:
        self.net: nn.Module | None = None
        self._pending: dict[str, Tensor] | None = None   # a checkpoint's copy, loaded when the copy is made

    def __call__(self, model: nn.Module, mu: float) -> nn.Module:
        if mu == 0 and self.net is None:
            return unwrap(model)
        return self.make(model)

    def make(self, model: nn.Module) -> nn.Module:
        """The copy, made now from ``model``'s weights if it does not exist yet (the trainer makes it before FSDP
        shards the student, and shards it alike: :meth:`ConsistencyLoss.networks`)."""
        if self.net is None:
            self.net = copy.deepcopy(unwrap(model)).requires_grad_(False)
            if self._pending is not None:
                self.net.load_state_dict(self._pending)
                self._pending = None
        return self.net

    @torch.no_grad()
    def update(self, model: nn.Module, mu: float) -> None:
        """θ⁻ ← μ·θ⁻ + (1 − μ)·θ."""
        if self.net is None:
            return
        for t, p in zip(self.net.parameters(), unwrap(model).parameters()):
            t.lerp_(p.detach(), 1 - mu)
        for t, b in zip(self.net.buffers(), unwrap(model).buffers()):
            t.copy_(b)

    def state_dict(self) -> dict[str, Tensor]:
        return {} if self.net is None else self.net.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if self.net is not None:
            self.net.load_state_dict(state)
        else:
            self._pending = state


@dataclass
class Pair:
    """One batch's consistency pair: f_θ(x_{σ_{n+1}}), its target f_θ⁻(x̂_{σ_n}), the weights λ."""

    online: Tensor
    target: Tensor
    weight: Tensor
    sigma: Tensor          # σ_{n+1}, the online network's level
    cond: dict

    def loss(self, distance: Distance) -> Tensor:
        return (self.weight * distance(self.online, self.target)).mean()


class ConsistencyLoss:
    """The CD / CT / iCT objective for :func:`fewstep.training.train` (see the module docstring).

    ``condition`` maps a batch to the student's conditioning (None: unconditional), typically with some
    of it dropped to the unconditional input so that the student also learns the unconditional ODE (for
    zero-shot editing without a label). ``teacher`` (distillation only) maps that conditioning to
    ``(denoiser, extra_args)`` of the teacher's (guided) PF-ODE, e.g. ``lambda c: teacher.guided(c, 2.0)``;
    ``solver`` is its one-step ODE solver (:data:`fewstep.core.solvers.ODE_SOLVERS`).
    """

    def __init__(self, schedule, curriculum: Curriculum, distance: Distance,
                 teacher: TeacherFn | None = None, solver: str = "heun", condition: ConditionFn | None = None,
                 target: EMACopy | None = None) -> None:
        if solver not in ODE_SOLVERS:
            raise ValueError(f"unknown teacher solver {solver!r}; choose one of {', '.join(ODE_SOLVERS)}")
        self.schedule = schedule
        self.curriculum = curriculum
        self.distance = distance
        self.teacher = teacher
        self.solver = solver
        self.condition = condition or (lambda batch: {})
        self.step = 0                         # optimizer steps done (set by after_step, saved in checkpoints)
        self.target = target or EMACopy()     # the EMA target f_θ⁻

    # --- the loss ------------------------------------------------------------------------------
    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        pair = self.pair(model, batch)
        return pair.loss(self.distance), self.logs()

    def pair(self, model: nn.Module, batch: dict[str, Tensor]) -> "Pair":
        """The online output at σ_{n+1} and its (stop-gradient) target at σ_n for one batch."""
        x0 = batch["images"]
        cond = self.condition(batch)
        lo, hi = (s.to(x0.device) for s in self.curriculum.sample_pairs(len(x0), self.step, self.schedule))
        noise = torch.randn_like(x0)
        x_hi = x0 + append_dims(hi, x0.ndim) * noise
        rng = rng_state(x0.device)
        online = model(x_hi, hi, **cond)
        at_zero = append_dims(lo == 0, x0.ndim)
        with torch.no_grad():
            x_lo = self.teacher_step(x_hi, hi, lo, cond) if self.teacher else x0 + append_dims(lo, x0.ndim) * noise
            if bool(at_zero.all()) and not is_fsdp_module(self.target_network(model)):
                target = x_lo
            else:
                set_rng_state(rng)  # the same dropout mask in the target branch (openai/consistency_models)
                target = self.target_network(model)(x_lo, lo, **cond)
                # (under FSDP the network runs anyway: every process must take part in its parameters' all-gathers)
                # f(x, 0) = x: where a pair's lower level is 0 the target is x_lo itself, not the network there — for
                # CT pairs x_lo = x0, the data (ECT's clamped r = 0: locuslab/ect training/loss.py:70-79, whose
                # network at r = 0 is NaN where EDM's c_noise = ln r / 4 is −∞); where the network meets f(x, 0) = x
                # exactly (a flow student at t = 0) this changes nothing
                target = torch.where(at_zero, x_lo, target)
        return Pair(online, target.detach(), self.curriculum.weight(lo, hi), hi, cond)

    def teacher_step(self, x: Tensor, sigma: Tensor, sigma_next: Tensor, cond: dict) -> Tensor:
        """One step of the teacher's PF-ODE from σ_{n+1} down to σ_n (> 0) with ``self.solver``."""
        den, extra = self.teacher(cond)
        return ode_step(self.solver, den, x, sigma, sigma_next, extra)

    def target_network(self, model: nn.Module) -> nn.Module:
        """f_θ⁻ at the current μ (see :class:`EMACopy`)."""
        return self.target(model, self.curriculum.ema(self.step))

    def logs(self) -> dict[str, float]:
        name = self.curriculum.name
        grid = {"skip": self.curriculum.skip} if name == "lcm" else {"stage": self.curriculum.stage(self.step)} \
            if name == "ect" else {"num_scales": self.curriculum.scales(self.step)}
        return {**grid, "target_ema": self.curriculum.ema(self.step)}

    # --- trainer hooks -------------------------------------------------------------------------
    def networks(self, model: nn.Module) -> list[nn.Module]:
        """The networks this objective keeps beside ``model``: the EMA target copy where μ > 0 (made now, from the
        unsharded student; the trainer shards it as it shards the student under FSDP, so its update stays
        shard-local). A target of another kind (LCM-LoRA's second adapter) lives inside the student."""
        if not isinstance(self.target, EMACopy) or self.curriculum.ema(0) <= 0:
            return []
        return [self.target.make(model)]

    def after_step(self, model: nn.Module, step: int) -> None:
        """θ⁻ ← μ(k)·θ⁻ + (1 − μ(k))·θ after each optimizer step (Song et al. 2023, Algorithm 2/3)."""
        mu = self.curriculum.ema(self.step)
        self.step = step
        self.target.update(model, mu)

    def state_dict(self) -> dict[str, Tensor]:
        return {"step": torch.tensor(self.step), **{f"target.{k}": v for k, v in self.target.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.step = int(state["step"])
        target = {k[len("target."):]: v for k, v in state.items() if k.startswith("target.")}
        if target:
            self.target.load_state_dict(target)
