"""Model folders: load any folder fewstep can use as a :class:`~fewstep.models.handle.Model`, and write one.

Two layouts, both safetensors + JSON, never pickles, and loading never executes code (DESIGN.md §2):

    PIXEL MODEL/                         PIPELINE/ (diffusers' own layout)
      fewstep.json   what it is            model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/
      unet/          UNet2DModel           fewstep.json (optional: any local SD 1.x/2.x folder works)
      README.md                            README.md

and, read only, a single-file original-format SD 1.x/2.x/SDXL ``.safetensors`` checkpoint, or a FLUX / SD3
transformer's with a folder's other parts (:mod:`.single_file`).

``StableDiffusionPipeline.from_pretrained`` (or ``LatentConsistencyModelPipeline`` for an LCM) loads a
pipeline folder unchanged. A progressive-distillation folder holds its other students as complete
folders under ``students/N/`` (:func:`serving` picks the one of a step count). Every write is atomic:
a temporary folder renamed into place when complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable

import torch

from ..errors import FewstepError
from ..io.atomic import atomic_path
from ..nets.guided import GuidedUNet
from ..nets.sdxl import time_ids
from . import checks
from .codecs import PixelCodec, VAECodec
from .conditioners import LabelConditioner, SDXLConditioner, TextConditioner
from .config import (
    CONFIG_NAME,
    ModelConfig,
    parse_config,
    pipeline_defaults,
    read_json,
    scheduler_fields,
    upgrade,
)
from .flow_pipelines import flow_family, flow_pipeline_of, flow_scheduler_config, load_flow_parts, new_flow_pipeline
from .handle import Model
from .loading import load_text_encoder, pipeline_class

PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SCHEDULER_FIELDS = ("schedule", "prediction_type", "original_inference_steps", "timestep_scaling")

# Stable Diffusion 1.x's scheduler (CompVis/stable-diffusion-v1-4 scheduler_config.json), so that
# LCMScheduler.from_config / DDIMScheduler.from_config give what SD users get.
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                    timestep_spacing="leading")


def shipped_models_dir() -> Path:
    """Where the shipped models live: $FEWSTEP_MODELS, else the repository's models/, else ./models."""
    if os.environ.get("FEWSTEP_MODELS"):
        return Path(os.environ["FEWSTEP_MODELS"])
    repo = Path(__file__).resolve().parents[3] / "models"
    return repo if repo.is_dir() else Path("models")


def is_pipeline_folder(folder: str | Path) -> bool:
    return (Path(folder) / "model_index.json").exists()


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


# --- loading ------------------------------------------------------------------------------------------
def load_model(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
               variant: str | None = None, config: str | Path | None = None) -> Model:
    """Load a pixel model folder, a diffusers pipeline folder or a single-file SD 1.x/2.x/SDXL ``.safetensors``
    checkpoint (weights from safetensors only), frozen; a pipeline's weights in ``dtype`` (default float32; a
    torch dtype or its name) from its ``variant`` files (e.g. "fp16"); a single file's architecture from
    ``config`` (a local diffusers folder) or the shipped config of its type (:mod:`.single_file`)."""
    folder = Path(folder)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if folder.is_file():
        if variant:
            raise FewstepError(f"{folder} is a single file: --variant picks the weight files of a folder")
        from .single_file import read_single_file

        checks.check_file(folder)
        parts = read_single_file(folder, dtype, config, pipeline_class)
        if "family" in parts:                     # a FLUX / SD3 transformer with its folder's other parts
            model = new_flow_pipeline(path=folder, **parts)
        else:
            model = new_pipeline(path=folder, **parts)
        checks.check_loaded(model)
        return model.eval().to(device)
    if not folder.is_dir():
        raise FewstepError(f"model folder {folder} does not exist (nor a checkpoint file of that name)")
    if config is not None:
        raise FewstepError(f"config {config} is for single-file checkpoints; {folder} is a folder with its own configs")
    checks.check_folder(folder)           # every config and weights header, before anything is built (fewstep.io.validate)
    model = _load_pipeline(folder, dtype, variant) if is_pipeline_folder(folder) else _load_pixel(folder)
    checks.check_loaded(model)            # every weight finite
    return model.eval().to(device)


