"""``fewstep lora export``: a fewstep LoRA in the key layout another tool reads, saying what it is.

fewstep saves peft's key names under diffusers' ``unet.`` prefix (:func:`fewstep.models.loras.save_lora`):
diffusers reads them, AUTOMATIC1111 and kohya's tools do not, ComfyUI drops the attention adapters. The
layouts written here, each with diffusers' own converters (``diffusers.utils.state_dict_utils``):

- ``kohya``: ``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (kohya-ss sd-scripts'
  layout, read by AUTOMATIC1111, ComfyUI, SD.Next, InvokeAI and diffusers). The module names follow kohya's own
  convention per family: SD 1.x/2.x LoRAs are named after diffusers' blocks (``lora_unet_down_blocks_0_…``, as
  sd-scripts trains SD 1.x on the diffusers UNet), by diffusers' ``convert_state_dict_to_kohya``; SDXL LoRAs
  after the original (SGM) blocks (``lora_unet_input_blocks_4_1_…``, as sd-scripts trains SDXL on its SGM UNet),
  by :mod:`fewstep.models.ldm_keys`: AUTOMATIC1111's ``convert_diffusers_name_to_compvis`` maps diffusers'
  names by SD 1.x's layout (SDXL's first upsampler and its added-conditioning MLP find no module), while the
  original names it, ComfyUI (``model_lora_keys_unet``) and diffusers (``_maybe_map_sgm_blocks_to_diffusers``)
  take as they are (tests/test_lora_export_tools.py replays both tools' rules). The file's metadata carries
  kohya's ``ss_base_model_version``, by which AUTOMATIC1111 lists a LoRA for SDXL or SD 1.x/2.x models.
  α is the adapter's own (the rank unless its metadata says otherwise: scale α/r = 1), so the weights are
  fewstep's exactly. FLUX and SD3 LoRAs (``transformer.`` keys) get sd-scripts' names of the original transformer
  (networks/lora_flux.py, lora_sd3.py: ``lora_unet_double_blocks_0_img_attn_qkv``,
  ``lora_unet_joint_blocks_0_x_block_attn_qkv``), q/k/v fused as sd-scripts' convert_flux_lora.py fuses them
  (:mod:`fewstep.models.flow_keys`): what ComfyUI's generic ``lora_unet_<path>`` rule maps onto its Flux / SD3
  models, and diffusers' ``_convert_kohya_flux_lora_to_diffusers`` reads for FLUX.1's sizes (it hard-codes them;
  its SD3 loader reads no kohya layout). fewstep reads them back itself (``--lora``,
  :func:`fewstep.models.lora_layouts.flow_kohya_state`). The metadata's ``ss_base_model_version`` is sd-scripts' ("flux1";
  SD3: "medium", "5-medium", "5-large").
- ``diffusers``: ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (``transformer.`` for FLUX / SD3), what
  ``pipe.load_lora_weights`` reads (and ComfyUI's Flux / SD3 branch of ``model_lora_keys_unet``).
- ``peft``: ``base_model.model.<module>.lora_A.weight``, a ``PeftModel``'s state dict. To a ``.safetensors``
  file, that alone; to a folder, peft's ``save_pretrained`` layout (``adapter_model.safetensors`` +
  ``adapter_config.json``) that ``PeftModel.from_pretrained(unet, FOLDER)`` loads onto the base UNet.

Every export carries :func:`fewstep.models.loras.lora_metadata` in its safetensors ``__metadata__``
(``fewstep_kind`` and an LCM-LoRA's ``fewstep_original_inference_steps`` among them), so a bare exported
LCM-LoRA is still sampled with LCM's sampler (:func:`fewstep.models.loras.resolve_lora_info`).
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
from torch import Tensor

from ..errors import FewstepError
from ..io.atomic import allow_replacing, atomic_path, check_writable
from .config import read_json
from .flow_keys import FLUX, peft_to_kohya
from .folders import shipped_models_dir, write_folder
from .ldm_keys import kohya_name, unet_block_map, unet_key
from .lora_layouts import PEFT_PREFIX
from .loras import LORA_SET, lora_file, lora_info, lora_metadata
from .single_file import CONFIGS

FORMATS = ("kohya", "diffusers", "peft")
PEFT_FILE = "adapter_model.safetensors"      # peft's save_pretrained names


def export_lora(lora: str | Path, layout: str, out: str | Path, overwrite: bool = False,
                base: str | Path | None = None) -> Path:
    """Write the LoRA ``lora`` (a fewstep LoRA folder or a diffusers/peft-layout ``.safetensors`` file) to
    ``out`` in ``layout`` (one of :data:`FORMATS`) atomically; an existing ``out`` is refused unless
    ``overwrite``. ``out`` is a ``.safetensors`` file, or with ``peft`` a folder (peft's layout). ``base``: the
    pipeline folder the LoRA adapts (default: the one its record names), which decides kohya's names
    (:func:`sdxl_unet_config`)."""
    lora, out = Path(lora), Path(out)
    if layout not in FORMATS:
        raise FewstepError(f"unknown LoRA format {layout!r}; choose one of {', '.join(FORMATS)}")
    folder = out.suffix.lower() != ".safetensors"
    if folder and layout != "peft":
        raise FewstepError(f"--out {out} must end in .safetensors (only --format peft writes a folder)")
    if out.exists() and not overwrite:
        raise FewstepError(f"--out {out} exists; choose another path, or pass --overwrite to replace it")
    if not folder:
        check_writable(out, ".safetensors", "--out")
    info = lora_info(lora)
    if info.get("kind") == LORA_SET:
        raise FewstepError(f"{lora} is a set of {len(info['loras'])} adapters; export each of its members")
    from safetensors.torch import load_file, save_file

    from ..io.weights import check_weights_file

    source = lora_file(lora)
    check_weights_file(source, "LoRA")            # float tensors, a sound header, every weight finite
    state = unet_peft_state(load_file(str(source)), source)
    ranks = {k[:-len(".lora_A.weight")]: v.shape[0] for k, v in state.items() if k.endswith(".lora_A.weight")}
    rank = next(iter(ranks.values())) if len(set(ranks.values())) == 1 else info.get("rank")
    alpha = info.get("alpha")                     # None: each module's α is its rank (diffusers' reading)
    metadata = {"format": "pt", **lora_metadata(info, layout, rank, alpha if alpha is not None else rank)}
    prefix = next(iter(state)).split(".", 1)[0] + "."        # "unet." or a FLUX / SD3 LoRA's "transformer."
    if layout == "kohya" and prefix == "transformer.":
        family, config = flow_transformer_config(base, info.get("base"))
        metadata.update(flow_kohya_version(family, config))
        state = peft_to_kohya(state, family, config, alpha=alpha)
    elif layout == "kohya":
        sdxl = sdxl_unet_config(state, base, info.get("base"))
        metadata.update(kohya_version(state, sdxl is not None))
        state = kohya_state(state, alpha, sdxl)
    elif layout == "peft":
        state = {PEFT_PREFIX + k[len(prefix):]: v for k, v in state.items()}
    tensors = {k: v.contiguous() for k, v in state.items()}
    with allow_replacing(out) if overwrite else nullcontext():
        if not folder:
            with atomic_path(out) as tmp:
                save_file(tensors, str(tmp), metadata=metadata)
            return out

        def write(tmp: Path) -> None:
            save_file(tensors, str(tmp / PEFT_FILE), metadata=metadata)
            peft_config(ranks, alpha, info.get("base")).save_pretrained(str(tmp))
        return write_folder(out, write)


def unet_peft_state(state: dict[str, Tensor], source: Path) -> dict[str, Tensor]:
    """``state`` with peft's key names under diffusers' ``unet.`` prefix (``unet.<module>.lora_A.weight``), or
    ``transformer.`` for a FLUX / SD3 LoRA: fewstep's own layout as it is, diffusers' older ``lora.down`` /
    ``lora.up`` names through diffusers' ``convert_unet_state_dict_to_peft``. Anything else (kohya keys,
    text-encoder adapters, DoRA, both prefixes in one file) is refused."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    if any(k.startswith(("lora_unet_", "lora_te")) for k in state):
        raise FewstepError(f"LoRA {source} is already in kohya's layout (lora_unet_… keys); AUTOMATIC1111 and "
                           f"ComfyUI load it as it is")
    converted = convert_unet_state_dict_to_peft(state)
    prefix = next(iter(converted), "unet.").split(".", 1)[0] + "."
    bad = [k for k in converted if not (k.startswith(prefix) and prefix in ("unet.", "transformer.")
                                        and k.endswith((".lora_A.weight", ".lora_B.weight")))]
    if bad or not converted:
        raise FewstepError(f"LoRA {source} is not a UNet or transformer LoRA in fewstep's layout "
                           f"(unet.<module>.lora_A.weight, transformer.<module>.lora_A.weight): "
                           + (f"it has the key {bad[0]!r}" if bad else "it is empty"))
    return converted


