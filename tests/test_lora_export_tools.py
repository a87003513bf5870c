"""kohya LoRAs as AUTOMATIC1111 and ComfyUI read them (issue 31, item 3a): each tool's key rules replayed here,
ported from their sources, and every exported module checked to land on the right module of the real UNet.

- AUTOMATIC1111 (extensions-builtin/Lora/networks.py, v1.6+): ``convert_diffusers_name_to_compvis`` (diffusers'
  block names mapped by SD 1.x's layout), then the fall-back "SDXL loras seem to already have correct compvis
  keys": ``lora_unet`` → ``diffusion_model``, looked up among the LDM model's module names with ``_`` for ``.``.
- ComfyUI (comfy/lora.py ``model_lora_keys_unet``): ``lora_unet_`` + every ``diffusion_model.*.weight`` key with
  ``_``, and diffusers' names through comfy/utils.py ``unet_to_diffusers`` of the model's detected config.

"The right module" is ComfyUI's ``unet_to_diffusers`` image of the adapter's diffusers module: a map written
independently of fewstep's (:mod:`fewstep.models.ldm_keys`). Full-size SD 1.5 and SDXL UNets are built on the meta
device from the published configs (no memory, no weights); the shipped tiny SDXL LCM-LoRA is also applied the
A1111 way to the original-format UNet and read back by diffusers' ``convert_ldm_unet_checkpoint``."""

from __future__ import annotations

import re

import pytest
import torch

from fewstep.models.folders import load_model, shipped_models_dir
from fewstep.models.lora_export import export_lora, kohya_state, kohya_version, sdxl_unet_config
from fewstep.models.single_file import CONFIGS

MODELS = shipped_models_dir()


# --- ComfyUI: comfy/utils.py unet_to_diffusers (weights only: the modules a LoRA can adapt) ----------------------
COMFY_ATTENTION = ["proj_in.weight", "proj_out.weight"]
COMFY_TRANSFORMER = ["attn1.to_q.weight", "attn1.to_k.weight", "attn1.to_v.weight", "attn1.to_out.0.weight",
                     "attn2.to_q.weight", "attn2.to_k.weight", "attn2.to_v.weight", "attn2.to_out.0.weight",
                     "ff.net.0.proj.weight", "ff.net.2.weight"]
COMFY_RESNET = {"in_layers.2.weight": "conv1.weight", "emb_layers.1.weight": "time_emb_proj.weight",
                "out_layers.3.weight": "conv2.weight", "skip_connection.weight": "conv_shortcut.weight"}
COMFY_BASIC = [("label_emb.0.0.weight", "add_embedding.linear_1.weight"),
               ("label_emb.0.2.weight", "add_embedding.linear_2.weight"), ("input_blocks.0.0.weight", "conv_in.weight"),
               ("out.2.weight", "conv_out.weight"), ("time_embed.0.weight", "time_embedding.linear_1.weight"),
               ("time_embed.2.weight", "time_embedding.linear_2.weight")]


def comfy_config(config: dict) -> dict:
    """ComfyUI's unet_config of a diffusers UNet (what comfy/model_detection.py detects from the checkpoint)."""
    levels, per = len(config["block_out_channels"]), config["layers_per_block"]
    depth = config.get("transformer_layers_per_block", 1)
    depth = depth if isinstance(depth, list) else [depth] * levels
    down = [depth[i] if "CrossAttn" in config["down_block_types"][i] else 0 for i in range(levels)]
    up = [depth[i] if "CrossAttn" in config["up_block_types"][levels - 1 - i] else 0 for i in range(levels)]
    return {"num_res_blocks": [per] * levels, "channel_mult": [1] * levels,
            "transformer_depth": [d for d in down for _ in range(per)],
            "transformer_depth_output": [d for d in up for _ in range(per + 1)], "transformer_depth_middle": depth[-1]}


