"""Train the embedded Stable-Diffusion-format teacher from scratch (DESIGN.md §4), in two stages on
the shared trainer:

1. the AutoencoderKL: reconstruction MSE + a small KL term (Rombach et al. 2022 §3, without the
   perceptual and adversarial terms, which need weights this machine cannot fetch);
2. the CLIPTextModel and UNet2DConditionModel together on the VAE's cached latents: the ε-prediction
   loss of Ho et al. 2020 on SD's scaled-linear schedule (:class:`fewstep.objectives.DenoisingLoss`),
   captions dropped to the empty prompt 10% of the time for classifier-free guidance.

There is no pretrained CLIP here, so the text encoder learns with the UNet (as Imagen's ablations
and small LDMs do); the result is saved as an ordinary diffusers pipeline folder.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from .data import ImageData
from .denoisers import VPDenoiser
from .objectives import DenoisingLoss
from .schedules import VPSchedule
from .sd import (SD_SCHEDULER, TinySDConfig, build_cond_unet, build_text_encoder, build_tokenizer, build_vae,
                 save_pipeline)
from .train import TrainConfig, train


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


class TextDenoiser(nn.Module):
    """denoiser(x, σ, input_ids=ids): the text encoder runs inside, so it trains with the UNet."""

    def __init__(self, text_encoder: nn.Module, unet: nn.Module, schedule: VPSchedule,
                 prediction_type: str = "epsilon") -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.denoiser = VPDenoiser(unet, schedule, prediction_type)

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.denoiser.scalings(sigma)

    def forward(self, x: Tensor, sigma: Tensor, input_ids: Tensor) -> Tensor:
        return self.denoiser(x, sigma, encoder_hidden_states=self.text_encoder(input_ids)[0])


def train_sd_teacher(data: ImageData, out: str | Path, config: TrainConfig, vae_steps: int = 1000,
                     vae_lr: float = 1e-3, vae_batch: int = 64, sizes: TinySDConfig = TinySDConfig(), caption_dropout: float = 0.1,
                     command: str = "") -> Path:
    """Train the VAE (``vae_steps`` of ``vae_batch`` at ``vae_lr``), then text encoder + UNet (``config``),
    and save a StableDiffusionPipeline folder at ``out``. Each stage resumes from its own checkpoints
    (``<out_dir>/vae``, ``<out_dir>/unet``)."""
    vae_config = replace(config, out_dir=f"{config.out_dir}/vae", max_steps=vae_steps, lr=vae_lr,
                         batch_size=vae_batch)
    unet_config = replace(config, out_dir=f"{config.out_dir}/unet")
    if data.captions is None:
        raise ValueError(f"{data.name} has no captions; a text-to-image teacher needs a captioned data set")
    torch.manual_seed(vae_config.seed)
    tokenizer = build_tokenizer(data.captions, sizes.vocab_size, sizes.max_length)
    vae = train(VAEWithKL(build_vae(sizes)), VAELoss(), {"images": data.images}, vae_config).ema.vae.eval()

    with torch.no_grad():
        posterior = torch.cat([vae.encode(data.images[i:i + 256]).latent_dist.mean for i in range(0, len(data), 256)])
    # SD's scaling_factor (0.18215 for SD 1.x) makes the latents unit-variance; computed the same way here
    vae.register_to_config(scaling_factor=float(1 / posterior.std()))
    latents = posterior * vae.config.scaling_factor

    ids = tokenizer(data.captions, padding="max_length", max_length=sizes.max_length, truncation=True,
                    return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=sizes.max_length, return_tensors="pt").input_ids[0]
    schedule = VPSchedule.from_diffusers_config(SD_SCHEDULER)
    torch.manual_seed(unet_config.seed)
    model = TextDenoiser(build_text_encoder(sizes, tokenizer), build_cond_unet(sizes), schedule)
    objective = DenoisingLoss(schedule, null_label=empty, label_dropout=caption_dropout,
                              batch_key="input_ids", cond_key="input_ids")
    result = train(model, objective, {"images": latents, "input_ids": ids}, unet_config)
    ema = result.ema
    info = {"kind": "diffusion", "dataset": data.name, "class_names": data.class_names,
            "default_sampler": "dpmpp-2m", "default_steps": 25, "default_guidance_scale": 3.0,
            "training": {"command": command, "sizes": asdict(sizes), "caption_dropout": caption_dropout,
                         "vae": asdict(vae_config), "unet": asdict(unet_config), "steps": result.step,
                         "final_loss": result.last_loss, "wall_seconds": round(result.seconds),
                         "parameters": {n: sum(p.numel() for p in m.parameters()) for n, m in
                                        (("unet", ema.denoiser.net), ("text_encoder", ema.text_encoder), ("vae", vae))}}}
    readme = (f"# {Path(out).name}\n\nA tiny Stable-Diffusion-format text-to-image pipeline trained from scratch on "
              f"fewstep's `{data.name}` set ({len(data)} captioned images, {sizes.image_size}×{sizes.image_size}). "
              f"Load it with `StableDiffusionPipeline.from_pretrained(folder)`.\n\nTrained with:\n\n```\n{command}\n```\n")
    return save_pipeline(out, ema.denoiser.net, vae, ema.text_encoder, tokenizer, info, readme=readme)
