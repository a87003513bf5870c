"""LoRA files in layouts diffusers' loader does not read right, read here into what it does read: peft's own keys
(``base_model.model.…``, α folded in), SDXL kohya files with the original SGM block names, and FLUX / SD3 kohya
files with the original transformer names (:func:`fewstep.models.loras.apply_loras` tries each before diffusers'
own loader)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import FewstepError

PEFT_PREFIX = "base_model.model."   # a PeftModel's state dict: peft's save_pretrained, `lora export --format peft`


def peft_unet_state(path: Path, prefix: str = "unet") -> dict[str, torch.Tensor] | None:
    """A peft-layout LoRA file as diffusers' loader reads it (``base_model.model.<module>`` → ``unet.<module>``, or
    ``prefix``: "transformer" for FLUX / SD3), the
    adapter's α folded into lora_B (ΔW = α/r·B·A; diffusers reads these keys with α = r); α from the file's
    metadata (``fewstep_alpha``) or peft's ``adapter_config.json`` beside it (``lora_alpha``). None for any other
    layout (diffusers' loader reads those itself)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys, metadata = list(f.keys()), f.metadata() or {}
        if not keys or not all(k.startswith(PEFT_PREFIX) for k in keys):
            return None
        state = {k: f.get_tensor(k) for k in keys}
    alpha = metadata.get("fewstep_alpha")
    config = path.parent / "adapter_config.json"
    if alpha is None and config.is_file():
        try:
            alpha = json.loads(config.read_text()).get("lora_alpha")
        except ValueError:
            raise FewstepError(f"{config} is corrupt: not JSON") from None
    out = {}
    for key, value in state.items():
        if alpha is not None and key.endswith(".lora_B.weight"):
            value = value * (float(alpha) / value.shape[1])
        out[f"{prefix}." + key[len(PEFT_PREFIX):]] = value
    return out


def original_kohya_state(path: Path, unet) -> dict[str, torch.Tensor] | None:
    """A kohya file with the original (SGM) UNet module names (SDXL LoRAs: ``lora_unet_input_blocks_…``) renamed to
    ``unet``'s diffusers names exactly (:func:`fewstep.models.ldm_keys.kohya_original_to_diffusers`); None for any
    other layout."""
    from safetensors import safe_open

    from .ldm_keys import SGM_KOHYA, kohya_original_to_diffusers

    with safe_open(str(path), "pt") as f:
        if not any(k.startswith(SGM_KOHYA) for k in f.keys()):
            return None
        return kohya_original_to_diffusers({k: f.get_tensor(k) for k in f.keys()}, unet)


def flow_kohya_state(path: Path, transformer) -> dict[str, torch.Tensor] | None:
    """A kohya file with the original FLUX / SD3 module names (sd-scripts' ``lora_unet_double_blocks_…`` /
    ``lora_unet_joint_blocks_…``, ``fewstep lora export --format kohya``) in peft's names of ``transformer``'s own
    modules (:func:`fewstep.models.flow_keys.kohya_to_peft`): diffusers' FLUX reader assumes FLUX.1's sizes
    (``_convert_kohya_flux_lora_to_diffusers`` splits ``linear1`` as 3072·3 + 12288 rows) and its SD3 loader reads
    no kohya names at all. None for any other layout."""
    from safetensors import safe_open

    from .flow_keys import is_kohya_original, kohya_to_peft, meta_shapes

    with safe_open(str(path), "pt") as f:
        if not is_kohya_original(f.keys()):
            return None
        state = {k: f.get_tensor(k) for k in f.keys()}
    family = type(transformer).__name__
    return kohya_to_peft(state, family, transformer.config, meta_shapes(family, transformer.config))
