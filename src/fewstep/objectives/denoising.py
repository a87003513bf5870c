"""The diffusion training loss in EDM form (Karras et al. 2022, eq. 2 and 8)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core.denoisers import append_dims
from .base import ConditionFn, weighted_mse


class DenoisingLoss:
    """E_{σ, x_0, n} [ λ(σ) · ‖D(x_0 + σn; σ, c) − x_0‖² ], λ(σ) = 1/c_out(σ)² (:func:`weighted_mse`).

    σ comes from the schedule (lognormal for EDM, uniform discrete t for VP). ``condition`` maps a batch
    to the denoiser's conditioning, some of it dropped to the unconditional input so that
    classifier-free guidance works (:func:`fewstep.objectives.base.dropout_condition`); None: unconditional.
    """

    def __init__(self, schedule, condition: ConditionFn | None = None) -> None:
        self.schedule = schedule
        self.condition = condition

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        x0 = batch["images"]
        sigma = self.schedule.sample_sigmas(len(x0)).to(x0.device, x0.dtype)
        noise = torch.randn_like(x0)
        cond = self.condition(batch) if self.condition else {}
        denoised = model(x0 + append_dims(sigma, x0.ndim) * noise, sigma, **cond)
        return weighted_mse(model, denoised, x0, sigma), {}