def comfy_unet_to_diffusers(unet_config: dict) -> dict[str, str]:
    """comfy/utils.py unet_to_diffusers, line for line (diffusers weight → original weight)."""
    num_res_blocks = unet_config["num_res_blocks"]
    num_blocks = len(unet_config["channel_mult"])
    transformer_depth = unet_config["transformer_depth"][:]
    transformer_depth_output = unet_config["transformer_depth_output"][:]
    out = {}
    for x in range(num_blocks):
        n = 1 + (num_res_blocks[x] + 1) * x
        for i in range(num_res_blocks[x]):
            for b in COMFY_RESNET:
                out[f"down_blocks.{x}.resnets.{i}.{COMFY_RESNET[b]}"] = f"input_blocks.{n}.0.{b}"
            num_transformers = transformer_depth.pop(0)
            if num_transformers > 0:
                for b in COMFY_ATTENTION:
                    out[f"down_blocks.{x}.attentions.{i}.{b}"] = f"input_blocks.{n}.1.{b}"
                for t in range(num_transformers):
                    for b in COMFY_TRANSFORMER:
                        out[f"down_blocks.{x}.attentions.{i}.transformer_blocks.{t}.{b}"] = \
                            f"input_blocks.{n}.1.transformer_blocks.{t}.{b}"
            n += 1
        out[f"down_blocks.{x}.downsamplers.0.conv.weight"] = f"input_blocks.{n}.0.op.weight"
    for b in COMFY_ATTENTION:
        out[f"mid_block.attentions.0.{b}"] = f"middle_block.1.{b}"
    for t in range(unet_config["transformer_depth_middle"]):
        for b in COMFY_TRANSFORMER:
            out[f"mid_block.attentions.0.transformer_blocks.{t}.{b}"] = f"middle_block.1.transformer_blocks.{t}.{b}"
    for i, n in enumerate([0, 2]):
        for b in COMFY_RESNET:
            out[f"mid_block.resnets.{i}.{COMFY_RESNET[b]}"] = f"middle_block.{n}.{b}"
    num_res_blocks = list(reversed(num_res_blocks))
    for x in range(num_blocks):
        n = (num_res_blocks[x] + 1) * x
        length = num_res_blocks[x] + 1
        for i in range(length):
            c = 0
            for b in COMFY_RESNET:
                out[f"up_blocks.{x}.resnets.{i}.{COMFY_RESNET[b]}"] = f"output_blocks.{n}.0.{b}"
            c += 1
            num_transformers = transformer_depth_output.pop()
            if num_transformers > 0:
                c += 1
                for b in COMFY_ATTENTION:
                    out[f"up_blocks.{x}.attentions.{i}.{b}"] = f"output_blocks.{n}.1.{b}"
                for t in range(num_transformers):
                    for b in COMFY_TRANSFORMER:
                        out[f"up_blocks.{x}.attentions.{i}.transformer_blocks.{t}.{b}"] = \
                            f"output_blocks.{n}.1.transformer_blocks.{t}.{b}"
            if i == length - 1:
                out[f"up_blocks.{x}.upsamplers.0.conv.weight"] = f"output_blocks.{n}.{c}.conv.weight"
            n += 1
    out.update({hf: ldm for ldm, hf in COMFY_BASIC})
    return out


def comfy_lora_target(name: str, ldm_keys: set[str], diffusers_map: dict[str, str]) -> str | None:
    """comfy/lora.py model_lora_keys_unet: the original weight a kohya module name patches, or None."""
    key_map = {"lora_unet_" + k[:-len(".weight")].replace(".", "_"): k for k in ldm_keys}
    key_map.update({"lora_unet_" + k[:-len(".weight")].replace(".", "_"): v for k, v in diffusers_map.items()})
    return key_map.get(name)


