"""Codecs: between images in [−1, 1] and the space a model's denoiser works in.

- :class:`PixelCodec`: the identity (pixel-space models); an x0-estimate is clipped to [−1, 1].
- :class:`VAECodec`: a diffusers ``AutoencoderKL``: latents are (the posterior means − the VAE's ``shift_factor``)
  × its ``scaling_factor`` (what Stable Diffusion trains and samples on, with no shift; SD3 and FLUX shift too, as
  their pipelines decode ``latents / scaling_factor + shift_factor``); latents are never clipped.
- :class:`TinyVAECodec`: a diffusers ``AutoencoderTiny`` (TAESD) in the VAE's place, on the same scaled
  latents (its ``scaling_factor`` is 1): the cheap decoder of real-time sampling (``--tiny-vae``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PixelCodec:
    """Images are the model's space."""

    factor = 1
    pixels = True         # the denoiser works on pixels: zero-shot editing's linear constraints apply to it
    resizable = False     # a pixel model samples its own size only

    def __init__(self, channels: int, image_size: int) -> None:
        self.channels, self.image_size = channels, image_size

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.channels, self.image_size, self.image_size

    def encode(self, images: Tensor) -> Tensor:
        return images

    def decode(self, x: Tensor) -> Tensor:
        return x.clamp(-1, 1)

    def clip(self, x0: Tensor) -> Tensor:
        """An x0-estimate kept inside the data's range (the zero-shot editing loop's clipping)."""
        return x0.clamp(-1, 1)

    def mask(self, known: Tensor) -> Tensor:
        return known

    def to(self, device) -> "PixelCodec":
        return self


class VAECodec:
    """Stable Diffusion's latent space."""

    pixels = False
    resizable = True      # any multiple of the VAE's factor (diffusers' rule)

    def __init__(self, vae: nn.Module, latent_channels: int, latent_size: int) -> None:
        self.vae = vae
        self.latent_channels, self.latent_size = latent_channels, latent_size

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.latent_channels, self.latent_size, self.latent_size

    @property
    def factor(self) -> int:
        """Pixels per latent along each side (8 for Stable Diffusion)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        """The latents' mean removed before scaling (SD3's and FLUX's VAEs; 0 for SD's, which has none)."""
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    def _ready(self) -> tuple[torch.device, torch.dtype]:
        """Where and in what precision the VAE runs: a half-precision VAE that says ``force_upcast`` (SD-XL's,
        whose fp16 decoder overflows) is moved to float32 first, as diffusers' pipelines do."""
        p = next(self.vae.parameters())
        if p.dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False):
            self.vae.to(torch.float32)
            p = next(self.vae.parameters())
        return p.device, p.dtype

    @torch.no_grad()
    def encode(self, images: Tensor, batch_size: int = 256) -> Tensor:
        """(VAE posterior means − shift factor) × scaling factor (float32 out)."""
        device, dtype = self._ready()
        out = [self.vae.encode(images[i:i + batch_size].to(device, dtype)).latent_dist.mean
               for i in range(0, len(images), batch_size)]
        return (torch.cat(out).float() - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: Tensor, batch_size: int = 256) -> Tensor:
        device, dtype = self._ready()
        out = [self.vae.decode((latents[i:i + batch_size] / self.scaling_factor + self.shift_factor).to(device, dtype)
                               ).sample.float()
               for i in range(0, len(latents), batch_size)]
        return torch.cat(out).clamp(-1, 1)

    def clip(self, x0: Tensor) -> Tensor:
        return x0

    def mask(self, known: Tensor) -> Tensor:
        """A pixel known-mask at latent resolution: a latent is known only where all its pixels are."""
        k = known.float()
        lead = k.shape[:-2]
        pooled = -F.max_pool2d(-k.reshape(-1, 1, *k.shape[-2:]), self.factor)
        return pooled.reshape(*lead, *pooled.shape[-2:]).bool()

    def to(self, device) -> "VAECodec":
        self.vae.to(device)
        return self


class TinyVAECodec(VAECodec):
    """A pipeline's latent space through a tiny autoencoder (TAESD, Bohan 2023): its encoder gives the scaled
    latents directly (no posterior), and :meth:`VAECodec.decode` works unchanged (scaling factor 1)."""

    @torch.no_grad()
    def encode(self, images: Tensor, batch_size: int = 256) -> Tensor:
        device = next(self.vae.parameters()).device
        return torch.cat([self.vae.encode(images[i:i + batch_size].to(device)).latents
                          for i in range(0, len(images), batch_size)]) * self.scaling_factor
