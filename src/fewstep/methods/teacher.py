"""Teachers trained here from scratch (DESIGN.md §4), on the shared training loop.

- :func:`train_teacher`: a class-conditional pixel-space EDM diffusion model (Karras et al. 2022
  preconditioning on a diffusers ``UNet2DModel``), label dropout for classifier-free guidance.
- :func:`train_sd_teacher`: the tiny Stable-Diffusion-format text-to-image pipeline, in two stages:
  1. the AutoencoderKL (:class:`fewstep.objectives.autoencoder.VAELoss`);
  2. the CLIPTextModel and UNet2DConditionModel together on the VAE's latents (cached, or encoded per batch
     under a random crop or flip): the ε-prediction
     loss of Ho et al. 2020 on SD's scaled-linear schedule, captions dropped to the empty prompt 10% of
     the time for classifier-free guidance. There is no pretrained CLIP here, so the text encoder learns
     with the UNet (as Imagen's ablations and small LDMs do).
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import torch
from accelerate.state import PartialState
from torch import Tensor, nn

from ..core.denoisers import VPDenoiser
from ..core.parameterizations import parameterization as get_parameterization
from ..core.parameterizations import schedule_fields
from ..core.schedules import VPSchedule
from ..errors import FewstepError
from ..models.conditioners import padded_ids
from ..models.config import ModelConfig
from ..models.data import ImageData, prepared
from ..models.folders import SD_SCHEDULER, new_pipeline, new_pixel_model, save_model
from ..models.handle import raw_backbone
from ..nets.sdxl import AddedCondUNet, TinySDXLConfig, build_sdxl_unet, build_text_encoder_2, sdxl_embeddings, time_ids
from ..nets.unets import TinySDConfig, build_cond_unet, build_text_encoder, build_tokenizer, build_unet, build_vae
from ..objectives.autoencoder import VAELoss, VAEWithKL
from ..objectives.base import dropout_condition
from ..objectives.denoising import DenoisingLoss
from ..training import TrainConfig, train
from .common import Run, parameters, readme


def train_teacher(data: ImageData, out: str | Path, config: TrainConfig, width: int = 32,
                  label_dropout: float = 0.1, command: str = "", accelerator=None,
                  parameterization: str = "edm", init: nn.Module | None = None) -> Path | None:
    """Train on ``data`` with the denoising loss of ``parameterization``'s noise space and write the EMA weights
    as a model folder at ``out``: EDM's (Karras et al. 2022), or any registered space's — ``flow`` is the velocity
    loss of rectified flow on SD3's logit-normal times (:mod:`fewstep.core.flow`), since λ(σ) = 1/c_out² of its
    adapter makes ‖D − x_0‖²·λ = ‖v̂ − (ε − x_0)‖².

    ``init``: start from these backbone weights (another teacher's UNet of the same architecture, e.g. an EDM
    teacher re-learned as a flow model: its features carry over, its time embedding and output re-learn), as
    ECT (Geng et al. 2024) starts consistency training from a diffusion model; the default is a fresh UNet.

    Label dropout (to the null class) makes the one network both conditional and unconditional,
    so classifier-free guidance works at sampling time (Ho & Salimans 2022).
    Returns the folder (on the main process; None on the others).
    """
    run = Run(config, command, accelerator)
    param = get_parameterization(parameterization)
    schedule = param.make_schedule()
    model_config = ModelConfig(kind="diffusion", parameterization=param.name, schedule=schedule_fields(schedule),
                               image_size=data.image_size, channels=data.channels, class_names=data.class_names,
                               dataset=data.name, default_sampler=param.space.default_sampler)
    unet = build_unet(data.image_size, data.channels, data.num_classes, width=width)
    if init is not None:
        _copy_weights(raw_backbone(init), unet)
    model = new_pixel_model(model_config, unet)
    objective = DenoisingLoss(schedule, model.conditioner.training_condition(label_dropout))
    result = run.fit(model.denoiser, objective, model.training_data(data),
                     {"width": width, "label_dropout": label_dropout, "dataset": data.name,
                      "parameterization": param.name, "init": init is not None})
    if result is None:
        return None
    record = run.record("teacher", result, parameters=parameters(model.net))
    what = (f"A class-conditional {param.name} diffusion model on `{data.name}` ({len(data)} images, {data.num_classes} classes, "
            f"{data.image_size}×{data.image_size}), {record['parameters'] / 1e6:.2f}M parameters, EMA weights after "
            f"{result.step} steps.")
    return save_model(out, model.derive(net=result.ema.net, config=replace(model_config, training=record)),
                      readme(Path(out).name, what, f"```\nfewstep sample --model {out} --label 3 --out grid.png\n```",
                             command))


def _copy_weights(source: nn.Module, target: nn.Module) -> None:
    """``source``'s weights into ``target``, refused in one line unless every tensor has the same name and shape."""
    theirs, ours = source.state_dict(), target.state_dict()
    if {k: v.shape for k, v in theirs.items()} != {k: v.shape for k, v in ours.items()}:
        raise FewstepError("--init-from has another architecture than this teacher (its UNet's tensors differ in names "
                           "or shapes): give the same --width and data set, or leave --init-from out")
    target.load_state_dict(theirs)


