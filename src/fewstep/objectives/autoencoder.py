"""Autoencoder objectives: the embedded Stable-Diffusion-format teacher's VAE, reconstruction MSE + a small
KL term (Rombach et al. 2022 §3, without the perceptual and adversarial terms, which need weights this
machine cannot fetch); and a tiny VAE distilled against a pipeline's VAE (TAESD, :class:`TinyVAELoss`)."""

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


class TinyVAEPair(nn.Module):
    """AutoencoderTiny → (its decoding of latents z, its encoding of images x), one forward for DDP."""

    def __init__(self, tiny: nn.Module) -> None:
        super().__init__()
        self.tiny = tiny

    def forward(self, latents: Tensor, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.tiny.decode(latents).sample, self.tiny.encode(images).latents


class TinyVAELoss:
    """TAESD's distillation (Bohan 2023), without its adversarial and LPIPS terms (no pretrained weights here):
    the tiny decoder learns the full VAE decoder's output D(z) on latents z drawn from the VAE's posterior of
    each training image (the neighbourhood samplers land in), ‖D_tiny(z) − D(z)‖₁ + ‖·‖²; the tiny encoder
    learns the posterior mean, weighted by ``encoder_weight``. ``decode`` is the full VAE's decoder on scaled
    latents (frozen)."""

    def __init__(self, decode, encoder_weight: float = 1.0) -> None:
        self.decode, self.encoder_weight = decode, encoder_weight

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        z = batch["latents"] + batch["latent_std"] * torch.randn_like(batch["latents"])
        with torch.no_grad():
            target = self.decode(z).float()
        decoded, encoded = model(z, batch["images"])
        diff = decoded.float() - target
        l1, mse = diff.abs().mean(), diff.square().mean()
        enc = (encoded.float() - batch["latents"].float()).square().mean()
        return l1 + mse + self.encoder_weight * enc, {"l1": float(l1.detach()), "mse": float(mse.detach()),
                                                      "encoder_mse": float(enc.detach())}
