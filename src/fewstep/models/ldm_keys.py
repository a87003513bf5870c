"""diffusers' names → the original (LDM / CompVis / SGM) names that AUTOMATIC1111, ComfyUI and kohya's SDXL tools
use, for the UNet, the VAE and the text encoders of SD 1.x and SDXL pipelines. One map, used by every writer and
reader of the original names: single-file checkpoints (:mod:`fewstep.models.single_file_export`), kohya LoRAs of
SDXL (:mod:`fewstep.models.lora_export`) and reading those back (:func:`kohya_original_to_diffusers`).

Followed: huggingface/diffusers ``scripts/convert_diffusers_to_original_stable_diffusion.py`` and
``scripts/convert_diffusers_to_original_sdxl.py`` (their ``unet_conversion_map*``, ``vae_conversion_map*``,
``convert_openclip_text_enc_state_dict``), with their hard-coded block counts (4 levels, 2 resnets per level,
no attention in ``up_blocks.0``) read from the UNet's config instead, as ComfyUI's ``comfy/utils.py``
``unet_to_diffusers`` does (an upsampler is at index 2 of its output block when that block has attentions,
else 1), so tiny pipelines such as ``models/emoji-sd`` map too. Checked against diffusers' own reader
(``convert_ldm_unet_checkpoint`` & co. through ``from_single_file``) in tests/test_single_file_export.py.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from ..errors import FewstepError

UNET = "model.diffusion_model."             # the original checkpoint's prefixes
VAE = "first_stage_model."
CLIP_SD1 = "cond_stage_model.transformer."   # SD 1.x: OpenAI CLIP ViT-L/14 in transformers' layout
CLIP_XL_1 = "conditioner.embedders.0.transformer."
CLIP_XL_2 = "conditioner.embedders.1.model."  # SDXL's OpenCLIP ViT-bigG in open_clip's layout
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
          "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}   # unet_conversion_map_resnet


# --- UNet ------------------------------------------------------------------------------------------------
def unet_block_map(config) -> dict[str, str]:
    """diffusers prefix → original prefix of every block of a ``UNet2DConditionModel`` with this config (a dict
    or a FrozenDict): diffusers' ``unet_conversion_map`` + ``unet_conversion_map_layer``, for any number of
    levels and resnets per level."""
    per = config["layers_per_block"]
    if not isinstance(per, int):
        raise FewstepError(f"a UNet with per-level layers_per_block {per} has no original (LDM) layout")
    levels = len(config["block_out_channels"])
    up_attention = ["CrossAttn" in t for t in config["up_block_types"]]
    m = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
         "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2.",  # SDXL's
         "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
         "mid_block.resnets.0.": "middle_block.0.", "mid_block.attentions.0.": "middle_block.1.",
         "mid_block.resnets.1.": "middle_block.2."}
    for i in range(levels):
        for j in range(per):
            m[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{(per + 1) * i + j + 1}.0."
            m[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{(per + 1) * i + j + 1}.1."
        for j in range(per + 1):
            m[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{(per + 1) * i + j}.0."
            m[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{(per + 1) * i + j}.1."
        if i < levels - 1:
            m[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(per + 1) * (i + 1)}.0.op."
            m[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{(per + 1) * i + per}.{2 if up_attention[i] else 1}."
    return m


def unet_key(key: str, blocks: dict[str, str]) -> str:
    """The original name of the diffusers UNet weight ``key`` (``<module>.weight``), by :func:`unet_block_map`'s
    ``blocks``; a name outside the original layout is a clear error."""
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):           # the longest block prefix
        prefix = ".".join(parts[:n]) + "."
        if prefix in blocks:
            rest = parts[n:]
            if ".resnets." in prefix and rest[0] in RESNET:
                rest = [RESNET[rest[0]], *rest[1:]]
            return blocks[prefix] + ".".join(rest)
    what = ("the guidance-scale embedding of an LCD-distilled LCM (time_cond_proj_dim), which the original "
            "format has no place for; merge an LCM-LoRA instead" if "cond_proj" in key else "no original name")
    raise FewstepError(f"the UNet weight {key} has {what}")


def unet_to_original(state: dict[str, Tensor], config) -> dict[str, Tensor]:
    """A diffusers UNet state dict under the original names (``model.diffusion_model.`` prefix)."""
    blocks = unet_block_map(config)
    return {UNET + unet_key(k, blocks): v for k, v in state.items()}


# --- VAE -------------------------------------------------------------------------------------------------
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_key(key: str, levels: int) -> str:
    """The original name of a diffusers ``AutoencoderKL`` weight: diffusers' ``vae_conversion_map`` (decoder
    levels counted from the bottom, ``up.{levels-1-i}``) and ``vae_conversion_map_attn``."""
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
                 lambda g: f"decoder.up.{levels - 1 - int(g[1])}.block.{g[2]}.", key)
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                 lambda g: f"decoder.up.{levels - 1 - int(g[1])}.upsample.", key)
    key = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.",
                 lambda g: f"{g[1]}.mid.block_{int(g[2]) + 1}.", key)
    key = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", key)
    key = key.replace(".conv_shortcut.", ".nin_shortcut.")
    match = re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", key)
    if match:
        if match[2] not in VAE_ATTENTION:
            raise FewstepError(f"the VAE weight {key} has no original name")
        key = f"{match[1]}.mid.attn_1.{VAE_ATTENTION[match[2]]}.{match[3]}"
    if "_blocks." in key or "mid_block." in key:
        raise FewstepError(f"the VAE weight {key} has no original name")
    return key


def vae_to_original(state: dict[str, Tensor], config) -> dict[str, Tensor]:
    """A diffusers VAE state dict under the original names (``first_stage_model.``), the mid-block attention's
    linear q/k/v/proj_out as the 1×1 convolutions they are there (diffusers' ``reshape_weight_for_sd``)."""
    levels = len(config["block_out_channels"])
    out = {}
    for k, v in state.items():
        new = vae_key(k, levels)
        if ".mid.attn_1." in new and new.endswith(".weight") and v.ndim == 2:
            v = v.reshape(*v.shape, 1, 1)
        out[VAE + new] = v
    return out


# --- text encoders ---------------------------------------------------------------------------------------
def _text_model_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A CLIP text model's weights as ``text_model.*`` (transformers 5 names a ``CLIPTextModel``'s weights without
    that prefix, transformers 4 and the original checkpoints with it); a projection stays at the top."""
    return {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in state.items()}


def clip_to_original(state: dict[str, Tensor], prefix: str = CLIP_SD1) -> dict[str, Tensor]:
    """OpenAI CLIP (SD 1.x's text encoder, SDXL's first): transformers' names under ``prefix``, as the original
    checkpoints hold it (diffusers' ``convert_openai_text_enc_state_dict`` is the identity)."""
    return {prefix + k: v for k, v in _text_model_keys(state).items()}


OPEN_CLIP = [("text_model.encoder.layers.", "transformer.resblocks."), ("layer_norm1", "ln_1"),
             ("layer_norm2", "ln_2"), (".fc1.", ".c_fc."), (".fc2.", ".c_proj."), (".self_attn", ".attn"),
             ("text_model.final_layer_norm.", "ln_final."),
             ("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
             ("text_model.embeddings.position_embedding.weight", "positional_embedding")]   # textenc_conversion_lst


def open_clip_to_original(state: dict[str, Tensor], prefix: str = CLIP_XL_2) -> dict[str, Tensor]:
    """SDXL's second text encoder (``CLIPTextModelWithProjection``) in open_clip's layout under ``prefix``:
    diffusers' ``convert_openclip_text_enc_state_dict`` (q/k/v fused into ``in_proj_weight``/``in_proj_bias`` in
    that order) and the projection transposed to ``text_projection`` as convert_diffusers_to_original_sdxl.py
    writes it."""
    out: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, Tensor]] = {}
    for key, value in _text_model_keys(state).items():
        match = re.match(r"^(.*)\.self_attn\.([qkv])_proj\.(weight|bias)$", key)
        if match:
            qkv.setdefault(f"{match[1]}.self_attn.in_proj_{match[3]}", {})[match[2]] = value
            continue
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
            continue
        out[prefix + _open_clip_name(key)] = value
    for key, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise FewstepError(f"the text encoder lacks one of q/k/v at {key}")
        out[prefix + _open_clip_name(key)] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def _open_clip_name(key: str) -> str:
    for hf, ldm in OPEN_CLIP:
        key = key.replace(hf, ldm)
    return key