def flow_transformer_config(base: str | Path | None, recorded: str | None) -> tuple[str, dict]:
    """(class name, config) of the FLUX / SD3 transformer a LoRA adapts: from ``base`` (a pipeline folder), else the
    base its record names (as given, or a shipped ``models/NAME``). kohya's names are the original transformer's,
    which differ between FLUX and SD3 (whose diffusers module names are alike), so without one it is refused."""
    for folder in _base_candidates(base, recorded):
        config_file = folder / "transformer" / "config.json"
        if config_file.is_file():
            config = read_json(config_file)
            return config.get("_class_name", ""), config
    if base is not None:
        raise FewstepError(f"--base {base} is not a FLUX or SD3 pipeline folder (no transformer/config.json)")
    raise FewstepError(f"the LoRA adapts a transformer but names no base folder fewstep can find ({recorded}); give "
                       f"the FLUX or SD3 pipeline it adapts with --base DIR: kohya's module names are that "
                       f"transformer's original ones")


def _base_candidates(base: str | Path | None, recorded: str | None) -> list[Path]:
    """Where a LoRA's base pipeline folder may be: ``base`` if given; else the recorded path, and a shipped
    ``models/NAME`` of the same name."""
    if base is not None:
        return [Path(base)]
    if not recorded:
        return []
    return [Path(recorded)] + ([shipped_models_dir() / Path(recorded).name]
                               if Path(recorded).parts[:1] == ("models",) else [])


