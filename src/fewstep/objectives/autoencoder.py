"""The autoencoder objective of the embedded Stable-Diffusion-format teacher's VAE: reconstruction MSE + a
small KL term (Rombach et al. 2022 §3, without the perceptual and adversarial terms, which need weights
this machine cannot fetch)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class VAEWithKL(nn.Module):
    """AutoencoderKL → (reconstruction, KL per latent element), so the loss goes through one forward
    of the (possibly DDP-wrapped) module."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        posterior = self.vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn_like(posterior.mean)
        return self.vae.decode(z).sample, posterior.kl() / posterior.mean[0].numel()


class VAELoss:
    """‖x − D(E(x))‖² + β·KL(q(z|x) ‖ N(0, I)), β small (the latent only needs to stay near-Gaussian)."""

    def __init__(self, kl_weight: float = 1e-4) -> None:
        self.kl_weight = kl_weight

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        recon, kl = model(batch["images"])
        mse = (recon.float() - batch["images"].float()).square().mean()
        return mse + self.kl_weight * kl.mean(), {"mse": float(mse.detach()), "kl": float(kl.mean().detach())}
