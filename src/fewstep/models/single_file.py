"""Single-file checkpoints: the original-format (LDM / AUTOMATIC1111 / ComfyUI) ``.safetensors`` of SD 1.x,
SD 2.x and SDXL base, read as the parts of a pipeline model (``load_model`` builds the model); FLUX and SD3
transformers in their original layouts are dispatched to :mod:`fewstep.models.flow_single_file`.

Follows diffusers' own single-file machinery (diffusers/loaders/single_file.py, single_file_utils.py): the
checkpoint's type from ``infer_diffusers_model_type`` (it reads key names and shapes), then
``StableDiffusion(XL)Pipeline.from_single_file(file, config=FOLDER, local_files_only=True)``, whose
``convert_ldm_unet_checkpoint`` / ``convert_ldm_vae_checkpoint`` / ``convert_ldm_clip_checkpoint`` /
``convert_open_clip_checkpoint`` map the weights onto the architecture FOLDER's configs describe. Nothing comes
from the hub: FOLDER is one shipped with fewstep (``single_file_configs/``, the published configs of
SD 1.5, SD 2.1 768-v, SD 2.1 base and SDXL base 1.0, see its README) or a local diffusers folder of the same
architecture given as ``config``. The tokenizers are built from CLIP's own BPE file, as CLIP's
``SimpleTokenizer`` builds them. Pickled checkpoints (.ckpt) are refused: loading never executes code.
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path
from typing import Callable

import torch

from ..errors import FewstepError
from .config import parse_config, pipeline_defaults, read_json, scheduler_fields

CONFIGS = Path(__file__).parent / "single_file_configs"
BPE_FILE = CONFIGS / "clip" / "bpe_simple_vocab_16e6.txt.gz"
SHIPPED = {"v1": "sd-v1-5", "v2": "sd-v2-1", "xl_base": "sdxl-base"}   # diffusers' model type -> config folder
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}
UNET_PREFIX = "model.diffusion_model."
UNET_IN = UNET_PREFIX + "input_blocks.0.0.weight"
SD2_BASE_STEP = 875000   # diffusers' _legacy_load_scheduler: SD 2 base (ε) is the checkpoint of this global step


def read_single_file(path: str | Path, dtype: torch.dtype | None = None, config: str | Path | None = None,
                     pipeline_class: Callable[[str], type] | None = None) -> dict:
    """A single-file checkpoint as the keyword arguments of :func:`fewstep.models.folders.new_pipeline` (its
    parts, weights in ``dtype``, default float32; its ModelConfig; its scheduler config) or, for a FLUX / SD3
    transformer, of :func:`fewstep.models.flow_pipelines.new_flow_pipeline` (with its "family";
    :mod:`fewstep.models.flow_single_file`, ``config`` required), its architecture from
    ``config`` (a local diffusers folder, or a shipped config's name such as "sd-v2-base") or, by default, from
    the shipped config of the type diffusers infers. Its fewstep.json defaults come from the scheduler config,
    as a folder's without one (:func:`fewstep.models.config.pipeline_defaults`). ``pipeline_class``: diffusers'
    pipeline class by name (default ``getattr(diffusers, name)``)."""
    path = Path(path)
    shapes = read_shapes(path)
    from .flow_single_file import flow_checkpoint_type, read_flow_single_file

    try:
        flow = flow_checkpoint_type(shapes)
    except FewstepError as e:
        raise FewstepError(f"{path}: {e}") from None
    if flow is not None:                          # FLUX / SD3: the transformer, the rest from --config
        return read_flow_single_file(path, shapes, *flow, dtype, config)
    kind = checkpoint_type(path, shapes)
    folder = config_folder(config) if config is not None else CONFIGS / _shipped_name(path, shapes, kind)
    xl = _check_config_fits(path, shapes, folder)
    parts = _from_single_file(path, folder, xl, dtype or torch.float32, pipeline_class or _diffusers_class)
    scheduler_config = read_json(folder / "scheduler" / "scheduler_config.json")
    index = read_json(folder / "model_index.json")
    raw = {**pipeline_defaults(scheduler_config, parts["vae"].config.sample_size), **scheduler_fields(scheduler_config),
           **_lcm_fields(path)}
    return {"config": parse_config(raw, path), "scheduler_config": scheduler_config,
            "force_zeros": index.get("force_zeros_for_empty_prompt", True), **parts}


def _lcm_fields(path: Path) -> dict:
    """An LCM's sampling defaults where the file says it is one: ``fewstep_kind`` "lcm" in its metadata, as
    ``fewstep lora merge ... --single-file`` of an LCM-LoRA writes it (:mod:`fewstep.models.single_file_export`);
    the same defaults a fused LCM-LoRA gets (:func:`fewstep.models.loras.apply_loras`)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("fewstep_kind") != "lcm":
        return {}
    steps = metadata.get("fewstep_original_inference_steps", "")
    return {"kind": "consistency", "parameterization": "lcm", "default_sampler": "consistency", "default_steps": 4,
            "default_guidance_scale": 1.0, **({"original_inference_steps": int(steps)} if steps.isdigit() else {})}


def _diffusers_class(name: str) -> type:
    import diffusers

    return getattr(diffusers, name)


def read_shapes(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors as empty "meta" tensors of their shapes (its header only; no weights read),
    enough for diffusers' type inference. Pickles and non-safetensors files are refused with what to do."""
    from safetensors import safe_open

    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise FewstepError(
            f"{path} is a pickled checkpoint ({path.suffix}); fewstep loads only .safetensors, as unpickling can run "
            f"code. If you trust the file, convert it once: python -c \"import torch, safetensors.torch as st; "
            f"sd = torch.load('{path.name}', map_location='cpu', weights_only=True); sd = sd.get('state_dict', sd); "
            f"st.save_file({{k: v.contiguous() for k, v in sd.items() if torch.is_tensor(v)}}, "
            f"'{path.with_suffix('.safetensors').name}')\"")
    try:
        with safe_open(str(path), framework="pt") as f:
            names = f.keys()   # a safe_open handle, not a dict
            return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in names}
    except Exception as e:  # safetensors raises SafetensorError / OSError on anything that is not one
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FewstepError(f"{path} is not a model: not a safetensors checkpoint ({reason}); give a diffusers pipeline "
                           f"folder, a fewstep model folder or a single-file .safetensors checkpoint") from None


def checkpoint_type(path: Path, shapes: dict[str, torch.Tensor]) -> str:
    """diffusers' name of the checkpoint's type ("v1", "v2", "xl_base"), or a clear error for what fewstep does
    not take: not an original-format pipeline (a LoRA, a lone UNet/VAE), inpainting or instruct-pix2pix UNets,
    an SDXL refiner, other families."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    if UNET_IN not in shapes:
        raise FewstepError(f"{path} is not a Stable Diffusion checkpoint: {_what_it_is(shapes)}")
    channels = shapes[UNET_IN].shape[1]
    if channels != 4:
        what = {9: "an inpainting", 8: "an instruct-pix2pix"}.get(channels, f"a {channels}-input-channel")
        raise FewstepError(f"{path} is {what} checkpoint (its UNet takes {channels} channels: latents plus an image "
                           f"or mask); fewstep takes text-to-image checkpoints, whose UNet takes the 4 latent channels")
    kind = infer_diffusers_model_type(shapes)
    if kind == "xl_refiner":
        raise FewstepError(f"{path} is an SDXL refiner (one text encoder, for img2img on a base model's latents); "
                           f"fewstep takes SDXL base checkpoints")
    if kind not in SHIPPED:
        raise FewstepError(f"{path} is a {kind!r} checkpoint (diffusers' name for it); fewstep takes SD 1.x, SD 2.x "
                           f"and SDXL base checkpoints")
    missing = [what for prefix, what in (("first_stage_model.", "VAE"), (("cond_stage_model.", "conditioner."),
                                                                         "text encoder")) if not _has(shapes, prefix)]
    if missing:
        raise FewstepError(f"{path} has no {' and no '.join(missing)} weights (a UNet-only file); fewstep loads whole "
                           f"pipeline checkpoints (UNet, VAE and text encoder(s) in one file)")
    return kind


def _has(shapes: dict, prefix: str | tuple[str, ...]) -> bool:
    return any(k.startswith(prefix) for k in shapes)


def _what_it_is(shapes: dict) -> str:
    """A guess at what a file without an original-format UNet is, for the error message."""
    keys = list(shapes)
    if any("lora" in k.lower() for k in keys):
        return "it is a LoRA; give it with --lora on a base model"
    diffusers_part = any(k.startswith(("down_blocks.", "encoder.down_blocks.", "text_model.")) for k in keys)
    if diffusers_part or "conv_in.weight" in keys:
        return ("it holds one diffusers-format part (a UNet, VAE or text encoder alone); give the whole pipeline "
                "folder (model_index.json, unet/, vae/, …)")
    if _has(shapes, ("first_stage_model.", "encoder.down.", "decoder.up.")):
        return "it is a VAE alone; fewstep loads whole pipeline checkpoints"
    return f"none of its {len(keys)} tensors is an original-format UNet weight ({UNET_PREFIX}…)"


def _shipped_name(path: Path, shapes: dict, kind: str) -> str:
    """The shipped config of ``kind``; for SD 2 the 768² v-prediction one (diffusers' default) unless the
    checkpoint is SD 2 base: an A1111 ``.yaml`` beside it without ``parameterization: "v"`` (A1111's rule), or,
    failing one, ``global_step`` 875000 (diffusers' rule)."""
    if kind != "v2":
        return SHIPPED[kind]
    yaml_path = path.with_suffix(".yaml")
    if yaml_path.is_file():
        import yaml

        try:
            params = (yaml.safe_load(yaml_path.read_text()) or {}).get("model", {}).get("params", {})
        except (OSError, ValueError, yaml.YAMLError, AttributeError) as e:
            raise FewstepError(f"{yaml_path} (the original config beside the checkpoint) is unreadable: {e}") from None
        return "sd-v2-1" if params.get("parameterization") == "v" else "sd-v2-base"
    if "global_step" in shapes:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            if int(f.get_tensor("global_step").reshape(-1)[0]) == SD2_BASE_STEP:
                return "sd-v2-base"
    return "sd-v2-1"


def config_folder(config: str | Path) -> Path:
    """``config`` as a folder: a local diffusers pipeline folder, or the name of a shipped config."""
    folder = Path(config)
    if not folder.is_dir() and (CONFIGS / str(config)).is_dir() and str(config) in _shipped_names():
        folder = CONFIGS / str(config)
    if not (folder / "model_index.json").is_file():
        raise FewstepError(f"config {config} is not a diffusers pipeline folder (no model_index.json) nor a shipped "
                           f"config ({', '.join(_shipped_names())})")
    return folder


def _shipped_names() -> list[str]:
    return sorted(p.name for p in CONFIGS.iterdir() if (p / "model_index.json").is_file())


def _check_config_fits(path: Path, shapes: dict, folder: Path) -> bool:
    """Whether the config is SDXL's, checked against the file (SDXL keeps its encoders under conditioner.*,
    SD 1.x/2.x under cond_stage_model.*) and its UNet's input width, before any weights load."""
    index = read_json(folder / "model_index.json")
    xl = "text_encoder_2" in index
    if xl != _has(shapes, "conditioner.embedders."):
        raise FewstepError(f"{path} is {'an SD 1.x/2.x' if xl else 'an SDXL'} checkpoint but the config {folder} is "
                           f"{'an SDXL' if xl else 'an SD 1.x/2.x'} pipeline; give a config of the same architecture")
    unet = read_json(folder / "unet" / "config.json")
    width = shapes[UNET_IN].shape[0]
    if width != unet.get("block_out_channels", [None])[0]:
        raise FewstepError(f"{path}'s UNet is {width} channels wide but the config {folder}'s is "
                           f"{unet.get('block_out_channels', [None])[0]}; give a config of the same architecture")
    return xl


def _from_single_file(path: Path, folder: Path, xl: bool, dtype: torch.dtype,
                      pipeline_class: Callable[[str], type]) -> dict:
    """The pipeline's parts, converted by diffusers' ``from_single_file`` with ``folder`` as its config (local
    files only); tokenizers the folder lacks are built from CLIP's BPE (:func:`clip_tokenizer`)."""
    from diffusers.utils import logging as diffusers_logging

    names = ("tokenizer", "tokenizer_2") if xl else ("tokenizer",)
    given = {name: _tokenizer_of(folder / name) for name in names if not _has_vocab(folder / name)}
    extra = {"add_watermarker": False} if xl else {"safety_checker": None, "feature_extractor": None,
                                                   "requires_safety_checker": False}
    if xl:
        given["text_encoder_2"] = _open_clip_encoder(path, folder, dtype)
    cls = pipeline_class("StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline")
    bars, verbosity = diffusers_logging.is_progress_bar_enabled(), diffusers_logging.get_verbosity()
    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()   # its notice that casting with to() skips fp32-kept modules (none here)
    try:
        pipe = cls.from_single_file(str(path), config=str(folder), local_files_only=True, torch_dtype=dtype,
                                    **given, **extra)
    except Exception as e:  # diffusers raises ValueError/KeyError/RuntimeError/SingleFileComponentError
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FewstepError(f"cannot load {path} with the config {folder} (corrupt, or another architecture: "
                           f"load_model(..., config=) takes a folder of its architecture): {reason}") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
        if bars:
            diffusers_logging.enable_progress_bar()
    parts = {name: getattr(pipe, name) for name in ("unet", "vae", "text_encoder", "tokenizer")}
    if xl:
        parts.update(text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2)
    return parts


OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."


def _open_clip_encoder(path: Path, folder: Path, dtype: torch.dtype):
    """SDXL's second text encoder from the file's ``conditioner.embedders.1.model.*`` (open_clip's layout) by
    diffusers' own ``convert_open_clip_checkpoint``. ``from_single_file`` picks a text encoder's converter by its width
    (``create_diffusers_clip_model_from_ldm``: the first encoder's keys when their width matches), so where both
    encoders are equally wide (``models/emoji-sdxl``: 64 and 64) it fills the second with the first's weights and
    leaves its projection unset; here nothing is guessed."""
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from safetensors import safe_open
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    with safe_open(str(path), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys() if k.startswith(OPEN_CLIP_PREFIX)}
    with init_empty_weights():
        model = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
    try:
        converted = convert_open_clip_checkpoint(model, state, prefix=OPEN_CLIP_PREFIX)
        missing, unexpected = model.load_state_dict(converted, strict=False, assign=True)
    except (RuntimeError, KeyError, TypeError, AttributeError) as e:   # shapes of another architecture
        raise FewstepError(f"cannot load {path}'s second text encoder with the config {folder}: "
                           f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    if missing or unexpected:
        raise FewstepError(f"{path}'s second text encoder does not fit the config {folder}: "
                           f"{'missing ' + missing[0] if missing else 'unexpected ' + unexpected[0]}")
    return model.to(dtype).eval()


def _has_vocab(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "vocab.json"))


def _tokenizer_of(folder: Path):
    """CLIP's tokenizer with the pad token and length of ``folder/tokenizer_config.json`` (if any): "!" for
    SD 2.x and SDXL's second tokenizer, "<|endoftext|>" for CLIP ViT-L (SD 1.x, SDXL's first)."""
    settings = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    pad = settings.get("pad_token", "<|endoftext|>")
    return clip_tokenizer(pad["content"] if isinstance(pad, dict) else pad, int(settings.get("model_max_length", 77)))


def clip_tokenizer(pad_token: str = "<|endoftext|>", max_length: int = 77):
    """A CLIPTokenizer of OpenAI CLIP's vocabulary (49,408 tokens: "a photo of a cat" is 49406 320 1125 539 320
    2368 49407), built with ``vocab=``/``merges=`` (transformers 5 ignores vocab files given by path; DESIGN §7)."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_bpe()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=max_length)


@functools.lru_cache(maxsize=1)
def _clip_bpe() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """CLIP's vocabulary and merges from its BPE file, as openai/CLIP clip/simple_tokenizer.py SimpleTokenizer
    builds them: the 256 byte symbols, the same with "</w>", one token per merge, then the two specials."""
    lines = gzip.decompress(BPE_FILE.read_bytes()).decode("utf-8").split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1])
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + ["<|startoftext|>",
                                                                                    "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible byte -> printable-character table, in its order (simple_tokenizer.py)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))
