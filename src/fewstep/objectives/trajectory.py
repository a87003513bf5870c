"""Trajectory consistency distillation (Zheng et al. 2024, arXiv 2402.19159), one callable.

TCD is LCD (:class:`fewstep.objectives.consistency.ConsistencyLoss` on the "lcm" curriculum) with the consistency
function moved from "to x_0" to "to any earlier point x_s of the trajectory":

    f_θ(x_t, t, s) = D_θ + σ_s·(x_t − D_θ)/σ_t,   D_θ = x_t − σ_t·ε_θ(x_t, t)         (σ space)

the semi-linear (first-order exponential-integrator, = DDIM) step t → s with the student's ε (TCD §4.1, eq. 9;
``TCDScheduler.step``, scheduling_tcd.py:656–660): :func:`fewstep.core.solvers.ddim_step`, the same formula the
γ sampler (:func:`fewstep.core.solvers.tcd_step`) runs. The student is a plain ε-prediction UNet (no c_skip/c_out:
f(x_t, t, t) = x_t holds by the form of the step). The loss, per sample:

    t_{n+k} uniform on the skipped grid {k−1, 2k−1, …, T−1}, t_n = max(t_{n+k} − k, 0)      (as LCD)
    s = max(j·k − 1, 0),  j ~ U{0, …, n}           (s on the skipped grid, 0 ≤ s ≤ t_n)
    x̂_{t_n}  = one teacher step (DDIM / DPM-Solver / DPM-Solver++, guided) from x_{t_{n+k}}  (as LCD)
    L = d( √ᾱ_s·f_θ(x_{t_{n+k}}, t_{n+k}, s),  √ᾱ_s·f_θ⁻(x̂_{t_n}, t_n, s) )

How s is drawn and the distance taken on the VP latents x_s = √ᾱ_s·(σ-space x_s) follow the public third-party
TCD training scripts (rootonchair/consistency_models_distill ``tcd/train_tcd_distill_lora_sd_wds.py``:1270–1281
for s, :381–403 ``get_predicted_original_sample_tcd`` for f, :1402 for the distance); the official repository
(jabir-zheng/TCD) publishes no training code.

Deviations, each named: s = 0 is the timestep-0 level σ_0 > 0 (ᾱ_0 = 1 − β_0), not σ = 0, as in those scripts and in
TCDScheduler's last step; the target network is LCD's EMA target (μ = 0.95 here, diffusers' full-model default;
the third-party LoRA script uses the online network, μ = 0), so TCD-LoRA and LCM-LoRA are trained the same way
(``fewstep.methods.lcm``'s note on μ for LoRAs).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core.denoisers import append_dims
from ..core.schedules import vp_alpha_cumprod
from ..core.solvers import ddim_step
from .base import rng_state, set_rng_state
from .consistency import ConsistencyLoss, Pair


def trajectory_ends(schedule, hi: Tensor, skip: int, generator: torch.Generator | None = None) -> Tensor:
    """σ_s for pairs whose upper level is ``hi`` (σ at t_{n+k} = (n+1)·k − 1 on the skipped grid): s = max(j·k − 1, 0)
    with j ~ U{0, …, n}, so 0 ≤ s ≤ t_n (module docstring)."""
    t_hi = schedule.sigma_to_t(hi.double()).round().long()
    n = (t_hi + 1) // skip - 1
    j = (torch.rand(n.shape, generator=generator, dtype=torch.float64) * (n + 1).double()).floor().long()
    s = (j * skip - 1).clamp(min=0)
    return schedule.sigmas[s].to(hi.dtype)


class TrajectoryConsistencyLoss(ConsistencyLoss):
    """The TCD objective for :func:`fewstep.training.train` (module docstring): LCD's pairs, teacher step, target
    network and trainer hooks (:class:`ConsistencyLoss`), with both branches mapped to a common earlier point s."""

    def pair(self, model: nn.Module, batch: dict[str, Tensor]) -> Pair:
        x0 = batch["images"]
        cond = self.condition(batch)
        lo, hi = (s.to(x0.device) for s in self.curriculum.sample_pairs(len(x0), self.step, self.schedule))
        sigma_s = trajectory_ends(self.schedule, hi.cpu(), self.curriculum.skip).to(x0.device)
        noise = torch.randn_like(x0)
        x_hi = x0 + append_dims(hi, x0.ndim) * noise
        rng = rng_state(x0.device)
        online = ddim_step(x_hi, model(x_hi, hi, **cond), hi, sigma_s)
        with torch.no_grad():
            x_lo = self.teacher_step(x_hi, hi, lo, cond)
            set_rng_state(rng)  # the same dropout mask in the target branch (openai/consistency_models)
            target = ddim_step(x_lo, self.target_network(model)(x_lo, lo, **cond), lo, sigma_s)
        vp = append_dims(vp_alpha_cumprod(sigma_s).sqrt(), x0.ndim)    # the distance on VP latents x_s
        return Pair(vp * online, (vp * target).detach(), self.curriculum.weight(lo, hi), hi, cond)
