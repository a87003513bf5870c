"""Training objectives, each a small callable ``objective(model, batch) -> (loss, logs)``.

Batches are dicts with ``images`` (x_0 in [−1, 1]) and ``labels``. ``model`` is a denoiser
(:mod:`fewstep.denoisers`), possibly wrapped by DDP.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .denoisers import append_dims


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP / compile wrapper."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def drop_labels(labels: Tensor, null_label: int, p: float) -> Tensor:
    """Replace each label by the null label with probability p (Ho & Salimans 2022, Algorithm 1)."""
    if p <= 0:
        return labels
    return torch.where(torch.rand(labels.shape, device=labels.device) < p, torch.full_like(labels, null_label), labels)


class DenoisingLoss:
    """The diffusion training loss in EDM form (Karras et al. 2022, eq. 2 and 8):

        E_{σ, x_0, n} [ λ(σ) · ‖D(x_0 + σn; σ) − x_0‖² ],   λ(σ) = 1/c_out(σ)²,

    i.e. plain MSE in the network's own output space, whatever it predicts: EDM's F, ε
    (λ = 1/σ², Ho et al. 2020's "simple" loss), v (Salimans & Ho 2022) or x_0. σ comes from the
    schedule (lognormal for EDM, uniform discrete t for VP). Labels are dropped to the null
    class with probability ``label_dropout`` so that classifier-free guidance works.
    """

    def __init__(self, schedule, null_label: int | None = None, label_dropout: float = 0.1) -> None:
        self.schedule = schedule
        self.null_label = null_label
        self.label_dropout = label_dropout

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        x0 = batch["images"]
        sigma = self.schedule.sample_sigmas(len(x0)).to(x0.device, x0.dtype)
        noise = torch.randn_like(x0)
        cond = {}
        if self.null_label is not None:
            cond["class_labels"] = drop_labels(batch["labels"], self.null_label, self.label_dropout)
        denoised = model(x0 + append_dims(sigma, x0.ndim) * noise, sigma, **cond)
        c_out = unwrap(model).scalings(sigma)[1]
        loss = ((denoised.float() - x0.float()) / append_dims(c_out.float(), x0.ndim)).square().mean()
        return loss, {}