def _load_pixel(folder: Path) -> Model:
    from diffusers import UNet2DModel

    path = folder / CONFIG_NAME
    if not path.exists():
        raise FewstepError(f"{folder} is not a fewstep model folder (no {CONFIG_NAME}) nor a diffusers pipeline "
                           f"(no model_index.json)")
    config = parse_config(read_json(path), path)
    try:
        unet = UNet2DModel.from_pretrained(folder / "unet", use_safetensors=True)
    except Exception as e:  # diffusers raises OSError/ValueError/safetensors errors for bad files
        raise FewstepError(f"cannot load the weights in {folder / 'unet'} (missing or corrupt): {_first_line(e)}") from None
    net = GuidedUNet.from_unet_folder(unet, folder / "unet", config.embedding_dim) if config.guidance_range else unet
    return new_pixel_model(config, net, folder)


def _load_pipeline(folder: Path, dtype: torch.dtype | None = None, variant: str | None = None) -> Model:
    """An SD 1.x/2.x or SDXL pipeline folder: its parts checked against each other from their configs first,
    then the weights (safetensors only) in ``dtype`` (default float32, whatever the files hold) from the
    ``variant`` files (default: the plain ones, or the fp16 ones where only those exist)."""
    index = read_json(folder / "model_index.json")
    family = flow_family(index, folder)
    if family is not None:
        return _load_flow_pipeline(folder, family, dtype, variant)
    xl = "text_encoder_2" in index or (folder / "text_encoder_2").is_dir()
    if xl and not (folder / "text_encoder").is_dir():
        raise FewstepError(f"{folder} is an SDXL refiner (one text encoder, for img2img on a base model's latents); "
                           f"fewstep takes SDXL base pipelines (text_encoder/ and text_encoder_2/)")
    parts = PIPELINE_PARTS + (("text_encoder_2", "tokenizer_2") if xl else ())
    missing = [p for p in parts if not (folder / p).is_dir()]
    if missing:
        raise FewstepError(f"{folder} lacks {', '.join(missing)}/: not a Stable-Diffusion{'-XL' if xl else ''}-style "
                           f"pipeline")
    _check_parts_fit(folder, xl)
    variant = variant or _only_variant(folder)
    loaded = _weights(lambda: _load_parts(folder, xl, dtype or torch.float32, variant), folder, variant)
    scheduler_config = read_json(folder / "scheduler" / "scheduler_config.json")
    config = _folder_config(folder, scheduler_config, loaded["vae"], scheduler_fields(scheduler_config))
    return new_pipeline(config, path=folder, scheduler_config=scheduler_config,
                        force_zeros=index.get("force_zeros_for_empty_prompt", True), **loaded)


def _load_flow_pipeline(folder: Path, family, dtype: torch.dtype | None, variant: str | None) -> Model:
    """A FLUX / SD3 folder (:mod:`.flow_pipelines`), as :func:`_load_pipeline` loads the UNet families."""
    variant = variant or _only_variant(folder, "transformer")
    loaded = _weights(lambda: load_flow_parts(folder, family, dtype or torch.float32, variant), folder, variant)
    scheduler_config = read_json(folder / "scheduler" / "scheduler_config.json")
    config = _folder_config(folder, scheduler_config, loaded["vae"])   # its schedule: new_flow_pipeline's, by family
    return new_flow_pipeline(config, family, path=folder, scheduler_config=scheduler_config, **loaded)


def _weights(load: Callable[[], dict], folder: Path, variant: str | None) -> dict:
    """``load()``'s parts, a library's error while reading the weights as one line."""
    try:
        return load()
    except FewstepError:
        raise
    except Exception as e:  # diffusers/transformers raise OSError/ValueError/safetensors errors
        raise FewstepError(f"cannot load the pipeline in {folder} (missing or corrupt weights"
                           f"{f', variant {variant}' if variant else ''}): {_first_line(e)}") from None


def _folder_config(folder: Path, scheduler_config: dict, vae, fields: dict | None = None) -> ModelConfig:
    """A pipeline folder's ModelConfig: what its scheduler says it is, then its fewstep.json (if fewstep wrote one),
    then ``fields`` (its scheduler's schedule, the source of truth)."""
    raw = upgrade(read_json(folder / CONFIG_NAME)) if (folder / CONFIG_NAME).exists() else {}
    return parse_config({**pipeline_defaults(scheduler_config, vae.config.sample_size), **raw, **(fields or {})},
                        folder / CONFIG_NAME)


