"""Guided-diffusion distillation, stage 1 (Meng et al. 2023, *On Distillation of Guided Diffusion
Models*, arXiv 2210.03142, §3.1): one student conditioned on the guidance weight w matches the
teacher's classifier-free-guided output for every w in [w_min, w_max], so a guided sample costs one
network evaluation per step instead of two.

The loss (Meng et al. eq. 5 in x-space, w ~ U[w_min, w_max]):

    E_{w, σ, x, ε} λ(σ) ‖ D_η(x + σε; σ, w) − D̂^w(x + σε; σ) ‖²,
    D̂^w = guide(D_c, D_u, 1 + w)  (the teacher's CFG, conditional + unconditional in one batch),

with λ(σ) = 1/c_out(σ)² of the student's own parameterization (:func:`fewstep.objectives.base.weighted_mse`):
EDM's 1/σ² + 1/σ_d² (the "SNR + 1" weighting of Salimans & Ho 2022, §4, in units of σ_d) for pixel
models, the ε-MSE the teacher was trained with for an ε-prediction VP UNet; σ from the teacher's own
training distribution.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core.denoisers import append_dims
from ..core.guidance import sample_guidance_scales
from .base import ConditionFn, TeacherFn, weighted_mse


class GuidedDistillationLoss:
    """Meng et al. 2023 stage-1 loss (module docstring) for :func:`fewstep.training.train`.

    ``condition`` maps a batch to the student's conditioning (class labels or prompt embeddings, some
    dropped to the unconditional input); ``teacher`` maps that conditioning plus per-sample
    ``guidance_scale`` to ``(denoiser, extra_args)`` of its CFG output
    (:func:`fewstep.core.guidance.per_sample_cfg`); ``guidance`` is the trained range (s_min, s_max).
    """

    def __init__(self, teacher: TeacherFn, schedule, condition: ConditionFn, guidance: tuple[float, float]) -> None:
        self.teacher = teacher
        self.schedule = schedule
        self.condition = condition
        self.guidance = guidance

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        x0 = batch["images"]
        cond = {**self.condition(batch), "guidance_scale": sample_guidance_scales(len(x0), *self.guidance, x0.device)}
        sigma = self.schedule.sample_sigmas(len(x0)).to(x0.device, x0.dtype)
        x = x0 + append_dims(sigma, x0.ndim) * torch.randn_like(x0)
        with torch.no_grad():
            den, extra = self.teacher(cond)
            target = den(x, sigma, **extra)
        return weighted_mse(model, model(x, sigma, **cond), target, sigma), {}
