"""Progressive distillation's loss (Salimans & Ho 2022, *Progressive Distillation for Fast Sampling of
Diffusion Models*, arXiv 2202.00512, Algorithm 2; Meng et al. 2023 §3.2 with w an input).

A student initialised from its teacher learns to do in ONE DDIM step what the teacher does in TWO. In
σ space (x = x0 + σε) with the one DDIM step :func:`fewstep.core.solvers.ddim_step`, the student's N-step
grid is every other level of the teacher's 2N-step grid (EDM's ρ-spaced grid, and diffusers' "trailing"
timesteps, both nest), so the student step σ_i → σ_{i+1} is the teacher's σ_{2i} → σ_{2i+1} → σ_{2i+2}.

The target (google-research ``diffusion_distillation/dpm.py``, ``training_losses``) is the x̃ for which
one student DDIM step from x_t lands exactly where the teacher's two steps land, x'' — the inverse of
``ddim_step`` in its ``denoised`` argument:

    x'' = x̃ + σ''·(x_t − x̃)/σ   ⇒   x̃ = (x'' − (σ''/σ)·x_t) / (1 − σ''/σ),   x̃ = x'' when σ'' = 0

(their ``(z_teacher − stdv_frac·z)/(a_s − stdv_frac·a_t)`` with α = 1 in σ space). Points x_t are the
data noised to a level of the student's grid, chosen uniformly; the weight is λ(σ) = 1/c_out(σ)², as in
stage 1 (the "SNR + 1" weighting of Salimans & Ho §4 in units of σ_d).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core.denoisers import append_dims
from ..core.guidance import sample_guidance_scales
from ..core.solvers import ddim_step, heun_step
from ..errors import FewstepError
from .base import ConditionFn, weighted_mse


def ddim_target(x: Tensor, x_next: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """The denoised x̃ with ``ddim_step(x, x̃, σ, σ') == x_next`` (Salimans & Ho 2022, Algorithm 2's
    x̃ in σ space; see the module docstring). ``sigma``/``sigma_next`` are per-sample [B] tensors."""
    ratio = append_dims(sigma_next / sigma, x.ndim)
    return (x_next - ratio * x) / (1 - ratio)


def teacher_two_steps(teacher: nn.Module, x: Tensor, sigmas: tuple[Tensor, Tensor, Tensor], cond: dict,
                      solver: str = "ddim") -> Tensor:
    """Two steps of ``teacher`` from σ_{2i} through σ_{2i+1} to σ_{2i+2} (per-sample levels): DDIM, or
    Heun (:func:`fewstep.core.solvers.heun_step`) for a first teacher that is a diffusion model."""
    s0, s1, s2 = sigmas
    if solver == "heun":
        x1 = _heun(teacher, x, teacher(x, s0, **cond), s0, s1, cond)
        return _heun(teacher, x1, teacher(x1, s1, **cond), s1, s2, cond)
    x1 = ddim_step(x, teacher(x, s0, **cond), s0, s1)
    return ddim_step(x1, teacher(x1, s1, **cond), s1, s2)


def _heun(teacher: nn.Module, x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor, cond: dict) -> Tensor:
    """:func:`fewstep.core.solvers.heun_step` for per-sample levels: samples whose step ends at σ' = 0 take the
    Euler (= DDIM) step, as Heun does there, and the model is never evaluated at σ = 0."""
    euler = ddim_step(x, denoised, sigma, sigma_next)
    last = sigma_next == 0
    if last.all():
        return euler
    heun = heun_step(teacher, x, denoised, sigma, torch.where(last, sigma, sigma_next), cond)
    return torch.where(append_dims(last, x.ndim), euler, heun)


class ProgressiveLoss:
    """One round of progressive distillation for :func:`fewstep.training.train` (module docstring).

    ``teacher`` and the trained student are denoisers that take ``guidance_scale``; ``grid`` is the
    teacher's 2N-step σ grid (2N + 1 levels ending in 0); ``condition`` maps a batch to the conditioning
    both see (a conditioner's :meth:`training_condition`: some of it
    dropped to the unconditional input).
    """

    def __init__(self, teacher: nn.Module, grid: Tensor, condition: ConditionFn, guidance: tuple[float, float],
                 solver: str = "ddim") -> None:
        if solver not in ("ddim", "heun"):
            raise FewstepError(f"unknown teacher solver {solver!r}; use ddim or heun")
        if (len(grid) - 1) % 2:
            raise ValueError(f"the teacher grid must have an even number of steps, got {len(grid) - 1}")
        self.teacher = teacher
        self.grid = grid.float()
        self.condition = condition
        self.guidance = guidance
        self.solver = solver

    @property
    def student_steps(self) -> int:
        return (len(self.grid) - 1) // 2

    def levels(self, n: int, device) -> tuple[Tensor, Tensor, Tensor]:
        """(σ_{2i}, σ_{2i+1}, σ_{2i+2}) for i ~ U{0 … N−1}: a student step and the teacher's two halves."""
        i = torch.randint(0, self.student_steps, (n,))
        grid = self.grid.to(device)
        return grid[2 * i], grid[2 * i + 1], grid[2 * i + 2]

    @torch.no_grad()
    def target(self, x: Tensor, sigmas: tuple[Tensor, Tensor, Tensor], cond: dict) -> Tensor:
        return ddim_target(x, teacher_two_steps(self.teacher, x, sigmas, cond, self.solver), sigmas[0], sigmas[2])

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        x0 = batch["images"]
        sigmas = tuple(s.to(x0.dtype) for s in self.levels(len(x0), x0.device))
        cond = {**self.condition(batch), "guidance_scale": sample_guidance_scales(len(x0), *self.guidance, x0.device)}
        x = x0 + append_dims(sigmas[0], x0.ndim) * torch.randn_like(x0)
        target = self.target(x, sigmas, cond)
        return weighted_mse(model, model(x, sigmas[0], **cond), target, sigmas[0]), {"student_steps": self.student_steps}