def _load_parts(folder: Path, xl: bool, dtype: torch.dtype, variant: str | None) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    kw = {"use_safetensors": True, "torch_dtype": dtype, "variant": variant}
    parts = {"unet": UNet2DConditionModel.from_pretrained(folder / "unet", **kw),
             "vae": AutoencoderKL.from_pretrained(folder / "vae", **kw),
             "text_encoder": load_text_encoder(CLIPTextModel, folder / "text_encoder", kw),
             "tokenizer": CLIPTokenizer.from_pretrained(folder / "tokenizer")}
    if xl:
        parts["text_encoder_2"] = load_text_encoder(CLIPTextModelWithProjection, folder / "text_encoder_2", kw)
        parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(folder / "tokenizer_2")
    return parts


def _only_variant(folder: Path, backbone: str = "unet") -> str | None:
    """"fp16" when the UNet (or ``backbone``) has only fp16-variant weights (a folder saved with ``variant="fp16"``)."""
    unet = folder / backbone
    if any(unet.glob("diffusion_pytorch_model*.safetensors")) and not any(
            p for p in unet.glob("diffusion_pytorch_model*.safetensors") if ".fp16." not in p.name):
        return "fp16"
    return None


def _check_parts_fit(folder: Path, xl: bool = False) -> None:
    """The parts' configs agree (read before any weights, so the error names the real problem)."""
    try:
        unet, vae, text = (json.loads((folder / part / "config.json").read_text())
                           for part in ("unet", "vae", "text_encoder"))
        text_2 = json.loads((folder / "text_encoder_2" / "config.json").read_text()) if xl else {}
    except (OSError, ValueError) as e:
        raise FewstepError(f"{folder}: a part's config.json is missing or corrupt: {e}") from None
    if (unet.get("addition_embed_type") == "text_time") != xl:
        raise FewstepError(f"{folder}: the UNet {'lacks' if xl else 'has'} SDXL's added text/time conditioning but the "
                           f"folder has {'two text encoders' if xl else 'one text encoder'}; the parts do not belong "
                           f"together")
    if vae.get("latent_channels") != unet.get("in_channels"):
        raise FewstepError(f"{folder}: the VAE makes {vae.get('latent_channels')}-channel latents but the UNet takes "
                           f"{unet.get('in_channels')} channels; the parts do not belong together")
    width = text.get("hidden_size", 0) + text_2.get("hidden_size", 0)
    if width != unet.get("cross_attention_dim"):
        what = "text encoders' widths add up to" if xl else "text encoder's width is"
        raise FewstepError(f"{folder}: the {what} {width}, not the UNet's cross_attention_dim "
                           f"{unet.get('cross_attention_dim')}")


def serving(model: Model, steps: int) -> Model:
    """The model that serves ``steps``: itself, unless it is a progressive folder, whose students each serve
    one step count (``students/N/``); a count no student was distilled for is a clear error."""
    serves = model.config.serves_steps
    if not serves:
        return model
    if steps not in serves:
        teacher = model.config.training.get("teacher", "")
        raise FewstepError(f"{model.path} is a progressive student distilled for {', '.join(map(str, serves))} step(s); "
                           f"use --steps {' or '.join(map(str, serves))} (for other counts sample its stage-1 teacher "
                           f"{teacher})".rstrip())
    if steps == model.config.default_steps:
        return model
    return load_model(model.path / "students" / str(steps), model.device)


# --- writing ------------------------------------------------------------------------------------------
def write_folder(folder: str | Path, write: Callable[[Path], None], readme: str = "", kind: str | None = None) -> Path:
    """Write a folder atomically: ``write(tmp)`` fills a temporary sibling (plus ``readme`` as README.md),
    which then takes the place of ``folder`` (:func:`fewstep.io.atomic.atomic_path`: refused before any
    work if ``folder`` is an input or a folder fewstep did not write; only fewstep's files there are replaced,
    and only once the new ones are complete; the folder is marked as fewstep's, recording ``kind``, default
    the ``kind`` of its fewstep.json). The one folder writer of models, LoRAs and checkpoints' outputs."""
    folder = Path(folder)
    with atomic_path(folder, directory=True, kind=kind) as tmp:
        write(tmp)
        if readme:
            (tmp / "README.md").write_text(readme)
    return folder


def save_model(folder: str | Path, model: Model, readme: str = "", students: dict[int, Model] | None = None) -> Path:
    """Write ``model`` as a folder of its kind (a pipeline in diffusers' layout, or a pixel model folder),
    with ``students`` (a progressive folder's other step counts) as complete folders under ``students/N/``."""
    def write(tmp: Path) -> None:
        write_model(tmp, model)
        for n, student in (students or {}).items():
            write_model(tmp / "students" / str(n), student)
    return write_folder(folder, write, readme)


