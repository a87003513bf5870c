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

import copy
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
from ..nets.flow_transformers import TinyFlowConfig
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
    """denoiser(x, σ, input_ids=ids[, input_ids_2=ids_2]): the text encoders run inside (``embed``: encoders, ids →
    the backbone's keyword arguments, the family's own formula), so they train with the backbone."""

    def __init__(self, text_encoders: list[nn.Module], denoiser: nn.Module, embed) -> None:
        super().__init__()
        self.text_encoders = nn.ModuleList(text_encoders)
        self.denoiser, self.embed = denoiser, embed

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.denoiser.scalings(sigma)

    def forward(self, x: Tensor, sigma: Tensor, **ids: Tensor) -> Tensor:
        return self.denoiser(x, sigma, **self.embed(list(self.text_encoders), [ids[k] for k in sorted(ids)]))


def _sd_embed(encoders: list[nn.Module], ids: list[Tensor]) -> dict[str, Tensor]:
    return {"encoder_hidden_states": encoders[0](ids[0])[0]}


def _sdxl_embed(time_ids_row: Tensor):
    def embed(encoders: list[nn.Module], ids: list[Tensor]) -> dict[str, Tensor]:
        hidden, pooled = sdxl_embeddings(*encoders, ids[0], ids[0])      # one tokenizer for both encoders here
        return {"encoder_hidden_states": hidden, "text_embeds": pooled,
                "time_ids": time_ids_row.to(hidden).expand(len(hidden), -1)}
    return embed


def _flow_embed(family):
    """The family's text embedding on (CLIP ids, T5 ids): each encoder reads its tokenizer's (every CLIP of the tiny
    teachers shares one tokenizer; FLUX: CLIP, T5; SD3: CLIP-L, CLIP-G, T5)."""
    def embed(encoders: list[nn.Module], ids: list[Tensor]) -> dict[str, Tensor]:
        hidden, pooled = family.embed(encoders, [ids[1] if e[2] == "T5EncoderModel" else ids[0]
                                                 for e in family.encoders])
        return {"encoder_hidden_states": hidden, "pooled_projections": pooled}
    return embed


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
    embed = _sdxl_embed(time_ids((sizes.image_size, sizes.image_size))) if xl else _sd_embed
    model = TextDenoiser(encoders, VPDenoiser(AddedCondUNet(unet) if xl else unet, schedule), embed)
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


def shifted_vae(vae: nn.Module, data: ImageData) -> nn.Module:
    """A copy of ``vae`` with the ``shift_factor`` and ``scaling_factor`` that make ``data``'s latents zero-mean and
    unit-variance, as SD3's and FLUX's VAEs carry them (their pipelines decode ``z / scaling + shift``)."""
    vae = copy.deepcopy(vae).eval()
    with torch.no_grad():
        posterior = torch.cat([vae.encode(data.images[i:i + 256].to(vae.device)).latent_dist.mean.cpu()
                               for i in range(0, len(data), 256)])
    vae.register_to_config(shift_factor=float(posterior.mean()), scaling_factor=float(1 / posterior.std()))
    return vae


