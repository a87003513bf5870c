"""Adversarial consistency training (ACT, Kong et al. 2024, arXiv 2311.14097).

CT minimizes a distance between adjacent points of the consistency trajectory, which bounds the
Wasserstein distance to the data loosely at few steps; ACT adds a discriminator that sees the
one-step output f_θ(x_{σ_{n+1}}, σ_{n+1}) and real images at the same noise level σ, so the
generator also minimizes a Jensen-Shannon divergence at every σ:

    L_G = (1 − λ)·L_CT + λ·w(σ)·softplus(−D(f_θ(x_σ, σ), σ))                       (Kong et al. 2024, eq. 12)
    L_D = λ·[softplus(D(f_θ(x_σ', σ'), σ')) + softplus(−D(x, σ'')) + (γ/2)·‖∇_x D(x, σ'')‖²]  (R1 lazily)

As kong13661/ACT ``train_cifar10.py`` has it (line numbers of that file):

- **The split batch** (``training_step``, l. 179–210; the doubled batch, l. 543): each loaded batch is cut in halves; the generator
  trains on the first, the discriminator on the second, whose first half gives the fakes and second half
  the reals. The fakes are drawn afresh *after* the generator's step (``discriminator_fake_loss``, l. 241–253):
  new σ from the curriculum, new noise, the updated student's one-step output, no gradient. So
  ``--batch 128`` trains the generator on 64 images per step, as ``--method ct --batch 64`` does. With
  ``--grad-accum`` > 1 every micro-batch's discriminator half is kept and D takes one step over all of them
  (the reference's ``accumu`` loop, l. 202–207).
- **D's loss is scaled by λ** (``discriminator_training_step``: ``(dloss + r1) * gan_ratio``, l. 230–239).
- **The discriminator sees no gradient of the generator's step** (Lightning's ``toggle_optimizer``, l. 189): it is
  frozen while the generator's loss is built.
- **R1** (``r1_panelty``, l. 125–131): γ/2·mean‖∇_x D‖² on the steps where step mod 16 = 0, *not*
  multiplied by the interval (StyleGAN2's lazy scaling is not in the reference), γ = 10.
- **Adaptive augmentation** (``update_r1_ema_and_aug_p``, l. 433–441): an EMA (decay 0.93) of the R1 value is
  kept at every R1 step, and the augmentation probability p moves by ±B·16/500,000 (B the loaded batch)
  towards more augmentation while it exceeds ``r1_threshold`` (10,000), clamped to [0, 1].
- **Optimizers** (``configure_optimizers``, l. 330–344): RAdam for both, β = (0, 0.99) for the generator
  (the method's default ``--optimizer``, see :mod:`fewstep.methods.consistency`) and (0, 0.99·16/17) for
  the discriminator, both warmed up alike.
- λ = ``gan_ratio`` = 0.3, w(σ) = 1 ("none"; "edm" gives the EDM weight, ``loss_func_g``), the discriminator
  is the down half of a diffusers UNet with a time embedding (:mod:`fewstep.nets.discriminator`).

Deviations, each kept for a reason:

- **The augmentation ops**: the reference's ``augment`` is StyleGAN2-ADA's full pipeline (flips, 90°
  rotations, translations, scalings, rotations, colour transforms through ``upfirdn2d``, a CUDA kernel);
  here p drives DiffAugment's translation and cutout (:func:`diff_augment`, Zhao et al. 2020), which need no
  custom kernel. At the reference's threshold p stays 0 unless R1 runs away, and a run's metrics log p, so
  whether the ops ever acted is on record.
- **The distance**: the reference's default is LPIPS (λ = 0.3 was tuned with it), whose ImageNet-trained
  weights fewstep does not ship; ``--distance features`` (LPIPS's formula on the data set's own feature
  network, :mod:`fewstep.objectives.distances`) stands in for it.
- **Conditioning**: the reference is unconditional CIFAR-10; here D also takes the student's class (or
  text) conditioning, with the same label dropout as the generator.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..core.denoisers import append_dims
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


def halves(batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A batch cut in two along its first axis (every tensor of it), the first half no larger."""
    n = len(next(iter(batch.values())))
    return ({k: v[:n // 2] for k, v in batch.items()}, {k: v[n // 2:] for k, v in batch.items()})


@dataclass
class AdaptiveAugment:
    """ACT's augmentation probability (kong13661/ACT ``update_r1_ema_and_aug_p``): an EMA of the R1 value;
    p += B·interval/length while the EMA exceeds ``target``, −= otherwise, clamped to [0, 1]."""

    p: float = 0.0
    target: float = 10000.0        # r1_threshold
    length: float = 500000.0       # ada_length: images for p to move by 1
    decay: float = 0.93            # loss_ema_decay
    r1_ema: float = 10000.0        # the reference starts the EMA at the threshold

    def update(self, r1: float, images_per_step: int, interval: int) -> None:
        self.r1_ema = self.r1_ema * self.decay + r1 * (1 - self.decay)
        move = images_per_step * interval / self.length
        self.p = min(1.0, max(0.0, self.p + (move if self.r1_ema > self.target else -move)))


class AdversarialConsistencyLoss:
    """ACT's generator objective for :func:`fewstep.training.train` on the first half of each batch; the
    discriminator's step, on the second half's fresh fakes and reals, in :meth:`after_step` (module docstring)."""

    def __init__(self, consistency: ConsistencyLoss, discriminator: Discriminator, gan_weight: float = 0.3,
                 d_lr: float = 1e-4, r1_gamma: float = 10.0, r1_interval: int = 16,
                 augment: AdaptiveAugment | None = None, weighting: str = "none", warmup: int = 0,
                 d_betas: tuple[float, float] = (0.0, 0.99 * 16 / 17)) -> None:
        if not 0 <= gan_weight <= 1:
            raise ValueError(f"gan_weight λ must be in [0, 1], got {gan_weight}")
        self.consistency = consistency
        self.discriminator = discriminator
        self.gan_weight = gan_weight
        self.r1_gamma = r1_gamma
        self.r1_interval = r1_interval
        self.augment = augment or AdaptiveAugment()
        self.weighting = weighting
        self.d_lr, self.warmup = d_lr, warmup
        self.optimizer = torch.optim.RAdam(discriminator.parameters(), lr=d_lr, betas=d_betas)
        self._pending: list[dict[str, Tensor]] = []      # the discriminator halves of this step's micro-batches
        self._d_logs: dict[str, float] = {}

    def weight(self, sigma: Tensor) -> Tensor:
        """w(σ): 1, or the EDM weight (σ² + σd²)/(σ·σd)² (ACT's ``consistency_loss_weight='edm'``)."""
        if self.weighting == "edm":
            sd = self.consistency.schedule.sigma_data
            return (sigma**2 + sd**2) / (sigma * sd) ** 2
        return torch.ones_like(sigma)

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        if len(batch["images"]) < 4:
            raise ValueError("ACT cuts each micro-batch in four (generator half, fakes, reals): it needs at least 4 "
                             "images per micro-batch")
        own, theirs = halves(batch)
        self._pending.append({k: v.detach() for k, v in theirs.items()})
        pair = self.consistency.pair(model, own)
        loss_ct = pair.loss(self.consistency.distance)
        disc = self.discriminator.to(pair.online.device).requires_grad_(False)   # toggle_optimizer: D is not trained here
        try:
            logits = disc(diff_augment(pair.online, self.augment.p), pair.sigma, **pair.cond)
        finally:
            disc.requires_grad_(True)
        loss_g = (self.weight(pair.sigma) * F.softplus(-logits)).mean()
        loss = torch.lerp(loss_ct, loss_g, self.gan_weight)
        return loss, {**self.consistency.logs(), "loss_ct": float(loss_ct.detach()), "loss_g": float(loss_g.detach()),
                      "aug_p": self.augment.p, **self._d_logs}

    def networks(self, model: nn.Module) -> list[nn.Module]:
        """The consistency target (sharded like the student under FSDP); the discriminator stays replicated (small,
        its gradients all-reduced here)."""
        return self.consistency.networks(model)

    def after_step(self, model: nn.Module, step: int) -> None:
        """The discriminator's step (at the curriculum of the generator's step just taken), then the target's."""
        pending, self._pending = self._pending, []
        if pending:
            self._discriminator_step(model, pending, step - 1)
        self.consistency.after_step(model, step)

    def _discriminator_step(self, model: nn.Module, pending: list[dict[str, Tensor]], step: int) -> None:
        """One RAdam step of D over every micro-batch's half (``step``: 0-based, as the reference's total_step)."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.d_lr * min(1.0, (step + 1) / max(1, self.warmup))
        self.optimizer.zero_grad(set_to_none=True)
        with_r1 = self.r1_gamma > 0 and step % self.r1_interval == 0
        logs = [self._discriminator_loss(model, half, with_r1, len(pending)) for half in pending]
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world > 1:
            for p in self.discriminator.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= world
        self.optimizer.step()
        self._d_logs = {k: sum(log[k] for log in logs) / len(logs) for k in logs[0]}
        if with_r1:
            images = sum(2 * len(h["images"]) for h in pending) * world      # the loaded images of the whole step
            self.augment.update(self._d_logs["r1"], images, self.r1_interval)

    def _level(self, images: Tensor) -> Tensor:
        """One σ per image, drawn as the generator's upper levels are at this step (``train_time_sampler``)."""
        c = self.consistency
        return c.curriculum.sample_pairs(len(images), c.step, c.schedule)[1].to(images.device)

    def _discriminator_loss(self, model: nn.Module, half: dict[str, Tensor], with_r1: bool, parts: int) -> dict[str, float]:
        """λ·(softplus(D(fake)) + softplus(−D(real)) + R1) on one micro-batch's half, back-propagated into D /
        ``parts``: fakes from the first quarter (fresh σ and noise, the updated student, no gradient), reals from
        the second (``discriminator_fake_loss`` / ``discriminator_real_loss``)."""
        fakes, reals = halves(half)
        consistency, disc, p = self.consistency, self.discriminator, self.augment.p
        x0, cond = fakes["images"], consistency.condition(fakes)
        sigma = self._level(x0)
        with torch.no_grad():
            fake_images = model(x0 + append_dims(sigma, x0.ndim) * torch.randn_like(x0), sigma, **cond)
        fake = disc(diff_augment(fake_images, p), sigma, **cond)
        real_cond = consistency.condition(reals)
        real_sigma = self._level(reals["images"])
        real_x = reals["images"].detach().requires_grad_(with_r1)
        r1 = torch.zeros((), device=x0.device)
        with sdpa_kernel(SDPBackend.MATH) if with_r1 else contextlib.nullcontext():  # double backward: no fused attention kernels
            real = disc(diff_augment(real_x, p), real_sigma, **real_cond)
            if with_r1:   # R1 (Mescheder et al. 2018) γ/2·mean‖∇_x D‖², not scaled by the interval (module docstring)
                grad, = torch.autograd.grad(real.sum(), real_x, create_graph=True)
                r1 = grad.square().flatten(1).sum(1).mean() * (self.r1_gamma / 2)
        loss_d = F.softplus(fake).mean() + F.softplus(-real).mean()
        ((loss_d + r1) * self.gan_weight / parts).backward()
        return {"loss_d": loss_d.item(), "d_real": real.mean().item(), "d_fake": fake.mean().item(),
                **({"r1": r1.item()} if with_r1 else {})}

    def state_dict(self) -> dict[str, Tensor]:
        state = {f"ct.{k}": v for k, v in self.consistency.state_dict().items()}
        state.update({f"disc.{k}": v for k, v in self.discriminator.state_dict().items()})
        state.update(optimizer_state(self.optimizer, "dopt."))
        state["ada.p"] = torch.tensor(self.augment.p, dtype=torch.float64)
        state["ada.r1_ema"] = torch.tensor(self.augment.r1_ema, dtype=torch.float64)
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.consistency.load_state_dict({k[3:]: v for k, v in state.items() if k.startswith("ct.")})
        self.discriminator.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("disc.")})
        load_optimizer_state(self.optimizer, state, "dopt.")
        if "ada.p" in state:
            self.augment.p, self.augment.r1_ema = float(state["ada.p"]), float(state["ada.r1_ema"])

