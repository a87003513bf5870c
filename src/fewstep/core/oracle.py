"""The exact denoiser of a finite data set (DESIGN.md §5).

For data {y_1 … y_N} with equal weights, the noisy point x = y + σ·ε has posterior
p(y_j | x) ∝ exp(−‖x − y_j‖²/2σ²), so the ideal denoiser is closed-form:
    D*(x; σ) = E[y | x] = Σ_j softmax_j(−‖x − y_j‖²/2σ²) · y_j
(Karras et al. 2022, Appendix B.3, eq. 57). With it, solvers, guidance and consistency
distillation can be checked against the true probability-flow ODE without training anything.
"""

from __future__ import annotations

import torch
from torch import Tensor


class ExactDenoiser:
    """D*(x; σ) for a finite data set ``data`` [N, ...], optionally class-conditional.

    With ``labels`` given, ``class_labels`` restricts the posterior to that class; the label
    ``num_classes`` (the null label) means the unconditional mixture, as in CFG training.
    Computation is in float64; the result has ``x``'s dtype.
    """

    def __init__(self, data: Tensor, labels: Tensor | None = None) -> None:
        self.data = data.reshape(len(data), -1).to(torch.float64)
        self.shape = data.shape[1:]
        self.labels = labels
        self.null_label = None if labels is None else int(labels.max()) + 1

    def __call__(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor:
        flat = x.reshape(len(x), -1).to(torch.float64)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).expand(len(x)).reshape(-1, 1)
        d2 = torch.cdist(flat, self.data).square()                     # [B, N]
        logits = -d2 / (2 * sigma**2)
        if class_labels is not None and self.labels is not None:
            keep = (self.labels[None, :] == class_labels[:, None]) | (class_labels[:, None] == self.null_label)
            logits = logits.masked_fill(~keep, float("-inf"))
        weights = torch.softmax(logits, dim=1)
        return (weights @ self.data).reshape(x.shape).to(x.dtype)