class TextDenoiser(nn.Module):
    """denoiser(x, σ, input_ids=ids): the text encoder(s) run inside, so they train with the UNet. With two
    encoders it is SDXL's conditioning (:func:`fewstep.nets.sdxl.sdxl_embeddings`, constant time ids)."""

    def __init__(self, text_encoders: list[nn.Module], unet: nn.Module, schedule: VPSchedule,
                 time_ids: Tensor | None = None, prediction_type: str = "epsilon") -> None:
        super().__init__()
        self.text_encoders = nn.ModuleList(text_encoders)
        self.time_ids = time_ids
        self.denoiser = VPDenoiser(AddedCondUNet(unet) if len(text_encoders) == 2 else unet, schedule, prediction_type)

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.denoiser.scalings(sigma)

    def forward(self, x: Tensor, sigma: Tensor, input_ids: Tensor) -> Tensor:
        if len(self.text_encoders) == 1:
            return self.denoiser(x, sigma, encoder_hidden_states=self.text_encoders[0](input_ids)[0])
        hidden, pooled = sdxl_embeddings(*self.text_encoders, input_ids, input_ids)
        return self.denoiser(x, sigma, encoder_hidden_states=hidden, text_embeds=pooled,
                             time_ids=self.time_ids.to(x).expand(len(x), -1))


def train_vae(data: ImageData, config: TrainConfig, sizes: TinySDConfig) -> nn.Module:
    """The AutoencoderKL on the images, with SD's scaling_factor computed so its latents are unit-variance."""
    torch.manual_seed(config.seed)
    vae = train(VAEWithKL(build_vae(sizes)), VAELoss(), prepared(data, lambda d: {"images": d.images}),
                config, everywhere=True).ema.vae.eval()         # every process encodes the UNet's latents with it
    with torch.no_grad():
        posterior = torch.cat([vae.encode(data.images[i:i + 256]).latent_dist.mean for i in range(0, len(data), 256)])
    vae.register_to_config(scaling_factor=float(1 / posterior.std()))   # 0.18215 for SD 1.x, computed likewise
    return vae


