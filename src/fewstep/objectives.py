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


def drop_labels(labels: Tensor, null_label: int | Tensor, p: float) -> Tensor:
    """Replace each row's condition by the null one with probability p (Ho & Salimans 2022, Algorithm 1):
    a class label by the null class, or a prompt's token ids by the empty prompt's ids."""
    if p <= 0:
        return labels
    drop = append_dims(torch.rand(labels.shape[:1], device=labels.device) < p, labels.ndim)
    return torch.where(drop, torch.as_tensor(null_label, dtype=labels.dtype, device=labels.device), labels)


class DenoisingLoss:
    """The diffusion training loss in EDM form (Karras et al. 2022, eq. 2 and 8):

        E_{σ, x_0, n} [ λ(σ) · ‖D(x_0 + σn; σ) − x_0‖² ],   λ(σ) = 1/c_out(σ)²,

    i.e. plain MSE in the network's own output space, whatever it predicts: EDM's F, ε
    (λ = 1/σ², Ho et al. 2020's "simple" loss), v (Salimans & Ho 2022) or x_0. σ comes from the
    schedule (lognormal for EDM, uniform discrete t for VP). The condition (``batch[batch_key]``,
    passed to the model as ``cond_key``) is dropped to ``null_label`` (the null class, or the empty
    prompt's token ids) with probability ``label_dropout`` so that classifier-free guidance works.
    """

    def __init__(self, schedule, null_label: int | Tensor | None = None, label_dropout: float = 0.1,
                 batch_key: str = "labels", cond_key: str = "class_labels") -> None:
        self.schedule = schedule
        self.null_label = null_label
        self.label_dropout = label_dropout
        self.batch_key, self.cond_key = batch_key, cond_key

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        x0 = batch["images"]
        sigma = self.schedule.sample_sigmas(len(x0)).to(x0.device, x0.dtype)
        noise = torch.randn_like(x0)
        cond = {}
        if self.null_label is not None:
            cond[self.cond_key] = drop_labels(batch[self.batch_key], self.null_label, self.label_dropout)
        denoised = model(x0 + append_dims(sigma, x0.ndim) * noise, sigma, **cond)
        c_out = unwrap(model).scalings(sigma)[1]
        loss = ((denoised.float() - x0.float()) / append_dims(c_out.float(), x0.ndim)).square().mean()
        return loss, {}