def flow_kohya_version(family: str, config: dict) -> dict[str, str]:
    """kohya's ``ss_base_model_version`` of a FLUX / SD3 LoRA, as sd-scripts writes it: "flux1" (library/flux_utils.py
    line 23, ``MODEL_VERSION_FLUX_V1``); for SD3 the MMDiT's ``model_type`` (library/sd3_utils.py lines 54–60:
    "5-large" with qk norms and no dual attention, "5-medium" with both, "medium" without qk norms)."""
    if family == FLUX:
        return {"ss_base_model_version": "flux1"}
    if not config.get("qk_norm"):
        return {"ss_base_model_version": "medium"}
    return {"ss_base_model_version": "5-medium" if config.get("dual_attention_layers") else "5-large"}


def kohya_state(state: dict[str, Tensor], alpha: float | None = None, unet_config: dict | None = None
                ) -> dict[str, Tensor]:
    """kohya-ss keys (α per module: the rank, or ``alpha`` for every module; a float32 scalar as kohya's own
    files hold it). Without ``unet_config``, diffusers' module names by ``convert_state_dict_to_kohya`` (SD 1.x/2.x);
    with an SDXL UNet's config, the original (SGM) names of its modules (:func:`sgm_module_name`)."""
    if unet_config is None:
        from diffusers.utils import convert_state_dict_to_kohya

        kohya = convert_state_dict_to_kohya(state)
        return {k: torch.tensor(float(alpha if alpha is not None else v), dtype=torch.float32)
                if k.endswith(".alpha") else v for k, v in kohya.items()}
    blocks, out = unet_block_map(unet_config), {}
    for key, value in state.items():
        module, _, part = key[len("unet."):].rpartition(".lora_")
        name = sgm_module_name(module, blocks)
        out[f"{name}.lora_{'down' if part == 'A.weight' else 'up'}.weight"] = value
        if part == "A.weight":
            out[f"{name}.alpha"] = torch.tensor(float(alpha if alpha is not None else value.shape[0]))
    return out