def write_model(folder: Path, model: Model) -> None:
    """Fill ``folder`` (new or empty) with ``model``'s files; non-finite weights are never written."""
    if not all(bool(torch.isfinite(p).all()) for p in model.net.parameters()):
        raise FewstepError(f"refusing to save {folder.name}: its weights are not finite (NaN or inf); "
                           f"check the LoRA weights or the training settings (a lower --lr)")
    folder.mkdir(parents=True, exist_ok=True)
    if model.is_pipeline:
        pipeline_of(model).save_pretrained(folder, safe_serialization=True)
        raw = {k: v for k, v in json.loads(model.config.to_json()).items() if k not in SCHEDULER_FIELDS}
        (folder / CONFIG_NAME).write_text(json.dumps(raw, indent=2) + "\n")
    else:
        model.net.save_pretrained(folder / "unet", safe_serialization=True)
        (folder / CONFIG_NAME).write_text(model.config.to_json())


def scheduler_config_of(model: Model) -> dict:
    """The diffusers scheduler config a pipeline model is saved with: its own, and for an LCM the
    LCMScheduler of its distilled grid."""
    if "family" in model.parts:
        return flow_scheduler_config(model)
    config = dict(model.parts.get("scheduler_config") or {**SD_SCHEDULER, "_class_name": "DDIMScheduler"})
    if model.config.is_lcm:
        config.update(_class_name="LCMScheduler", original_inference_steps=model.config.original_inference_steps,
                      timestep_scaling=model.config.timestep_scaling)
    elif model.config.parameterization == "tcd":   # a TCD model: TCDScheduler on its skipped grid
        config.update(_class_name="TCDScheduler", original_inference_steps=model.config.original_inference_steps)
    return config


def pipeline_of(model: Model, unet=None):
    """A diffusers pipeline of the model's parts (``unet`` instead of its own, if given): for an SD 1.x/2.x
    model a LatentConsistencyModelPipeline when it is an LCM, else a StableDiffusionPipeline; for an SDXL
    model a StableDiffusionXLPipeline (with LCMScheduler when it is an LCM, as diffusers runs LCM-SDXL)."""
    import diffusers

    if "family" in model.parts:
        return flow_pipeline_of(model, unet)
    config = scheduler_config_of(model)
    scheduler = getattr(diffusers, config.get("_class_name", "DDIMScheduler")).from_config(config)
    parts = {"vae": model.parts["vae"], "text_encoder": model.parts["text_encoder"],
             "tokenizer": model.parts["tokenizer"], "unet": model.unet if unet is None else unet, "scheduler": scheduler}
    cls = pipeline_class(model.diffusers_pipeline)
    if "text_encoder_2" in model.parts:
        return cls(**parts, text_encoder_2=model.parts["text_encoder_2"], tokenizer_2=model.parts["tokenizer_2"],
                   force_zeros_for_empty_prompt=model.conditioner.force_zeros)
    return cls(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def new_pipeline(config: ModelConfig, unet, vae, text_encoder, tokenizer, path: Path | str = "",
                 scheduler_config: dict | None = None, text_encoder_2=None, tokenizer_2=None,
                 force_zeros: bool = True) -> Model:
    """A pipeline model from its parts (a loaded folder, the embedded teacher being built, a test's random
    pipeline): an SDXL one when a second text encoder is given. Its schedule is its scheduler config's; an
    SDXL model's time ids are its image size, uncropped."""
    scheduler_config = scheduler_config or {**SD_SCHEDULER, "_class_name": "DDIMScheduler"}
    config = dataclasses.replace(config, **scheduler_fields(scheduler_config))
    parts = {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler_config": scheduler_config}
    if text_encoder_2 is None:
        conditioner = TextConditioner(tokenizer, text_encoder, str(path))
    else:
        size = (config.image_size, config.image_size)
        conditioner = SDXLConditioner((tokenizer, tokenizer_2), (text_encoder, text_encoder_2), time_ids(size),
                                      force_zeros, str(path))
        parts.update(text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
    return Model(config, unet, conditioner, VAECodec(vae, unet.config.in_channels, unet.config.sample_size), Path(path),
                 parts)


def new_pixel_model(config: ModelConfig, net, path: Path | str = "") -> Model:
    """A pixel model from its backbone (a UNet2DModel, or a GuidedUNet) and config."""
    return Model(config, net, LabelConditioner(config.class_names, str(path)),
                 PixelCodec(config.channels, config.image_size), Path(path))
