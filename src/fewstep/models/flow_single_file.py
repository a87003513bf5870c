"""Single-file FLUX and SD3 checkpoints in, as diffusers reads them: the transformer in its original layout
(Black Forest Labs' ``flux1-dev.safetensors``: ``double_blocks.*``, ``single_blocks.*``, no prefix; Stability's
``sd3_medium.safetensors`` / ``sd3.5_medium.safetensors``: ``model.diffusion_model.joint_blocks.*``), read with
``FluxTransformer2DModel`` / ``SD3Transformer2DModel.from_single_file(file, config=FOLDER, subfolder="transformer",
local_files_only=True)``; the VAE, text encoders, tokenizers and scheduler from FOLDER, a local FluxPipeline /
StableDiffusion3Pipeline folder of the same architecture (``--config``), since a transformer-only file has none of
them and fewstep ships no FLUX/SD3 configs (nothing comes from the hub). Where the file also holds parts
(``sd3_medium_incl_clips*.safetensors``: ``first_stage_model.*`` and ``text_encoders.{clip_l,clip_g,t5xxl}.*``),
those are read from it by diffusers' own ``<Pipeline>.from_single_file`` (loaders/single_file.py
``load_single_file_sub_model``), the rest given from FOLDER.

Which checkpoint it is comes from diffusers' ``CHECKPOINT_KEY_NAMES`` / ``infer_diffusers_model_type``
(loaders/single_file_utils.py lines 87–109 and 604–730: "flux-dev" / "flux-schnell" by ``guidance_in``, "flux-fill"
/ "flux-depth" by the input width, refused as :data:`fewstep.models.flow_pipelines.UNSUPPORTED` are; "sd3",
"sd35_medium", "sd35_large" by sizes; a FLUX or SD3 transformer of other sizes is read all the same, by its keys).

diffusers 0.42.1's FLUX converter fixes the width at FLUX.1's (``inner_dim = 3072``, single_file_utils.py line 2305),
so a FLUX-format transformer of another width (the tiny teachers) is converted by fewstep's own inverse of its
writer (:func:`fewstep.models.flow_keys.from_original`, sized by the config) and handed to ``from_single_file`` as
a diffusers state dict, which it loads as it is.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import FewstepError
from . import flow_keys
from .config import parse_config, pipeline_defaults, read_json
from .flow_pipelines import FAMILIES, UNSUPPORTED, FlowFamily, flow_family, load_flow_parts

PREFIX = "model.diffusion_model."
FLUX_WIDTH = 3072                     # diffusers' convert_flux_transformer_checkpoint_to_diffusers: inner_dim = 3072
NOT_TRANSFORMER = ("first_stage_model.", "vae.", "text_encoders.", "cond_stage_model.", "conditioner.")
FILE_PARTS = {"vae": ("first_stage_model.", "vae."),                 # diffusers' LDM_VAE_KEYS
              "clip_l": ("text_encoders.clip_l.transformer.",), "clip_g": ("text_encoders.clip_g.transformer.",),
              "t5xxl": ("text_encoders.t5xxl.transformer.",)}        # diffusers' is_clip_sd3_model & co.
PART_OF = {"FluxPipeline": {"vae": "vae", "clip_l": "text_encoder", "t5xxl": "text_encoder_2"},
           "StableDiffusion3Pipeline": {"vae": "vae", "clip_l": "text_encoder", "clip_g": "text_encoder_2",
                                        "t5xxl": "text_encoder_3"}}
EXAMPLE = {"FluxPipeline": ("Black Forest Labs' flux1-dev.safetensors", "FLUX.1-dev"),
           "StableDiffusion3Pipeline": ("Stability's sd3.5_medium.safetensors", "stable-diffusion-3.5-medium")}
REFUSED = {"flux-fill": "FluxFillPipeline", "flux-depth": "FluxControlPipeline"}


def flow_checkpoint_type(shapes: dict) -> tuple[FlowFamily, str] | None:
    """(family, diffusers' model type) of a FLUX / SD3 single file, None for any other; the FLUX variants fewstep
    does not run (FLUX.2, Fill, Depth, Chroma) are refused here by name. A transformer of unpublished sizes keeps its
    family, typed "flux" / "sd3"."""
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES, infer_diffusers_model_type

    def has(name: str) -> bool:
        keys = CHECKPOINT_KEY_NAMES[name]
        return any(k in shapes for k in ([keys] if isinstance(keys, str) else keys))

    flux, sd3 = has("flux"), has("sd3")
    if not (flux or sd3 or has("flux2") or has("chroma")):
        return None
    kind = infer_diffusers_model_type(shapes)
    if kind in REFUSED:
        raise FewstepError(f"the checkpoint is a {kind!r} transformer ({UNSUPPORTED[REFUSED[kind]]}); fewstep takes "
                           f"text-to-image FLUX and SD3 transformers")
    if kind.startswith(("flux-2", "flux-3", "chroma")) or not (flux or sd3):
        raise FewstepError(f"the checkpoint is a {kind!r} transformer (diffusers' name for it); fewstep takes FLUX.1 "
                           f"and SD3 transformers")
    if flux:
        return FAMILIES["FluxPipeline"], kind if kind.startswith("flux") else "flux"
    return FAMILIES["StableDiffusion3Pipeline"], kind if kind.startswith("sd3") else "sd3"


def read_flow_single_file(path: Path, shapes: dict, family: FlowFamily, kind: str, dtype: torch.dtype | None,
                          config: str | Path | None) -> dict:
    """A FLUX / SD3 single file as the keyword arguments of
    :func:`fewstep.models.flow_pipelines.new_flow_pipeline` (module docstring): ``config`` is required, a local
    pipeline folder of the family. An LCM (``fewstep_kind`` "lcm" in the file's metadata, as fewstep's writer
    records it) is sampled as one: FlowMatchLCMScheduler on the folder's scheduler config."""
    dtype = dtype or torch.float32
    file_name, model_name = EXAMPLE[family.pipeline]
    if config is None:
        raise FewstepError(
            f"{path} is a {family.pipeline.removesuffix('Pipeline').replace('StableDiffusion3', 'SD3')}-format "
            f"transformer (diffusers' type {kind!r}) in the original single-file layout (as {file_name}); its VAE and text "
            f"encoders come from a {family.pipeline} folder: pass --config DIR, a local diffusers folder of the same "
            f"architecture (e.g. {model_name}'s or the base model's it was fine-tuned from)")
    folder = Path(config)
    if not (folder / "model_index.json").is_file():
        raise FewstepError(f"config {config} is not a diffusers pipeline folder (no model_index.json); give a local "
                           f"{family.pipeline} folder")
    given = flow_family(read_json(folder / "model_index.json"), folder)
    if given is not family:
        raise FewstepError(f"{path} is a {family.pipeline.removesuffix('Pipeline')}-format transformer but the config "
                           f"{folder} is {'a ' + given.pipeline if given else 'not a FLUX/SD3'} folder; give a "
                           f"{family.pipeline} folder of its architecture")
    transformer = _transformer(path, shapes, family, folder, dtype)
    in_file = [PART_OF[family.pipeline][p] for p, prefixes in FILE_PARTS.items()
               if p in PART_OF[family.pipeline] and any(k.startswith(prefixes) for k in shapes)]
    parts = load_flow_parts(folder, family, dtype, None, skip=("transformer", *in_file))
    if in_file:
        parts.update(_parts_in_file(path, folder, family, dtype, transformer, parts, in_file))
    scheduler_config = read_json(folder / "scheduler" / "scheduler_config.json")
    if _metadata(path).get("fewstep_kind") == "lcm":     # written by fewstep for a flow LCM: its scheduler
        scheduler_config = {**scheduler_config, "_class_name": "FlowMatchLCMScheduler"}
    raw = pipeline_defaults(scheduler_config, parts["vae"].config.sample_size)
    return {"config": parse_config(raw, path), "family": family, "transformer": transformer,
            "scheduler_config": scheduler_config, **parts}


def _transformer(path: Path, shapes: dict, family: FlowFamily, folder: Path, dtype: torch.dtype):
    """The file's transformer by diffusers' ``from_single_file`` with the folder's config, checked to fit it first
    (every weight placed, every shape equal: a clear error instead of diffusers' warning and random weights). A
    FLUX file with ``guidance_in`` (FLUX.1-dev, a fewstep LCD student) gets ``guidance_embeds`` whatever the folder
    says, as diffusers' converter reads it."""
    import diffusers
    from diffusers.utils import logging as diffusers_logging

    prefix = PREFIX if any(k.startswith(PREFIX) for k in shapes) else ""
    own = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix) and not k.startswith(NOT_TRANSFORMER)}
    config = read_json(folder / "transformer" / "config.json")
    overrides = {"guidance_embeds": "guidance_in.in_layer.weight" in own} if family.pipeline == "FluxPipeline" else {}
    config.update(overrides)
    expected = flow_keys.meta_shapes(family.transformer, config)
    try:
        converted = flow_keys.from_original(own, family.transformer, config, expected)
    except FewstepError as e:
        raise FewstepError(f"{path} does not fit the config {folder} (another architecture?): {e}") from None
    missing = sorted(set(expected) - set(converted))
    wrong = sorted(k for k in converted if k in expected and tuple(converted[k].shape) != tuple(expected[k]))
    if missing or wrong:
        what = (f"it lacks {missing[0]}" if missing else
                f"{wrong[0]} is {tuple(converted[wrong[0]].shape)}, the config's {tuple(expected[wrong[0]])}")
        raise FewstepError(f"{path} does not fit the config {folder} (another architecture?): {what}")
    source: str | dict = str(path)
    if family.pipeline == "FluxPipeline" and own["img_in.weight"].shape[0] != FLUX_WIDTH:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            weights = {k[len(prefix):]: f.get_tensor(k) for k in f.keys()
                       if k.startswith(prefix) and not k.startswith(NOT_TRANSFORMER)}
        source = flow_keys.from_original(weights, family.transformer, config, expected)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        return getattr(diffusers, family.transformer).from_single_file(
            source, config=str(folder), subfolder="transformer", local_files_only=True, torch_dtype=dtype,
            **overrides).eval()
    except Exception as e:  # diffusers raises ValueError/KeyError/RuntimeError/SingleFileComponentError
        raise FewstepError(f"cannot load {path}'s transformer with the config {folder}: {_first_line(e)}") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)


def _parts_in_file(path: Path, folder: Path, family: FlowFamily, dtype: torch.dtype, transformer, given: dict,
                   in_file: list[str]) -> dict:
    """The parts the file holds (``in_file``), read by diffusers' ``<Pipeline>.from_single_file`` as it reads them,
    every other part given (the transformer already read, the rest from the folder)."""
    import diffusers
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        pipe = getattr(diffusers, family.pipeline).from_single_file(
            str(path), config=str(folder), local_files_only=True, torch_dtype=dtype, transformer=transformer,
            **{k: v for k, v in given.items() if k not in in_file})
    except Exception as e:  # diffusers raises ValueError/KeyError/RuntimeError/SingleFileComponentError
        raise FewstepError(f"cannot load the {', '.join(in_file)} in {path} with the config {folder}: "
                           f"{_first_line(e)}") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    return {name: getattr(pipe, name).eval() for name in in_file}


def _metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
