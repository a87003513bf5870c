"""Write a pipeline as one original-format checkpoint: the single ``.safetensors`` file (LDM / CompVis names:
``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.transformer.*`` or SDXL's
``conditioner.embedders.{0,1}.*``) that AUTOMATIC1111 and ComfyUI load from their checkpoints folder, and that
diffusers' ``from_single_file`` and fewstep's ``--model FILE.safetensors`` (:mod:`fewstep.models.single_file`)
read back. The names are :mod:`fewstep.models.ldm_keys`' (diffusers' ``convert_diffusers_to_original_*`` scripts).

What it writes, and what it refuses:
- FLUX and SD3 pipelines: the transformer alone in its original layout (:func:`flow_original_state`), as
  ``flux1-dev.safetensors`` / ``sd3.5_medium.safetensors`` are published (ComfyUI's "Load Diffusion Model", diffusers'
  ``FluxTransformer2DModel`` / ``SD3Transformer2DModel.from_single_file``); the VAE and text encoders stay in the
  folder, which fewstep reads it back with (``--model FILE --config FOLDER``, :mod:`fewstep.models.flow_single_file`).
- SD 1.x pipelines (OpenAI CLIP text encoder) and SDXL base pipelines (two text encoders). SD 2.x (an OpenCLIP
  text encoder stored in open_clip's layout) is refused for now, as are pixel models (no VAE, no text encoder)
  and LCD-distilled LCMs whose UNet takes the guidance scale (``time_cond_proj_dim``: the original format has no
  such layer; an LCM-LoRA merged into a pipeline has none and is written fine).
- safetensors only, written atomically (a temporary beside ``out``, then one rename: a crash leaves the old file
  or the new one); an existing ``out`` is replaced only with ``overwrite``, never when it is one of the
  command's inputs (:mod:`fewstep.io.atomic`). The file records in its ``__metadata__`` that fewstep wrote it and
  from what (``fewstep_source``, ``fewstep_format``; an LCM also ``fewstep_kind`` = ``lcm``: sample it with an
  LCM scheduler in 2–8 steps).
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
from torch import Tensor

from ..errors import FewstepError
from ..io.atomic import allow_replacing, atomic_path, check_writable
from .flow_keys import FLUX, SD3, to_original
from .handle import Model
from .ldm_keys import CLIP_XL_1, clip_to_original, open_clip_to_original, unet_to_original, vae_to_original

FORMAT = "ldm-single-file"    # fewstep_format in the file's metadata
FLOW_FORMAT = {FLUX: "flux-transformer", SD3: "sd3-transformer"}     # … of a FLUX / SD3 transformer's file
FLOW_PREFIX = {FLUX: "", SD3: "model.diffusion_model."}


def original_state(model: Model, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """The pipeline ``model``'s UNet, VAE and text encoder(s) as one original-format state dict, floating-point
    weights in ``dtype`` (default: as they are)."""
    if not model.is_pipeline:
        raise FewstepError(f"{model.path} is a pixel model; a single-file checkpoint holds a text-to-image pipeline "
                           f"(UNet, VAE, text encoder)")
    parts = model.parts
    if "family" in parts:                         # FLUX / SD3: the transformer alone, as BFL and Stability ship it
        return _cast(flow_original_state(model.backbone), dtype)
    text, text_2 = parts["text_encoder"], parts.get("text_encoder_2")
    if text_2 is None and getattr(text.config, "hidden_act", None) == "gelu":
        raise FewstepError(f"{model.path} is an SD 2.x pipeline (an OpenCLIP text encoder); fewstep writes single "
                           f"files of SD 1.x and SDXL pipelines")
    unet, vae = model.unet, parts["vae"]
    state = {**unet_to_original(unet.state_dict(), unet.config), **vae_to_original(vae.state_dict(), vae.config)}
    if text_2 is None:
        state.update(clip_to_original(text.state_dict()))
    else:
        state.update(clip_to_original(text.state_dict(), CLIP_XL_1))
        state.update(open_clip_to_original(text_2.state_dict()))
    return _cast(state, dtype)


def _cast(state: dict[str, Tensor], dtype: torch.dtype | None) -> dict[str, Tensor]:
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous()
            for k, v in state.items()}


def flow_original_state(transformer) -> dict[str, Tensor]:
    """A FLUX / SD3 transformer under its original names (:mod:`fewstep.models.flow_keys`), with the prefix its
    published files have: none for FLUX (BFL's ``flux1-dev.safetensors``), ``model.diffusion_model.`` for SD3
    (Stability's ``sd3.5_medium.safetensors``); diffusers' readers and ComfyUI's take either."""
    family = type(transformer).__name__
    prefix = FLOW_PREFIX.get(family, "")
    return {prefix + k: v for k, v in to_original(transformer.state_dict(), family, transformer.config).items()}


def write_single_file(model: Model, out: str | Path, dtype: torch.dtype | None = None, overwrite: bool = False,
                      source: str | Path | None = None) -> Path:
    """Write ``model`` (a pipeline) to ``out`` (``.safetensors``) as one original-format checkpoint, atomically;
    an existing ``out`` is refused unless ``overwrite``. ``source``: what to record as its origin (default the
    model's folder)."""
    out = Path(out)
    check_writable(out, ".safetensors", "--out")
    if out.exists() and not overwrite:
        raise FewstepError(f"--out {out} exists; choose another path, or pass --overwrite to replace it")
    state = original_state(model, dtype)
    flow = "family" in model.parts
    metadata = {"format": "pt", "fewstep_format": FLOW_FORMAT[type(model.backbone).__name__] if flow else FORMAT,
                "fewstep_source": str(source or model.path)}
    if flow and model.config.kind == "consistency":   # a flow LCM: read back with FlowMatchLCMScheduler
        metadata.update(fewstep_kind="lcm")
    elif model.config.is_lcm:
        metadata.update(fewstep_kind="lcm", fewstep_original_inference_steps=str(model.config.original_inference_steps))
    from safetensors.torch import save_file

    with allow_replacing(out) if overwrite else nullcontext():
        with atomic_path(out) as tmp:
            save_file(state, str(tmp), metadata=metadata)
    return out