def kohya_version(state: dict[str, Tensor], sdxl: bool) -> dict[str, str]:
    """kohya's metadata naming the base model family, by which AUTOMATIC1111 lists a LoRA for a model
    (extensions-builtin/Lora/network.py ``detect_version``: ``ss_base_model_version`` "sdxl_…" is SDXL,
    ``ss_v2`` "True" SD 2, any other metadata SD 1; with an SDXL model loaded it hides the others unless told to
    show all): SDXL's, else SD 2's or SD 1's by the cross-attention width (1024, 768) where it is a published one."""
    if sdxl:
        return {"ss_base_model_version": "sdxl_base_v1-0"}
    widths = {v.shape[1] for k, v in state.items() if k.endswith("attn2.to_k.lora_A.weight")}
    return {1024: {"ss_base_model_version": "sd_v2", "ss_v2": "True"},
            768: {"ss_base_model_version": "sd_v1", "ss_v2": "False"}}.get(next(iter(widths)), {}) \
        if len(widths) == 1 else {}


def sgm_module_name(module: str, blocks: dict[str, str]) -> str:
    """kohya's SDXL name of a diffusers UNet module: ``lora_unet_`` + its original (SGM) path with ``_`` for ``.``,
    e.g. ``up_blocks.0.attentions.1.proj_in`` → ``lora_unet_output_blocks_1_1_proj_in``."""
    try:
        return kohya_name(unet_key(module + ".weight", blocks)[:-len(".weight")])
    except FewstepError:
        raise FewstepError(f"the LoRA adapts {module}, which the base UNet has no such module of (made for "
                           f"another base model? give it with --base)") from None


def sdxl_unet_config(state: dict[str, Tensor], base: str | Path | None, recorded: str | None) -> dict | None:
    """The UNet config of the SDXL pipeline a LoRA adapts, or None when it adapts an SD 1.x/2.x one: from
    ``base`` (given: a pipeline folder, which must exist), else the base its record names (where that folder
    is found: as given, or a shipped ``models/NAME``), else from the LoRA's own shapes: cross-attention keys of
    width 2048 are SDXL's (its published config, shipped in ``single_file_configs/sdxl-base``)."""
    for folder in _base_candidates(base, recorded):
        if (folder / "unet" / "config.json").is_file():
            config = read_json(folder / "unet" / "config.json")
            return config if config.get("addition_embed_type") == "text_time" else None
    if base is not None:
        raise FewstepError(f"--base {base} is not a diffusers pipeline folder (no unet/config.json)")
    widths = {v.shape[1] for k, v in state.items() if k.endswith("attn2.to_k.lora_A.weight")}
    return read_json(CONFIGS / "sdxl-base" / "unet" / "config.json") if widths == {2048} else None


def peft_config(ranks: dict[str, int], alpha: float | None, base: str | None):
    """peft's ``LoraConfig`` of the adapter: its modules by full name (peft matches them exactly), the most
    common rank as ``r`` and any other in ``rank_pattern``; α likewise (each module's rank when not given)."""
    from collections import Counter

    from peft import LoraConfig

    modules = [m.split(".", 1)[1] for m in ranks]                    # without "unet." / "transformer."
    r = Counter(ranks.values()).most_common(1)[0][0]
    rank_pattern = {m: v for m, v in zip(modules, ranks.values()) if v != r}
    lora_alpha = alpha if alpha is not None else r
    alpha_pattern = {} if alpha is not None else dict(rank_pattern)
    return LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=sorted(modules), rank_pattern=rank_pattern,
                      alpha_pattern=alpha_pattern, base_model_name_or_path=base)


def readers(out: Path, layout: str) -> str:
    """Who reads an export of ``layout`` at ``out``, as ``lora export`` tells the user: a FLUX / SD3 kohya file
    (sd-scripts' original transformer names) is not read by diffusers at other than FLUX.1's sizes, nor at all for
    SD3 (:mod:`fewstep.models.lora_layouts`)."""
    if layout == "kohya":
        from safetensors import safe_open

        from .flow_keys import is_kohya_original

        with safe_open(str(out), "pt") as f:
            flow = is_kohya_original(f.keys())
        return ("ComfyUI and kohya's tools load it, and fewstep's --lora; diffusers reads FLUX kohya files of FLUX.1's "
                "sizes only, and no SD3 kohya file" if flow else "AUTOMATIC1111, ComfyUI, kohya's tools and diffusers "
                "load it")
    return {"diffusers": "pipe.load_lora_weights reads it", "peft": "peft's PeftModel loads it"}[layout]
