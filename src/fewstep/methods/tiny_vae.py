"""A tiny decoder for a pipeline (TAESD, Bohan 2023; the decoder StreamDiffusion, Kodaira et al. 2023, runs
in real time): an ``AutoencoderTiny`` (:func:`fewstep.nets.tiny_vae.build_tiny_vae`) distilled against the
pipeline's own VAE with :class:`fewstep.objectives.autoencoder.TinyVAELoss` — the decoder on latents drawn
from the VAE's posterior of each training image and, given a few-step model of the pipeline (an LCM), on the
latents it samples for the captions (what a real-time server decodes), the encoder on the posterior means
(and on the VAE's decodings of the sampled latents). The pipeline is
untouched; the result is an ``AutoencoderTiny`` folder in diffusers' layout that ``--tiny-vae`` takes and
diffusers pipelines accept as ``pipe.vae``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..core.solvers import get_sampler
from ..errors import FewstepError
from ..models.config import CONFIG_NAME
from ..models.data import ImageData, prepared
from ..models.folders import write_folder
from ..models.handle import Model
from ..models.tiny_vae import KIND as TINY_VAE
from ..nets.tiny_vae import build_tiny_vae
from ..objectives.autoencoder import TinyVAELoss, TinyVAEPair
from ..sampling.generate import condition_batch, sampler_options
from ..sampling.grids import sampling_grid
from ..training import TrainConfig
from .common import Run, parameters, readme


@dataclass
class TinyVAESettings:
    width: int = 16                              # channels at every resolution (TAESD: 64, for 512² images)
    decoder_blocks: tuple[int, ...] = (2, 1, 0)  # residual blocks per resolution, latent resolution first: the
                                                 # work at the latent size is cheap, at full size dear
    encoder_blocks: tuple[int, ...] = (1, 1, 1)
    encoder_weight: float = 1.0                  # of the encoder's latent MSE beside the decoder's pixel loss
    sample_model: str | None = None              # a few-step model whose sampled latents join the training set


@torch.no_grad()
def posterior(base: Model, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior's mean and std of each image, in the pipeline's scaled latent space."""
    vae, sf = base.parts["vae"], base.codec.scaling_factor
    device = next(vae.parameters()).device
    dists = [vae.encode(images[i:i + batch_size].to(device)).latent_dist for i in range(0, len(images), batch_size)]
    return torch.cat([d.mean for d in dists]).cpu() * sf, torch.cat([d.std for d in dists]).cpu() * sf


@torch.no_grad()
def sampled_latents(model: Model, prompts: list[str], seed: int = 0, batch_size: int = 256) -> torch.Tensor:
    """The latents ``model`` samples for ``prompts`` at its default steps, sampler and guidance scale, not
    decoded (the sampling loop of :func:`fewstep.sampling.generate.generate`, stopped before the codec)."""
    c = model.config
    grid, fn = sampling_grid(model, c.default_steps, c.default_sampler), get_sampler(c.default_sampler).fn
    generator, out = torch.Generator().manual_seed(seed), []
    for start in range(0, len(prompts), batch_size):
        b = min(batch_size, len(prompts) - start)
        kwargs, _ = condition_batch(model, prompts, start, b)
        den, extra = model.guided(kwargs, c.default_guidance_scale)
        x = (torch.randn((b, *model.shape), generator=generator) * model.schedule.prior_std(grid[0])).to(model.device)
        out.append(fn(den, x, grid, extra_args=extra, generator=generator,
                      **sampler_options(model, c.default_sampler)).cpu())
    return torch.cat(out)


def training_set(base: Model, data: ImageData, sampler: Model | None) -> dict[str, torch.Tensor]:
    """Images, latents and posterior stds: the data's posterior, plus (with ``sampler``) the latents it samples
    for the data's captions beside the VAE's decodings of them (std 0: decoded as sampled)."""
    mean, std = posterior(base, data.images)
    tensors = {"images": data.images, "latents": mean, "latent_std": std}
    if sampler is None:
        return tensors
    if data.captions is None or sampler.codec.shape != base.codec.shape:
        raise FewstepError(f"--sample-model {sampler.path} must be a few-step model of {base.path} trained on captions")
    z = sampled_latents(sampler, data.captions)
    extra = {"images": base.codec.decode(z.to(base.device)).cpu(), "latents": z, "latent_std": torch.zeros_like(z)}
    return {k: torch.cat([tensors[k], extra[k]]) for k in tensors}


def distill_tiny_vae(base: Model, data: ImageData, out: str | Path, config: TrainConfig,
                     settings: TinyVAESettings | None = None, command: str = "", accelerator=None,
                     sampler: Model | None = None) -> Path | None:
    """Distil a tiny VAE for ``base`` (a pipeline) on ``data`` (and ``sampler``'s latents, if given) and write it at
    ``out`` (None on non-main processes)."""
    settings = settings or TinyVAESettings()
    if "vae" not in base.parts:                  # the VAE the tiny one learns to decode like
        raise FewstepError(f"{base.path} is not a text-to-image pipeline with a VAE; a tiny VAE is distilled from one "
                           f"(e.g. models/emoji-sd)")
    run = Run(config, command, accelerator)
    base.check_data(data)
    base.to(run.device)
    if sampler is not None and not data.fixed:
        raise FewstepError("--sample-model adds latents sampled once for the captions to the training set; it "
                           "cannot be combined with a set whose batches are computed as they are cut (--crop random, --flip, "
                           "--stream): leave those out")
    sampler = sampler.to(run.device) if sampler is not None else None
    tensors = prepared(data, lambda d: training_set(base, d, sampler))   # once, or per batch (a random crop or flip)
    tiny = build_tiny_vae(base.codec.latent_channels, base.codec.factor, settings.width, settings.decoder_blocks,
                          settings.encoder_blocks)
    result = run.fit(TinyVAEPair(tiny), TinyVAELoss(base.codec.decode, settings.encoder_weight),
                     tensors, settings)
    if result is None:
        return None
    tiny = result.ema.tiny.requires_grad_(False).eval()
    record = run.record(TINY_VAE, result, base.path, decoder_parameters=parameters(tiny.decoder),
                        encoder_parameters=parameters(tiny.encoder), vae_decoder_parameters=parameters(base.parts["vae"].decoder))
    info = {"kind": TINY_VAE, "base": str(base.path), "dataset": data.name, "settings": asdict(settings),
            "training": record}
    what = (f"A tiny autoencoder (TAESD-style `AutoencoderTiny`) distilled against `{base.path}`'s VAE on `{data.name}` "
            f"({len(data)} images): decoder {record['decoder_parameters'] / 1e3:.0f}k parameters against the VAE "
            f"decoder's {record['vae_decoder_parameters'] / 1e3:.0f}k. It decodes the pipeline's scaled latents.")
    usage = (f"```\nfewstep sample --model {base.path} --tiny-vae {out} --prompt \"red apple\"\nfewstep serve --model "
             f"{base.path} --tiny-vae {out}\n```\n\nIn diffusers: `pipe.vae = AutoencoderTiny.from_pretrained(\"{out}\")`.")

    def write(tmp: Path) -> None:
        tiny.save_pretrained(tmp, safe_serialization=True)
        # AutoencoderTiny records its decoder widths as block_out_channels (what pipelines read the spatial factor
        # from) but does not take them back: dropped from the file, so loading it warns of nothing
        config = json.loads((tmp / "config.json").read_text())
        config.pop("block_out_channels", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / CONFIG_NAME).write_text(json.dumps(info, indent=2) + "\n")
    return write_folder(out, write, readme(Path(out).name, what, usage, command))
