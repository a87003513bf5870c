"""Adversarial consistency training (ACT, Kong et al. 2024, arXiv 2311.14097).

CT minimizes a distance between adjacent points of the consistency trajectory, which bounds the
Wasserstein distance to the data loosely at few steps; ACT adds a discriminator that sees the
one-step output f_θ(x_{σ_{n+1}}, σ_{n+1}) and real images at the same noise level σ, so the
generator also minimizes a Jensen-Shannon divergence at every σ:

    L_G = (1 − λ)·L_CT + λ·w(σ)·softplus(−D(f_θ(x_σ, σ), σ))         (Kong et al. 2024, eq. 12)
    L_D = softplus(D(f_θ(x_σ, σ), σ)) + softplus(−D(x, σ)) + (γ/2)·‖∇_x D(x, σ)‖²  (R1, lazy)

Following kong13661/ACT (``train_cifar10.py``): λ = ``gan_ratio`` = 0.3, w(σ) = 1 ("none"; "edm"
gives the EDM weight), the discriminator is the down half of a diffusers UNet with the same time
embedding as the generator, Adam(β = (0, 0.99)), R1 every 16 steps with γ = 10 (scaled by the
interval, StyleGAN2's lazy regularization), and optional differentiable augmentation (a fixed
probability here; ACT adapts it from the R1 magnitude).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..nets.discriminator import Discriminator
from .base import load_optimizer_state, optimizer_state
from .consistency import ConsistencyLoss


def diff_augment(x: Tensor, p: float) -> Tensor:
    """Differentiable augmentation (Zhao et al. 2020): with probability p each, a random translation
    by up to 1/8 of the size (zero padding) and a cutout of half the size. Identity at p = 0."""
    if p <= 0:
        return x
    n, _, h, w = x.shape
    shift = max(1, h // 8)
    apply = (torch.rand(n, 1, 1, 1, device=x.device) < p).to(x.dtype)
    dx, dy = (torch.randint(-shift, shift + 1, (n,), device=x.device) for _ in range(2))
    rows = (torch.arange(h, device=x.device)[None] - dy[:, None]).clamp(-1, h)
    cols = (torch.arange(w, device=x.device)[None] - dx[:, None]).clamp(-1, w)
    padded = F.pad(x, (1, 1, 1, 1))
    shifted = padded[torch.arange(n)[:, None, None], :, rows[:, :, None] + 1, cols[:, None, :] + 1].permute(0, 3, 1, 2)
    x = apply * shifted + (1 - apply) * x
    cut = (torch.rand(n, 1, 1, 1, device=x.device) < p).to(x.dtype)
    cy, cx = torch.randint(0, h, (n,), device=x.device), torch.randint(0, w, (n,), device=x.device)
    yy, xx = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    hole = ((yy[None, :, None] - cy[:, None, None]).abs() < h // 4) & ((xx[None, None, :] - cx[:, None, None]).abs() < w // 4)
    return x * (1 - cut * hole[:, None].to(x.dtype))


class AdversarialConsistencyLoss:
    """ACT's generator objective for :func:`fewstep.training.train`; the discriminator takes its own
    Adam step in :meth:`after_step` on the last batch's real images and (detached) one-step outputs."""

    def __init__(self, consistency: ConsistencyLoss, discriminator: Discriminator, gan_weight: float = 0.3,
                 d_lr: float = 1e-4, r1_gamma: float = 10.0, r1_interval: int = 16, augment: float = 0.0,
                 weighting: str = "none") -> None:
        if not 0 <= gan_weight <= 1:
            raise ValueError(f"gan_weight λ must be in [0, 1], got {gan_weight}")
        self.consistency = consistency
        self.discriminator = discriminator
        self.gan_weight = gan_weight
        self.r1_gamma = r1_gamma
        self.r1_interval = r1_interval
        self.augment = augment
        self.weighting = weighting
        self.optimizer = torch.optim.Adam(discriminator.parameters(), lr=d_lr, betas=(0.0, 0.99))
        self._last: dict[str, Tensor] | None = None
        self._d_logs: dict[str, float] = {}

    def weight(self, sigma: Tensor) -> Tensor:
        """w(σ): 1, or the EDM weight (σ² + σd²)/(σ·σd)² (ACT's ``consistency_loss_weight='edm'``)."""
        if self.weighting == "edm":
            sd = self.consistency.schedule.sigma_data
            return (sigma**2 + sd**2) / (sigma * sd) ** 2
        return torch.ones_like(sigma)

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        pair = self.consistency.pair(model, batch)
        loss_ct = pair.loss(self.consistency.distance)
        disc = self.discriminator.to(pair.online.device)
        logits = disc(diff_augment(pair.online, self.augment), pair.sigma, **pair.cond)
        loss_g = (self.weight(pair.sigma) * F.softplus(-logits)).mean()
        self._last = {"real": batch["images"], "fake": pair.online.detach(), "sigma": pair.sigma, "cond": pair.cond}
        loss = torch.lerp(loss_ct, loss_g, self.gan_weight)
        return loss, {**self.consistency.logs(), "loss_ct": float(loss_ct.detach()), "loss_g": float(loss_g.detach()), **self._d_logs}

    def networks(self, model: nn.Module) -> list[nn.Module]:
        """The consistency target (sharded like the student under FSDP); the discriminator stays replicated (small,
        its gradients all-reduced here)."""
        return self.consistency.networks(model)

    def after_step(self, model: nn.Module, step: int) -> None:
        self.consistency.after_step(model, step)
        if self._last is None:
            return
        last, self._last = self._last, None
        cond = last["cond"]                                 # the student's conditioning, whatever its conditioner
        disc = self.discriminator
        self.optimizer.zero_grad(set_to_none=True)
        fake = disc(diff_augment(last["fake"], self.augment), last["sigma"], **cond)
        real_x = last["real"].detach().requires_grad_(self.r1_gamma > 0 and step % self.r1_interval == 0)
        r1 = torch.zeros(())
        if real_x.requires_grad:  # lazy R1 (Mescheder et al. 2018; Karras et al. 2020): γ/2·‖∇D‖², ×interval
            with sdpa_kernel(SDPBackend.MATH):  # double backward: the fused attention kernels have none
                real = disc(diff_augment(real_x, self.augment), last["sigma"], **cond)
                grad, = torch.autograd.grad(real.sum(), real_x, create_graph=True)
            r1 = grad.square().flatten(1).sum(1).mean() * (self.r1_gamma / 2) * self.r1_interval
        else:
            real = disc(diff_augment(real_x, self.augment), last["sigma"], **cond)
        loss_d = F.softplus(fake).mean() + F.softplus(-real).mean()
        (loss_d + r1).backward()
        loss_d, r1, real, fake = loss_d.detach(), r1.detach(), real.detach(), fake.detach()
        if dist.is_available() and dist.is_initialized():
            for p in disc.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= dist.get_world_size()
        self.optimizer.step()
        self._d_logs = {"loss_d": loss_d.item(), "d_real": real.mean().item(), "d_fake": fake.mean().item(),
                        **({"r1": r1.item()} if real_x.requires_grad else {})}

    def state_dict(self) -> dict[str, Tensor]:
        state = {f"ct.{k}": v for k, v in self.consistency.state_dict().items()}
        state.update({f"disc.{k}": v for k, v in self.discriminator.state_dict().items()})
        state.update(optimizer_state(self.optimizer, "dopt."))
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.consistency.load_state_dict({k[3:]: v for k, v in state.items() if k.startswith("ct.")})
        self.discriminator.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("disc.")})
        load_optimizer_state(self.optimizer, state, "dopt.")

