"""Discretization curricula of consistency training, shared by CD, CT, iCT, ACT and LCD/LCF.

The N-point Karras grid is :func:`fewstep.core.schedules.karras_levels`; here are CT's N(k) and μ(k)
(:func:`ct_num_scales`, :func:`ct_target_ema`; Song et al. 2023 Appendix C), iCT's doubling N(k) and
lognormal level sampling (:func:`ict_num_scales`, :func:`ict_level_probs`; Song & Dhariwal 2023 §3),
ECT's continuous pairs (t, r) with Δt shrinking stage by stage (:func:`ect_stage`, :func:`ect_r`; Geng et al. 2024),
and :class:`Curriculum`, which picks a method's: N(k), μ(k), how pairs of adjacent levels are drawn
and how they are weighted (LCM's skipping-step pairs on the discrete VP grid among them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.schedules import karras_levels, skipped_timesteps


def ct_num_scales(step: int, total_steps: int, s0: int = 2, s1: int = 150) -> int:
    """CT's N(k) = ⌈√(k/K·((s1+1)² − s0²) + s0²) − 1⌉ + 1 (Song et al. 2023, Appendix C, eq. 27)."""
    k = min(step, total_steps) / max(total_steps, 1)
    return math.ceil(math.sqrt(k * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1


def ct_target_ema(num_scales: int, s0: int = 2, mu0: float = 0.9) -> float:
    """CT's target EMA rate μ(k) = exp(s0·ln μ0 / N(k)) (Song et al. 2023, Appendix C, eq. 28)."""
    return math.exp(s0 * math.log(mu0) / num_scales)


PAPER_STEPS = 800_000   # the CT runs Song et al. 2023 tuned N(k), μ(k) for (CIFAR-10, Appendix C)


def fitted_mu0(total_steps: int, s0: int = 2, s1: int = 150, mu0: float = 0.9) -> float:
    """CT's μ0 fitted to a run of ``total_steps`` (not the paper's 800k): the target network's EMA horizon at
    the end of the run, 1/(1 − μ(K)) with μ(K) = exp(s0·ln μ0 / N(K)), is kept the same *fraction of the run*
    as in the paper (≈ 712 of 800k iterations, 0.09%), and μ0 is solved for from eq. 28:
    μ0 = μ(K)^(N(K)/s0). For runs of a few thousand steps this gives μ ≈ 0: a target that follows the
    student, which is what iCT found to work best at any length (Song & Dhariwal 2023 §3.2)."""
    paper_final = ct_target_ema(ct_num_scales(PAPER_STEPS, PAPER_STEPS, s0, s1), s0, mu0)
    horizon = total_steps / PAPER_STEPS / (1 - paper_final)
    final = max(0.0, 1 - 1 / horizon) if horizon > 1 else 0.0
    return final ** (ct_num_scales(total_steps, total_steps, s0, s1) / s0)


def ict_num_scales(step: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT's doubling curriculum N(k) = min(s0·2^⌊k/K'⌋, s1) + 1, K' = ⌊K/(log2⌊s1/s0⌋ + 1)⌋
    (Song & Dhariwal 2023, §3.4, eq. 7)."""
    k_prime = max(1, math.floor(total_steps / (math.log2(s1 // s0) + 1)))
    return min(s0 * 2 ** (step // k_prime), s1) + 1


def ict_level_probs(num_scales: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                    p_mean: float = -1.1, p_std: float = 2.0, sigmas: Tensor | None = None) -> Tensor:
    """iCT's discretized lognormal over the N−1 adjacent pairs (σ_i, σ_{i+1}) (Song & Dhariwal 2023,
    §3.5): p(i) ∝ erf((ln σ_{i+1} − P_mean)/(√2·P_std)) − erf((ln σ_i − P_mean)/(√2·P_std)), over the N-point
    Karras grid, or the given increasing levels ``sigmas`` (another space's consistency grid)."""
    if sigmas is None:
        sigmas = karras_levels(torch.arange(num_scales), num_scales, sigma_min, sigma_max, rho)
    cdf = torch.erf((sigmas.log() - p_mean) / (math.sqrt(2) * p_std))
    probs = cdf[1:] - cdf[:-1]
    return probs / probs.sum()


ECT_PAPER_STAGES = 8   # run_ecm.sh: --duration=25.6 (Mimg) / (--double=250 ticks × --tick=12.8 kimg) = 8 stages


def ect_stage(step: int, total_steps: int, stages: int = ECT_PAPER_STAGES) -> int:
    """ECT's stage at optimizer step ``step`` of a ``total_steps`` run: ⌊step·stages/K⌋, capped at stages − 1.

    locuslab/ect ``training/ct_training_loop.py:241,383-386`` advances ``stage`` every ``double_ticks`` ticks;
    ``run_ecm.sh`` (--duration=25.6 --tick=12.8 --double=250, batch 128) makes that every 3.2 Mimg = 25,000
    iterations of a 200,000-iteration run: 8 equal stages, 0 … 7. A run of K steps here keeps the stages the same
    *share of the run* (each K/8 steps; ``stages`` changes the count; 1 = never advance, as ``run_ecm_1hour.sh``'s
    --double 10000 does). The reference's stage s starts one iteration late (its tick 0 is a single iteration,
    ``ct_training_loop.py:280``); here stage s starts at step ⌈s·K/stages⌉."""
    stages = max(1, stages)
    return min(step * stages // max(total_steps, 1), stages - 1)


def ect_r(t: Tensor, stage: int, q: float = 2.0, k: float = 8.0, b: float = 1.0) -> Tensor:
    """ECT's r(t) = t·(1 − q^−(stage+1)·(1 + k·sigmoid(−b·t))), clamped at 0 (locuslab/ect ``training/loss.py:45-50``,
    ``t_to_r_sigmoid``; Geng et al. 2024 §3, the "sigmoid" mapping n(t) = 1 + k·σ(−b·t)). At stage 0 with q = 2 every
    t < ln 7 ≈ 1.95 has r = 0: the pair is the diffusion (denoising) loss, and Δt = t − r halves each stage."""
    return (t * (1 - (1 + k * torch.sigmoid(-b * t)) / q ** (stage + 1))).clamp(min=0)


@dataclass(frozen=True)
class Curriculum:
    """N(k), μ(k), the level sampling and the weighting of one method."""

    name: str                               # "cd" | "ct" | "ict" | "lcm" | "ect"
    total_steps: int
    num_scales: int = 18                    # CD's fixed N (Song et al. 2023: 18 on CIFAR-10, 40 on ImageNet-64)
    target_ema: float = 0.95                # CD's fixed μ
    s0: int = 2                             # CT: N(0) and μ0's exponent; iCT: the first N (10)
    s1: int = 150                           # CT/iCT: the final N (150; iCT 1280)
    mu0: float = 0.9                        # CT's μ0
    p_mean: float = -1.1                    # iCT's lognormal level distribution
    p_std: float = 2.0
    skip: int = 20                          # LCM's skipping step k (Luo et al. 2023 §4.3: 20 of 1000)
    q: float = 2.0                          # ECT: Δt shrinks by q each stage (locuslab/ect ct_train.py -q)
    k: float = 8.0                          # ECT: n(t) = 1 + k·sigmoid(−b·t) (ct_train.py -k, -b)
    b: float = 1.0
    stages: int = ECT_PAPER_STAGES          # ECT: stages over the run (ect_stage)

    @classmethod
    def for_method(cls, method: str, total_steps: int, fitted: bool = False, **overrides) -> "Curriculum":
        """The paper defaults of ``method`` (cd, ct, ict; act uses CT's; lcd and lcf the LCM grid with
        diffusers' μ = 0.95; ect: no target EMA, lognormal t as iCT's), with explicit overrides; ``fitted``: CT's μ0 fitted to the run's length
        (:func:`fitted_mu0`)."""
        base = {"cd": {}, "ct": {"s0": 2, "s1": 150, "mu0": 0.9}, "act": {"s0": 2, "s1": 150, "mu0": 0.9},
                "ict": {"s0": 10, "s1": 1280, "target_ema": 0.0}, "lcd": {}, "lcf": {},
                "ect": {"target_ema": 0.0}}[method]
        name = {"act": "ct", "lcd": "lcm", "lcf": "lcm"}.get(method, method)
        settings = {**base, **{k: v for k, v in overrides.items() if v is not None}}
        if fitted and name == "ct":
            settings["mu0"] = fitted_mu0(total_steps, settings["s0"], settings["s1"], settings["mu0"])
        return cls(name=name, total_steps=total_steps, **settings)

    def stage(self, step: int) -> int:
        """ECT's stage at ``step`` (:func:`ect_stage`); 0 for the other curricula."""
        return ect_stage(step, self.total_steps, self.stages) if self.name == "ect" else 0

    def scales(self, step: int) -> int:
        if self.name == "ct":
            return ct_num_scales(step, self.total_steps, self.s0, self.s1)
        if self.name == "ict":
            return ict_num_scales(step, self.total_steps, self.s0, self.s1)
        return self.num_scales

    def ema(self, step: int) -> float:
        if self.name != "ct":
            return self.target_ema
        return ct_target_ema(self.scales(step), self.s0, self.mu0) if self.mu0 > 0 else 0.0

    def sample_pairs(self, n: int, step: int, schedule) -> tuple[Tensor, Tensor]:
        """n pairs (σ_n, σ_{n+1}) of adjacent levels on the current grid: the schedule's N-point consistency grid
        (``consistency_levels``: Karras for EDM, uniform shifted time for flow). "lcm": t_{n+k} uniform on the
        skipped grid {k−1, 2k−1, …, T−1}, t_n = max(t_{n+k} − k, 0) (diffusers' ``train_lcm_distill_sd_wds.py``).
        "ect": continuous, no grid: t ~ lognormal(P_mean, P_std) and r = :func:`ect_r` (t, stage) (locuslab/ect
        ``training/loss.py:54-56``; the same draw order, t before the noise)."""
        if self.name == "ect":
            t = (torch.randn(n) * self.p_std + self.p_mean).exp()
            return ect_r(t, self.stage(step), self.q, self.k, self.b), t
        if self.name == "lcm":
            grid = skipped_timesteps(schedule.num_train_timesteps, self.skip)
            hi_t = grid[torch.randint(0, len(grid), (n,))]
            return schedule.sigmas[(hi_t - self.skip).clamp(min=0)].float(), schedule.sigmas[hi_t].float()
        scales = self.scales(step)
        if self.name == "ict":
            levels = schedule.consistency_levels(torch.arange(scales), scales)
            index = torch.multinomial(ict_level_probs(scales, p_mean=self.p_mean, p_std=self.p_std, sigmas=levels),
                                      n, replacement=True)
        else:
            index = torch.randint(0, scales - 1, (n,))
        lo, hi = (schedule.consistency_levels(i, scales).float() for i in (index, index + 1))
        return lo, hi

    def weight(self, lo: Tensor, hi: Tensor) -> Tensor:
        """iCT's 1/(σ_{n+1} − σ_n); ECT's 1/(t − r) (locuslab/ect ``training/loss.py:91-92``); 1 otherwise."""
        return 1 / (hi - lo) if self.name in ("ict", "ect") else torch.ones_like(lo)