def train_flow_teacher(data: ImageData, out: str | Path, config: TrainConfig, vae: nn.Module, family: str = "flux",
                       sizes: TinyFlowConfig | None = None, caption_dropout: float = 0.1, shift: float | None = None,
                       command: str = "") -> Path | None:
    """A tiny FLUX- or SD3-format text-to-image pipeline (:mod:`fewstep.models.flow_pipelines`) on ``data``: the
    text encoders (CLIP(s) and a T5, with a CLIP BPE and a T5 Unigram tokenizer learned from the captions) and the
    transformer trained together with the rectified-flow velocity loss (:mod:`fewstep.core.flow`; SD3's
    logit-normal times, shifted by ``shift``: FLUX.1-schnell's 1.0 or SD3's 3.0 by default) on the latents of
    ``vae`` (another teacher's, e.g. models/emoji-sd's), shifted and scaled to unit variance (:func:`shifted_vae`);
    captions dropped to the empty prompt at ``caption_dropout`` for classifier-free guidance (FLUX's "true CFG").
    Saved in diffusers' layout: ``FluxPipeline`` / ``StableDiffusion3Pipeline.from_pretrained`` run it."""
    from ..core.flow import FlowDenoiser, FlowSchedule
    from ..models.flow_pipelines import FAMILY_NAMED, new_flow_pipeline
    from ..nets.flow_transformers import build_t5_tokenizer, flow_backbone

    if family not in FAMILY_NAMED:
        raise FewstepError(f"unknown flow family {family!r}; choose {' or '.join(FAMILY_NAMED)}")
    if data.captions is None:
        raise FewstepError(f"{data.name} has no captions; a text-to-image teacher needs a captioned data set")
    spec, sizes = FAMILY_NAMED[family], sizes or TinyFlowConfig(image_size=data.image_size)
    shift = shift if shift is not None else spec.default_shift
    torch.manual_seed(config.seed)
    vae = shifted_vae(vae, data)
    clip_tok = build_tokenizer(data.captions, sizes.vocab_size, sizes.max_length)
    t5_tok = build_t5_tokenizer(data.captions, sizes.t5_vocab_size, sizes.max_length)

    @torch.no_grad()
    def latents_and_ids(d: ImageData) -> dict[str, Tensor]:
        z = torch.cat([vae.encode(d.images[i:i + 256].to(vae.device)).latent_dist.mean.cpu()
                       for i in range(0, len(d), 256)])
        return {"images": (z - vae.config.shift_factor) * vae.config.scaling_factor,
                "input_ids": padded_ids(clip_tok, d.captions), "input_ids_2": padded_ids(t5_tok, d.captions)}
    tensors = prepared(data, latents_and_ids)
    side = data.image_size // 2 ** (len(vae.config.block_out_channels) - 1)
    encoders, transformer = spec.tiny(sizes, clip_tok, t5_tok, vae.config.latent_channels, side)
    schedule_config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": shift}
    schedule = FlowSchedule(shift=shift, base_grid=spec.base_grid)
    model = TextDenoiser(encoders, FlowDenoiser(flow_backbone(transformer), schedule), _flow_embed(spec))
    empty = {"input_ids": padded_ids(clip_tok, [""])[0], "input_ids_2": padded_ids(t5_tok, [""])[0]}
    objective = DenoisingLoss(schedule, dropout_condition({k: k for k in empty}, empty, caption_dropout))
    result = train(model, objective, tensors, config)
    if not PartialState().is_main_process:       # under accelerate launch the main process alone saves
        return None
    ema = result.ema
    encoder_names = [e[0] for e in spec.encoders]
    trained = dict(zip(encoder_names, ema.text_encoders))
    training = {"command": command, "sizes": asdict(sizes), "caption_dropout": caption_dropout, "shift": shift,
                "train": asdict(config), "steps": result.step, "final_loss": result.last_loss,
                "wall_seconds": round(result.seconds),
                "parameters": {"transformer": parameters(transformer),
                               **{n: parameters(m) for n, m in trained.items()}, "vae": parameters(vae)}}
    model_config = ModelConfig(kind="diffusion", parameterization="flow", image_size=data.image_size, channels=3,
                               class_names=data.class_names, dataset=data.name, default_sampler="euler",
                               default_steps=28, default_guidance_scale=3.0, training=training)
    tokenizers = {e[1]: (t5_tok if e[2] == "T5EncoderModel" else clip_tok) for e in spec.encoders}
    pipeline = new_flow_pipeline(model_config, spec, raw_backbone(ema.denoiser.net), vae, out, schedule_config,
                                 **trained, **tokenizers)
    what = (f"A tiny {spec.title}-format text-to-image pipeline (rectified flow, "
            f"{spec.transformer}) trained from scratch on fewstep's `{data.name}` set ({len(data)} captioned images, "
            f"{data.image_size}×{data.image_size}), {parameters(transformer) / 1e6:.2f}M transformer parameters.")
    usage = (f"```python\nfrom diffusers import {spec.pipeline}\npipe = {spec.pipeline}.from_pretrained('{out}')\n"
             f"image = pipe('grinning face', num_inference_steps=28, {spec.guidance_args(3.0)}, height={data.image_size}, "
             f"width={data.image_size}, max_sequence_length={sizes.max_length}).images[0]\n```\n\n"
             f"(`max_sequence_length`: its T5 was trained on {sizes.max_length} tokens.)")
    return save_model(out, pipeline, readme(Path(out).name, what, usage, command))