# --- AUTOMATIC1111: extensions-builtin/Lora/networks.py ------------------------------------------------------
A1111_SUFFIX = {"attentions": {}, "resnets": {"conv1": "in_layers_2", "conv2": "out_layers_3",
                                              "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}}


def a1111_convert(key: str) -> str:
    """convert_diffusers_name_to_compvis(key, is_sd2=False), the UNet rules."""
    def match(regex):
        m = re.match(regex, key)
        return None if m is None else [int(x) if re.match(r"\d+", x) else x for x in m.groups()]

    if (m := match(r"lora_unet_conv_in(.*)")) is not None:
        return f"diffusion_model_input_blocks_0_0{m[0]}"
    if (m := match(r"lora_unet_conv_out(.*)")) is not None:
        return f"diffusion_model_out_2{m[0]}"
    if (m := match(r"lora_unet_time_embedding_linear_(\d+)(.*)")) is not None:
        return f"diffusion_model_time_embed_{m[0] * 2 - 2}{m[1]}"
    if (m := match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)")) is not None:
        suffix = A1111_SUFFIX.get(m[1], {}).get(m[3], m[3])
        return f"diffusion_model_input_blocks_{1 + m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_{suffix}"
    if (m := match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)")) is not None:
        suffix = A1111_SUFFIX.get(m[0], {}).get(m[2], m[2])
        return f"diffusion_model_middle_block_{1 if m[0] == 'attentions' else m[1] * 2}_{suffix}"
    if (m := match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)")) is not None:
        suffix = A1111_SUFFIX.get(m[1], {}).get(m[3], m[3])
        return f"diffusion_model_output_blocks_{m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_{suffix}"
    if (m := match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv")) is not None:
        return f"diffusion_model_input_blocks_{3 + m[0] * 3}_0_op"
    if (m := match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv")) is not None:
        return f"diffusion_model_output_blocks_{2 + m[0] * 3}_{2 if m[0] > 0 else 1}_conv"
    return key


def a1111_target(name: str, layers: set[str]) -> str | None:
    """load_network's lookup of one kohya module name among the model's layer names (None: "failed to match")."""
    key = a1111_convert(name)
    if key in layers:
        return key
    m = re.match(r"(.*)_([qkv]_proj)$", key)
    if m and m.group(1) in layers:
        return m.group(1)
    key = name.replace("lora_unet", "diffusion_model")          # "SDXL loras seem to already have correct compvis keys"
    return key if key in layers else None


# --- the checks --------------------------------------------------------------------------------------------------
def _adaptable(config: dict) -> list[str]:
    """Every Linear/Conv2d module of the diffusers UNet of ``config`` (what a LoRA may adapt), on the meta device."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    return [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
            and "cond_proj" not in n]


def _fake_lora(modules: list[str], width: int | None = None) -> dict[str, torch.Tensor]:
    state = {}
    for m in modules:
        down = width if (width and m.endswith("attn2.to_k")) else 1
        state[f"unet.{m}.lora_A.weight"] = torch.zeros(1, down)
        state[f"unet.{m}.lora_B.weight"] = torch.zeros(1, 1)
    return state


def mapping(kohya: dict[str, torch.Tensor], modules: dict[str, str], config: dict) -> dict[str, dict[str, bool]]:
    """Per tool, per exported module: does the tool patch the right original weight? ``modules``: kohya name →
    the diffusers module it was exported from."""
    right = comfy_unet_to_diffusers(comfy_config(config))
    ldm_keys = set(right.values())
    layers = {"diffusion_model_" + k[:-len(".weight")].replace(".", "_") for k in ldm_keys}
    result = {"a1111": {}, "comfyui": {}}
    for name, module in modules.items():
        want = right[module + ".weight"]
        result["comfyui"][name] = comfy_lora_target(name, ldm_keys, right) == want
        result["a1111"][name] = a1111_target(name, layers) == "diffusion_model_" + want[:-7].replace(".", "_")
    assert {k.split(".")[0] for k in kohya} == set(modules)
    return result


def _exported(config: dict, sdxl: bool) -> tuple[dict, dict[str, str]]:
    """The kohya names fewstep exports for every adaptable module of a UNet of ``config`` (SDXL: decided from the
    LoRA's shapes, as for a LoRA without a known base), with the diffusers module each came from."""
    modules = _adaptable(config)
    state = _fake_lora(modules, 2048 if sdxl else 768)
    chosen = sdxl_unet_config(state, None, None)
    assert (chosen is not None) == sdxl
    kohya = kohya_state(state, None, chosen)
    names = {}
    for m in modules:
        one = kohya_state({k: v for k, v in state.items() if k.startswith(f"unet.{m}.lora_")}, None, chosen)
        names[next(iter(one)).split(".")[0]] = m
    return kohya, names


@pytest.mark.parametrize("name,sdxl", [("sd-v1-5", False), ("sdxl-base", True)])
def test_every_exported_module_lands_on_the_right_module_in_a1111_and_comfyui(name, sdxl):
    """Full-size SD 1.5 (diffusers' block names, kohya's SD 1.x convention) and SDXL (the original names):
    100% of the adaptable modules map to the right original weight under both tools' rules."""
    from fewstep.models.config import read_json

    config = read_json(CONFIGS / name / "unet" / "config.json")
    kohya, modules = _exported(config, sdxl)
    original = [n for n in modules if re.search(r"input_blocks|middle_block|output_blocks|time_embed_|label_emb", n)]
    assert len(original) == (len(modules) - 1 if sdxl else 0)            # SDXL: all but lora_unet_out_2 (conv_out)
    result = mapping(kohya, modules, config)
    for tool, ok in result.items():
        wrong = [n for n, good in ok.items() if not good]
        assert not wrong, f"{tool}: {len(wrong)}/{len(ok)} modules map wrongly, e.g. {wrong[:3]}"
    assert len(modules) > (700 if sdxl else 250)


def test_sdxl_with_diffusers_block_names_does_not_map_in_a1111():
    """Why SDXL gets the original names: diffusers' block names (the old export) are mapped by A1111 with SD 1.x's
    layout: SDXL's first upsampler (output_blocks.2.2, after an attention) and its added-conditioning MLP
    (label_emb) are lost; ComfyUI maps them by the real config."""
    from fewstep.models.config import read_json

    config = read_json(CONFIGS / "sdxl-base" / "unet" / "config.json")
    modules = _adaptable(config)
    state = _fake_lora(modules)
    kohya = kohya_state(state)                              # no config: diffusers' names
    names = {f"lora_unet_{m.replace('.', '_')}": m for m in modules}
    result = mapping(kohya, names, config)
    wrong = [n for n, good in result["a1111"].items() if not good]
    assert sorted(wrong) == ["lora_unet_add_embedding_linear_1", "lora_unet_add_embedding_linear_2",
                             "lora_unet_up_blocks_0_upsamplers_0_conv"]
    assert all(result["comfyui"].values())               # ComfyUI maps diffusers' names by the real config


def test_shipped_sdxl_lcm_lora_exports_the_same_adapters_under_the_original_names(tmp_path):
    """models/emoji-sdxl-lcm-lora to kohya: only original (SGM) names, each on the right module of the tiny SDXL
    UNet under both tools' rules with matching shapes; patched in the A1111 way (W += α/r · up·down) into the
    original-format UNet and read back by diffusers' convert_ldm_unet_checkpoint, it is the UNet fewstep fuses from
    the folder; and fewstep reads the file back to the same UNet."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from safetensors import safe_open
    from safetensors.torch import load_file

    from fewstep.models.ldm_keys import UNET, unet_to_original
    from fewstep.models.loras import apply_loras

    out = export_lora(MODELS / "emoji-sdxl-lcm-lora", "kohya", tmp_path / "sdxl.safetensors")
    kohya = load_file(out)
    with safe_open(str(out), "pt") as f:               # what A1111's detect_version lists it as: SDXL
        assert f.metadata()["ss_base_model_version"].startswith("sdxl_")
    names = {k.split(".")[0] for k in kohya}
    assert all(re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_\d", n) for n in names), names
    base = load_model(MODELS / "emoji-sdxl")
    config = dict(base.unet.config)
    right = comfy_unet_to_diffusers(comfy_config(config))
    state = base.unet.state_dict()
    ldm = {k: v.clone() for k, v in unet_to_original(state, config).items()}      # a whole UNet for diffusers' reader
    assert all(torch.equal(ldm[UNET + v], state[k]) for k, v in right.items() if k in state)   # ComfyUI's map agrees
    layers = {"diffusion_model_" + k[len("model.diffusion_model."):-len(".weight")].replace(".", "_"): k
              for k in ldm if k.endswith(".weight")}
    assert len(names) == 128
    for name in names:
        target = layers.get(a1111_target(name, set(layers)))
        assert target is not None, name
        assert UNET + (comfy_lora_target(name, {k[len(UNET):] for k in layers.values()}, right) or "") == target, name
        down, up, alpha = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"], kohya[f"{name}.alpha"]
        weight = ldm[target]
        delta = (up.flatten(1) @ down.flatten(1)) * (alpha / down.shape[0])
        assert delta.numel() == weight.numel(), name
        ldm[target] = weight + delta.reshape(weight.shape)
    read_back = convert_ldm_unet_checkpoint(ldm, config)
    fused = apply_loras(base, [(MODELS / "emoji-sdxl-lcm-lora", 1.0)]).unet.state_dict()
    assert read_back.keys() == fused.keys()
    assert max((read_back[k] - fused[k]).abs().max().item() for k in fused) <= 1e-5
    ours = apply_loras(base, [(out, 1.0)]).unet.state_dict()
    assert max((ours[k] - fused[k]).abs().max().item() for k in fused) == 0.0



def test_the_base_decides_the_names(tmp_path):
    """--base names the pipeline a LoRA adapts: an SD 1.x base keeps diffusers' names, a missing folder is an
    error; a bare file with no record is SDXL only by its shapes (a tiny SDXL LoRA then needs --base)."""
    from safetensors.torch import load_file, save_file

    from fewstep.errors import FewstepError
    from fewstep.models.loras import LORA_FILE

    lora = MODELS / "emoji-sdxl-lcm-lora"
    sd1 = export_lora(lora, "kohya", tmp_path / "a.safetensors", base=MODELS / "emoji-sd")
    assert all(k.startswith(("lora_unet_down_blocks", "lora_unet_mid_block", "lora_unet_up_blocks"))
               for k in load_file(sd1))
    with pytest.raises(FewstepError, match="not a diffusers pipeline folder"):
        export_lora(lora, "kohya", tmp_path / "b.safetensors", base=tmp_path / "nowhere")
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(lora / LORA_FILE), str(bare))                     # no metadata, no fewstep.json beside
    plain = export_lora(bare, "kohya", tmp_path / "c.safetensors")
    assert any(k.startswith("lora_unet_up_blocks") for k in load_file(plain))
    given = export_lora(bare, "kohya", tmp_path / "d.safetensors", base=MODELS / "emoji-sdxl")
    assert all(k.startswith(("lora_unet_input", "lora_unet_middle", "lora_unet_output")) for k in load_file(given))
    for width, version in ((768, "sd_v1"), (1024, "sd_v2"), (64, None)):     # A1111's detect_version
        assert kohya_version(_fake_lora(["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"], width),
                             False).get("ss_base_model_version") == version


def test_diffusers_reads_the_full_size_sdxl_names_onto_every_module():
    """diffusers' own kohya reader (lora_conversion_utils: _maybe_map_sgm_blocks_to_diffusers, then
    _convert_non_diffusers_lora_to_diffusers, then convert_unet_state_dict_to_peft) puts every exported full-size
    SDXL module back on its diffusers module (for the published layout; a non-standard one, e.g. an upsampler after
    a block without attention, is why fewstep reads these names itself: lora_layouts.original_kohya_state)."""
    import types

    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )
    from diffusers.utils import convert_unet_state_dict_to_peft

    from fewstep.models.config import read_json

    config = read_json(CONFIGS / "sdxl-base" / "unet" / "config.json")
    kohya, modules = _exported(config, True)
    state, _ = _convert_non_diffusers_lora_to_diffusers(
        _maybe_map_sgm_blocks_to_diffusers(dict(kohya), types.SimpleNamespace(**config)))
    peft = convert_unet_state_dict_to_peft({k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")})
    assert {k.rsplit(".lora_", 1)[0] for k in peft} == set(modules.values())


def test_an_sdxl_lora_for_another_layout_is_refused(tmp_path):
    """An original-named module the base UNet lacks (a LoRA made for another SDXL) is one clear error, not dropped."""
    from safetensors.torch import load_file, save_file

    from fewstep.errors import FewstepError
    from fewstep.models.loras import apply_loras

    out = export_lora(MODELS / "emoji-sdxl-lcm-lora", "kohya", tmp_path / "sdxl.safetensors")
    state = load_file(out)
    name = "lora_unet_output_blocks_1_1_conv"
    state.update({f"lora_unet_input_blocks_9_1_proj_in{k[len(name):]}": v.clone() for k, v in state.items()
                  if k.startswith(name + ".")})
    save_file(state, str(tmp_path / "other.safetensors"))
    with pytest.raises(FewstepError, match="does not fit .* lora_unet_input_blocks_9_1_proj_in is not one of"):
        apply_loras(load_model(MODELS / "emoji-sdxl"), [(tmp_path / "other.safetensors", 1.0)])