def train_sd_teacher(data: ImageData, out: str | Path, config: TrainConfig, vae_steps: int = 1000,
                     vae_lr: float = 1e-3, vae_batch: int = 64, sizes: TinySDConfig | None = None,
                     caption_dropout: float = 0.1, command: str = "", xl: bool = False, vae: nn.Module | None = None
                     ) -> Path | None:
    """Train the VAE (``vae_steps`` of ``vae_batch`` at ``vae_lr``; or take ``vae``, e.g. another teacher's),
    then the text encoder(s) + UNet (``config``), and save (the main process; the others return None) a
    StableDiffusionPipeline folder at ``out`` — an
    SDXL one (two text encoders, pooled text and time ids; the empty prompt as the unconditional input) with
    ``xl``. Each stage resumes from its own checkpoints (``<out_dir>/vae``, ``<out_dir>/unet``)."""
    sizes = sizes or (TinySDXLConfig() if xl else TinySDConfig())
    vae_config = replace(config, out_dir=f"{config.out_dir}/vae", max_steps=vae_steps, lr=vae_lr, batch_size=vae_batch)
    unet_config = replace(config, out_dir=f"{config.out_dir}/unet")
    if data.captions is None:
        raise ValueError(f"{data.name} has no captions; a text-to-image teacher needs a captioned data set")
    torch.manual_seed(vae_config.seed)
    tokenizer = build_tokenizer(data.captions, sizes.vocab_size, sizes.max_length)
    vae = vae.eval() if vae is not None else train_vae(data, vae_config, sizes)

    @torch.no_grad()
    def latents_and_ids(d: ImageData) -> dict[str, Tensor]:
        """The VAE latents of ``d``'s images and its captions' token ids (the text encoder trains with the UNet)."""
        latents = torch.cat([vae.encode(d.images[i:i + 256].to(vae.device)).latent_dist.mean.cpu()
                             for i in range(0, len(d), 256)]) * vae.config.scaling_factor
        return {"images": latents, "input_ids": padded_ids(tokenizer, d.captions)}
    tensors = prepared(data, latents_and_ids)    # once, or per batch under a random crop or flip
    empty = padded_ids(tokenizer, [""])[0]
    schedule = VPSchedule.from_diffusers_config(SD_SCHEDULER)
    torch.manual_seed(unet_config.seed)
    encoders = [build_text_encoder(sizes, tokenizer)] + ([build_text_encoder_2(sizes, tokenizer)] if xl else [])
    unet = build_sdxl_unet(sizes) if xl else build_cond_unet(sizes)
    model = TextDenoiser(encoders, unet, schedule, time_ids((sizes.image_size, sizes.image_size)) if xl else None)
    objective = DenoisingLoss(schedule, dropout_condition({"input_ids": "input_ids"}, {"input_ids": empty},
                                                          caption_dropout))
    result = train(model, objective, tensors, unet_config)
    if not PartialState().is_main_process:       # under accelerate launch the main process alone saves
        return None
    ema = result.ema
    names = ("text_encoder", "text_encoder_2")
    training = {"command": command, "sizes": asdict(sizes), "caption_dropout": caption_dropout,
                "vae": asdict(vae_config) if vae_steps else "reused", "unet": asdict(unet_config), "steps": result.step,
                "final_loss": result.last_loss, "wall_seconds": round(result.seconds),
                "parameters": {n: parameters(m) for n, m in (("unet", unet), *zip(names, ema.text_encoders),
                                                             ("vae", vae))}}
    config_ = ModelConfig(kind="diffusion", parameterization="vp", image_size=sizes.image_size, channels=3,
                          class_names=data.class_names, dataset=data.name, default_sampler="dpmpp-2m", default_steps=25,
                          default_guidance_scale=3.0, training=training)
    kind = "SDXL" if xl else "Stable-Diffusion"
    what = (f"A tiny {kind}-format text-to-image pipeline trained from scratch on fewstep's `{data.name}` "
            f"set ({len(data)} captioned images, {sizes.image_size}×{sizes.image_size}).")
    te = dict(zip(names, ema.text_encoders))
    pipeline = new_pipeline(config_, raw_backbone(ema.denoiser.net), vae, te["text_encoder"], tokenizer, out,
                            text_encoder_2=te.get("text_encoder_2"), tokenizer_2=tokenizer if xl else None,
                            force_zeros=False)
    cls = "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline"
    return save_model(out, pipeline, readme(Path(out).name, what, f"Load it with `{cls}.from_pretrained(folder)`.",
                                            command))