# --- kohya LoRA names ------------------------------------------------------------------------------------
SGM_KOHYA = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")  # SDXL's kohya names
def kohya_name(module: str) -> str:
    """kohya's name of a module path (``lora_unet_`` + the path with ``_`` for ``.``)."""
    return "lora_unet_" + module.replace(".", "_")


def kohya_original_to_diffusers(state: dict[str, Tensor], unet) -> dict[str, Tensor] | None:
    """A kohya LoRA whose UNet modules carry the original names (``lora_unet_input_blocks_4_1_…``, kohya
    sd-scripts' SDXL convention) renamed to kohya's diffusers names (``lora_unet_down_blocks_1_attentions_0_…``)
    of ``unet``'s own modules, exactly (by :func:`unet_block_map` of its config), which diffusers' loader reads
    for any layout (its own ``_maybe_map_sgm_blocks_to_diffusers`` assumes SDXL's: an upsampler always at index
    2). Other keys (text encoders) are kept. None if no key has an original block name; a block name this UNet
    lacks is an error (diffusers' loader drops such keys without a word when others are diffusers-named)."""
    if not any(k.startswith(SGM_KOHYA) for k in state):
        return None
    blocks = unet_block_map(unet.config)
    names = {}
    for key in unet.state_dict():
        if key.endswith(".weight"):
            try:
                names[kohya_name(unet_key(key, blocks)[:-len(".weight")])] = kohya_name(key[:-len(".weight")])
            except FewstepError:
                continue                                 # a weight with no original name: nothing to rename
    out = {}
    for key, value in state.items():
        name, _, part = key.partition(".")
        if name.startswith(SGM_KOHYA) and name not in names:     # diffusers would drop it silently
            raise FewstepError(f"its module {name} is not one of this UNet's")
        out[f"{names.get(name, name)}.{part}"] = value
    return out
