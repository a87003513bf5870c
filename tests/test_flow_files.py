"""FLUX- and SD3-format files (issue 28 items 1 and 3): LoRAs exported in kohya's (sd-scripts'), diffusers' and peft's
layouts and read back; ``lora merge`` and style LoRAs on these bases; the transformer written as one original-layout
single file and read back with a local folder's other parts, by fewstep and by diffusers' ``from_single_file``.

Other tools' rules are replayed here, transcribed from their sources (each function says which):
ComfyUI's ``comfy/lora.py`` (``model_lora_keys_unet``, ``load_lora``, ``calculate_weight``: ComfyUI commit 41444b5) and
``comfy/utils.py`` (``flux_to_diffusers``: ComfyUI v0.26.1; ``mmdit_to_diffusers``: commit 2ba5cc8) and
``comfy/model_detection.py`` (``detect_unet_config``: commit d415a44); diffusers 0.42.1's own converters are called.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import CAPTIONS, run_cli, save_tiny_flow, tiny_data

from fewstep.errors import FewstepError
from fewstep.models import flow_keys
from fewstep.models.folders import load_model
from fewstep.models.loras import LCM_LORA, LORA_FILE, LoraSpec, apply_loras, load_with_loras, save_lora
from fewstep.nets.lora import add_lora
from fewstep.sampling.generate import generate_latent

PROMPTS = [CAPTIONS[0], CAPTIONS[3]]
# SD3's MMDiT is 64·depth wide with depth joint blocks (ComfyUI reads depth off the width): 128 wide, 2 blocks
SIZES = {"flux": {}, "sd3": {"width": 128}}


@pytest.fixture(scope="module", params=["flux", "sd3"])
def flow(request, tmp_path_factory):
    """(family, pipeline folder, a LoRA folder on it): the LoRA on the LCM-LoRA targets, written by save_lora as
    distill_lcm writes one, its weights random (every module's ΔW clearly non-zero) instead of 2 training steps'."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    folder = save_tiny_flow(root / f"tiny-{family}", family, shift=1.0 if family == "flux" else 3.0, **SIZES[family])
    model = load_model(folder)
    transformer = copy.deepcopy(model.backbone)
    add_lora(transformer, rank=2)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    lora = save_lora(root / "lora", transformer, {"kind": "lcm-lora", "base": str(folder), "rank": 2},
                     pipeline=model.diffusers_pipeline)
    return family, folder, lora


def fused(folder, lora) -> dict:
    """The transformer with ``lora`` fused in by fewstep (a file that says nothing declared the LCM-LoRA it is)."""
    return apply_loras(load_model(folder), [LoraSpec(lora, 1.0, LCM_LORA)]).backbone.state_dict()


def assert_same(a: dict, b: dict, tol: float = 1e-6) -> None:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:4]
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= tol, worst


def comfy_config(family: str, config) -> dict:
    """comfy/model_detection.py ``detect_unet_config``: SD3's depth = x_embedder width // 64 (num_blocks = depth);
    FLUX's double/single block counts (its hidden_size, fixed at 3072 there, taken from the model here: the tiny
    FLUX is 32 wide, and newer ComfyUI reads it off the checkpoint)."""
    width = config["num_attention_heads"] * config["attention_head_dim"]
    if family == "flux":
        return {"depth": config["num_layers"], "depth_single_blocks": config["num_single_layers"], "hidden_size": width}
    return {"depth": width // 64}


def comfy_flux_to_diffusers(cfg: dict, output_prefix: str = "") -> dict:
    """comfy/utils.py ``flux_to_diffusers`` (v0.26.1), transcribed: diffusers key → BFL key, or (BFL key, (dim,
    start, size)) for a slice of a fused weight, or (BFL key, None, function) for a swapped one."""
    n_double, n_single, hidden = cfg["depth"], cfg["depth_single_blocks"], cfg["hidden_size"]
    key_map = {}
    for index in range(n_double):
        f, t = f"transformer_blocks.{index}", f"{output_prefix}double_blocks.{index}"
        for end in ("weight", "bias"):
            qkv = f"{t}.img_attn.qkv.{end}"
            key_map[f"{f}.attn.to_q.{end}"] = (qkv, (0, 0, hidden))
            key_map[f"{f}.attn.to_k.{end}"] = (qkv, (0, hidden, hidden))
            key_map[f"{f}.attn.to_v.{end}"] = (qkv, (0, hidden * 2, hidden))
            qkv = f"{t}.txt_attn.qkv.{end}"
            key_map[f"{f}.attn.add_q_proj.{end}"] = (qkv, (0, 0, hidden))
            key_map[f"{f}.attn.add_k_proj.{end}"] = (qkv, (0, hidden, hidden))
            key_map[f"{f}.attn.add_v_proj.{end}"] = (qkv, (0, hidden * 2, hidden))
        block_map = {"attn.to_out.0.weight": "img_attn.proj.weight", "attn.to_out.0.bias": "img_attn.proj.bias",
                     "norm1.linear.weight": "img_mod.lin.weight", "norm1.linear.bias": "img_mod.lin.bias",
                     "norm1_context.linear.weight": "txt_mod.lin.weight", "norm1_context.linear.bias": "txt_mod.lin.bias",
                     "attn.to_add_out.weight": "txt_attn.proj.weight", "attn.to_add_out.bias": "txt_attn.proj.bias",
                     "ff.net.0.proj.weight": "img_mlp.0.weight", "ff.net.0.proj.bias": "img_mlp.0.bias",
                     "ff.net.2.weight": "img_mlp.2.weight", "ff.net.2.bias": "img_mlp.2.bias",
                     "ff_context.net.0.proj.weight": "txt_mlp.0.weight", "ff_context.net.0.proj.bias": "txt_mlp.0.bias",
                     "ff_context.net.2.weight": "txt_mlp.2.weight", "ff_context.net.2.bias": "txt_mlp.2.bias",
                     "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
                     "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
                     "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
                     "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale"}
        key_map.update({f"{f}.{k}": f"{t}.{v}" for k, v in block_map.items()})
    for index in range(n_single):
        f, t = f"single_transformer_blocks.{index}", f"{output_prefix}single_blocks.{index}"
        for end in ("weight", "bias"):
            qkv = f"{t}.linear1.{end}"
            key_map[f"{f}.attn.to_q.{end}"] = (qkv, (0, 0, hidden))
            key_map[f"{f}.attn.to_k.{end}"] = (qkv, (0, hidden, hidden))
            key_map[f"{f}.attn.to_v.{end}"] = (qkv, (0, hidden * 2, hidden))
            key_map[f"{f}.proj_mlp.{end}"] = (qkv, (0, hidden * 3, hidden * 4))
        block_map = {"norm.linear.weight": "modulation.lin.weight", "norm.linear.bias": "modulation.lin.bias",
                     "proj_out.weight": "linear2.weight", "proj_out.bias": "linear2.bias",
                     "attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale"}
        key_map.update({f"{f}.{k}": f"{t}.{v}" for k, v in block_map.items()})
    basic = [("final_layer.linear.bias", "proj_out.bias"), ("final_layer.linear.weight", "proj_out.weight"),
             ("img_in.bias", "x_embedder.bias"), ("img_in.weight", "x_embedder.weight"),
             ("time_in.in_layer.bias", "time_text_embed.timestep_embedder.linear_1.bias"),
             ("time_in.in_layer.weight", "time_text_embed.timestep_embedder.linear_1.weight"),
             ("time_in.out_layer.bias", "time_text_embed.timestep_embedder.linear_2.bias"),
             ("time_in.out_layer.weight", "time_text_embed.timestep_embedder.linear_2.weight"),
             ("txt_in.bias", "context_embedder.bias"), ("txt_in.weight", "context_embedder.weight"),
             ("vector_in.in_layer.bias", "time_text_embed.text_embedder.linear_1.bias"),
             ("vector_in.in_layer.weight", "time_text_embed.text_embedder.linear_1.weight"),
             ("vector_in.out_layer.bias", "time_text_embed.text_embedder.linear_2.bias"),
             ("vector_in.out_layer.weight", "time_text_embed.text_embedder.linear_2.weight"),
             ("guidance_in.in_layer.bias", "time_text_embed.guidance_embedder.linear_1.bias"),
             ("guidance_in.in_layer.weight", "time_text_embed.guidance_embedder.linear_1.weight"),
             ("guidance_in.out_layer.bias", "time_text_embed.guidance_embedder.linear_2.bias"),
             ("guidance_in.out_layer.weight", "time_text_embed.guidance_embedder.linear_2.weight"),
             ("final_layer.adaLN_modulation.1.bias", "norm_out.linear.bias", flow_keys.swap_halves),
             ("final_layer.adaLN_modulation.1.weight", "norm_out.linear.weight", flow_keys.swap_halves)]
    for k in basic:
        key_map[k[1]] = (output_prefix + k[0], None, k[2]) if len(k) > 2 else output_prefix + k[0]
    return key_map


def comfy_mmdit_to_diffusers(cfg: dict, output_prefix: str = "") -> dict:
    """comfy/utils.py ``mmdit_to_diffusers`` (commit 2ba5cc8), transcribed (its MMDIT_MAP_BASIC / MMDIT_MAP_BLOCK;
    q/k/v as slices of ``depth·64`` rows; the last block's context AdaLN swapped)."""
    depth = cfg.get("depth", 0)
    num_blocks = cfg.get("num_blocks", depth)
    block = [("context_block.adaLN_modulation.1", "norm1_context.linear"), ("context_block.attn.proj", "attn.to_add_out"),
             ("context_block.mlp.fc1", "ff_context.net.0.proj"), ("context_block.mlp.fc2", "ff_context.net.2"),
             ("x_block.adaLN_modulation.1", "norm1.linear"), ("x_block.attn.proj", "attn.to_out.0"),
             ("x_block.mlp.fc1", "ff.net.0.proj"), ("x_block.mlp.fc2", "ff.net.2")]
    key_map = {}
    for i in range(num_blocks):
        f, t = f"transformer_blocks.{i}", f"{output_prefix}joint_blocks.{i}"
        offset = depth * 64
        for end in ("weight", "bias"):
            qkv = f"{t}.x_block.attn.qkv.{end}"
            key_map[f"{f}.attn.to_q.{end}"] = (qkv, (0, 0, offset))
            key_map[f"{f}.attn.to_k.{end}"] = (qkv, (0, offset, offset))
            key_map[f"{f}.attn.to_v.{end}"] = (qkv, (0, offset * 2, offset))
            qkv = f"{t}.context_block.attn.qkv.{end}"
            key_map[f"{f}.attn.add_q_proj.{end}"] = (qkv, (0, 0, offset))
            key_map[f"{f}.attn.add_k_proj.{end}"] = (qkv, (0, offset, offset))
            key_map[f"{f}.attn.add_v_proj.{end}"] = (qkv, (0, offset * 2, offset))
            for original, diffusers_name in block:
                key_map[f"{f}.{diffusers_name}.{end}"] = f"{t}.{original}.{end}"
    basic = [("context_embedder.bias", "context_embedder.bias"), ("context_embedder.weight", "context_embedder.weight"),
             ("t_embedder.mlp.0.bias", "time_text_embed.timestep_embedder.linear_1.bias"),
             ("t_embedder.mlp.0.weight", "time_text_embed.timestep_embedder.linear_1.weight"),
             ("t_embedder.mlp.2.bias", "time_text_embed.timestep_embedder.linear_2.bias"),
             ("t_embedder.mlp.2.weight", "time_text_embed.timestep_embedder.linear_2.weight"),
             ("x_embedder.proj.bias", "pos_embed.proj.bias"), ("x_embedder.proj.weight", "pos_embed.proj.weight"),
             ("y_embedder.mlp.0.bias", "time_text_embed.text_embedder.linear_1.bias"),
             ("y_embedder.mlp.0.weight", "time_text_embed.text_embedder.linear_1.weight"),
             ("y_embedder.mlp.2.bias", "time_text_embed.text_embedder.linear_2.bias"),
             ("y_embedder.mlp.2.weight", "time_text_embed.text_embedder.linear_2.weight"), ("pos_embed", "pos_embed.pos_embed"),
             ("final_layer.adaLN_modulation.1.bias", "norm_out.linear.bias", flow_keys.swap_halves),
             ("final_layer.adaLN_modulation.1.weight", "norm_out.linear.weight", flow_keys.swap_halves),
             ("final_layer.linear.bias", "proj_out.bias"), ("final_layer.linear.weight", "proj_out.weight"),
             (f"joint_blocks.{depth - 1}.context_block.adaLN_modulation.1.bias",
              f"transformer_blocks.{depth - 1}.norm1_context.linear.bias", flow_keys.swap_halves),
             (f"joint_blocks.{depth - 1}.context_block.adaLN_modulation.1.weight",
              f"transformer_blocks.{depth - 1}.norm1_context.linear.weight", flow_keys.swap_halves)]
    for k in basic:
        key_map[k[1]] = (output_prefix + k[0], None, k[2]) if len(k) > 2 else output_prefix + k[0]
    return key_map


def comfy_model(family: str, transformer) -> tuple[dict, dict]:
    """ComfyUI's model of the transformer, from the transcribed ``*_to_diffusers`` map alone: its weights
    (``diffusion_model.`` + original name → tensor, fused weights assembled from their slices, swapped ones
    swapped) and the map itself."""
    cfg = comfy_config(family, transformer.config)
    to_diffusers = (comfy_flux_to_diffusers if family == "flux" else comfy_mmdit_to_diffusers)(cfg, "diffusion_model.")
    state, pieces = transformer.state_dict(), {}
    for key, value in state.items():
        target = to_diffusers[key]                    # every diffusers weight has a place in ComfyUI's model
        if isinstance(target, str):
            pieces.setdefault(target, []).append((0, value))
        elif target[1] is None:
            pieces.setdefault(target[0], []).append((0, target[2](value)))
        else:
            pieces.setdefault(target[0], []).append((target[1][1], value))
    weights = {k: torch.cat([v for _, v in sorted(p, key=lambda x: x[0])]) for k, p in pieces.items()}
    return weights, to_diffusers


def comfy_key_map(model_keys, to_diffusers: dict) -> dict:
    """comfy/lora.py ``model_lora_keys_unet`` (commit 41444b5) for a Flux / SD3 model: the generic loop over its
    ``diffusion_model.*`` keys (``lora_unet_<path>``, the bare path) and the family branch over ``*_to_diffusers``
    (``transformer.<module>``, ``lora_transformer_<module>``)."""
    key_map = {}
    for k in model_keys:
        if k.endswith(".weight"):
            key_map["lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_")] = k
            key_map[k[:-len(".weight")]] = k
        else:
            key_map[k] = k
    for k, to in to_diffusers.items():
        if k.endswith(".weight"):
            key_map[f"transformer.{k[:-len('.weight')]}"] = to
            key_map[f"lora_transformer_{k[:-len('.weight')].replace('.', '_')}"] = to
    return key_map


def comfy_apply(lora: dict, key_map: dict, weights: dict) -> tuple[dict, set]:
    """comfy/lora.py ``load_lora`` (``.lora_up/.lora_down/.alpha`` and ``.lora_B/.lora_A``) and ``calculate_weight``
    ("lora": W += strength·(α / rank)·up·down, rank = down's rows; on the narrowed slice for an offset key, through
    the function for a swapped one), strength 1: the patched weights and the file keys it did not load."""
    out = {k: v.clone() for k, v in weights.items()}
    loaded = set()
    for x, target in key_map.items():
        for up_name, down_name in ((f"{x}.lora_up.weight", f"{x}.lora_down.weight"),
                                   (f"{x}.lora_B.weight", f"{x}.lora_A.weight")):
            if up_name not in lora:
                continue
            up, down = lora[up_name], lora[down_name]
            alpha = lora[f"{x}.alpha"].item() / down.shape[0] if f"{x}.alpha" in lora else 1.0
            loaded.update({up_name, down_name, f"{x}.alpha"})
            key, offset, function = (target, None, None) if isinstance(target, str) else (
                (target[0], target[1], target[2] if len(target) > 2 else None))
            weight = out[key] if offset is None else out[key].narrow(offset[0], offset[1], offset[2])
            diff = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
            weight += (function or (lambda a: a))(alpha * diff)
    return out, set(lora) - loaded


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_every_exported_module_lands_in_comfyui_with_the_fused_weights(flow, layout, tmp_path):
    """ComfyUI's key rules map 100% of an exported LoRA's modules onto the tiny model's weights with matching shapes,
    and its patch math gives the weights of the LoRA fused in diffusers' layout (the kohya file: sd-scripts'
    original names, ``lora_unet_double_blocks_0_img_attn_qkv`` / ``lora_unet_joint_blocks_0_x_block_attn_qkv``, q/k/v
    fused; the diffusers file: ``transformer.<module>.lora_A``, read by ComfyUI's family branch)."""
    from safetensors.torch import load_file

    from fewstep.models.lora_export import export_lora

    family, folder, lora = flow
    exported = load_file(export_lora(lora, layout, tmp_path / f"{layout}.safetensors"))
    base = load_model(folder).backbone
    weights, to_diffusers = comfy_model(family, base)
    key_map = comfy_key_map(weights, to_diffusers)
    names = {k.rsplit(".", 2)[0] for k in exported if k.endswith(("lora_down.weight", "lora_A.weight"))}
    assert names and all(n in key_map for n in names), sorted(n for n in names if n not in key_map)[:3]
    if layout == "kohya":
        assert all(n.startswith("lora_unet_") for n in names)
        for n in names:                       # whole original weights: [rows of up, columns of down]
            assert tuple(weights[key_map[n]].shape) == (exported[f"{n}.lora_up.weight"].shape[0],
                                                        exported[f"{n}.lora_down.weight"].shape[1]), n
        assert any("attn_qkv" in n for n in names) and (family == "sd3" or any("linear1" in n for n in names))
    patched, left = comfy_apply(exported, key_map, weights)
    assert not left, sorted(left)[:3]                             # no "lora key not loaded"
    merged, _ = comfy_model(family, apply_loras(load_model(folder), [(lora, 1.0)]).backbone)
    assert_same(patched, merged, 1e-5)
    assert max((merged[k] - weights[k]).abs().max().item() for k in weights) > 1e-2      # the LoRA does something


def test_exports_read_back_in_fewstep_peft_and_diffusers(flow, tmp_path):
    """``--lora`` reads every export (kohya with the original names, diffusers', peft's file and folder) onto the
    same transformer as the LoRA folder; diffusers' load_lora_weights of the diffusers file gives the folder's
    images; PeftModel.from_pretrained of the peft folder merges to the same transformer; the metadata says what it
    is, with sd-scripts' ss_base_model_version."""
    from diffusers import DiffusionPipeline
    from peft import PeftModel
    from safetensors import safe_open

    from fewstep.models.lora_export import export_lora

    family, folder, lora = flow
    reference = fused(folder, lora)
    for layout, name in (("kohya", "k.safetensors"), ("diffusers", "d.safetensors"), ("peft", "p.safetensors"),
                         ("peft", "peft")):
        out = export_lora(lora, layout, tmp_path / name)
        assert_same(fused(folder, out), reference)
    from safetensors.torch import load_file, save_file

    kohya, g = load_file(tmp_path / "k.safetensors"), torch.Generator().manual_seed(2)
    for name in {k.split(".")[0] for k in kohya}:          # as sd-scripts trains them: α ≠ rank, one shared down
        down, up = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"]
        mix = torch.eye(len(down)) + 0.3 * torch.randn(len(down), len(down), generator=g, dtype=torch.float64)
        kohya[f"{name}.lora_down.weight"] = (mix @ down.double()).float()
        kohya[f"{name}.lora_up.weight"] = (2 * up.double() @ torch.linalg.inv(mix)).float()
        kohya[f"{name}.alpha"] = kohya[f"{name}.alpha"] / 2
    save_file(kohya, str(tmp_path / "sd-scripts.safetensors"))
    assert_same(fused(folder, tmp_path / "sd-scripts.safetensors"), reference, 1e-5)
    save_file(load_file(lora / LORA_FILE), str(tmp_path / "bare.safetensors"))        # no record of its base
    with pytest.raises(FewstepError, match="--base DIR"):
        export_lora(tmp_path / "bare.safetensors", "kohya", tmp_path / "k2.safetensors")
    assert_same(load_file(export_lora(tmp_path / "bare.safetensors", "kohya", tmp_path / "k2.safetensors",
                                      base=folder)), load_file(tmp_path / "k.safetensors"), 0)
    with safe_open(str(tmp_path / "k.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["fewstep_kind"] == "lcm-lora" and meta["fewstep_format"] == "kohya"
    assert meta["ss_base_model_version"] == ("flux1" if family == "flux" else "medium")
    base = load_model(folder).backbone
    merged = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft")).merge_and_unload()
    assert_same(merged.state_dict(), reference)

    def images(lora_file):
        pipe = DiffusionPipeline.from_pretrained(folder)
        pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
        kw = {"true_cfg_scale": 1.0} if family == "flux" else {"guidance_scale": 1.0}
        return pipe(PROMPTS, num_inference_steps=2, height=32, width=32, output_type="pt", max_sequence_length=16,
                    generator=torch.Generator().manual_seed(3), **kw).images
    assert torch.allclose(images(tmp_path / "d.safetensors"), images(lora / LORA_FILE), atol=1e-5)


def test_diffusers_reads_the_flux_kohya_layout_at_flux1_sizes():
    """diffusers' ``_convert_kohya_flux_lora_to_diffusers`` (loaders/lora_conversion_utils.py line 380) reads the
    exported FLUX names and splits the fused q/k/v (and linear1's q/k/v + zero mlp block) back exactly. It assumes
    FLUX.1's sizes (linear1 as 3·3072 + 12288 rows, line 552), so the tiny FLUX is read by fewstep's own
    kohya_to_peft instead (test above); here a LoRA on a FLUX.1-sized block pair (shapes only: rank 2)."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
    from diffusers.utils import logging as diffusers_logging

    from fewstep.nets.lora import BACKBONE_LORA_TARGETS

    config = {"num_layers": 1, "num_single_layers": 1, "num_attention_heads": 24, "attention_head_dim": 128,
              "in_channels": 64, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
              "axes_dims_rope": (16, 56, 56)}
    shapes = flow_keys.meta_shapes(flow_keys.FLUX, config)
    targets = BACKBONE_LORA_TARGETS[flow_keys.FLUX]
    modules = [k[:-len(".weight")] for k in shapes if k.endswith(".weight") and k[:-len(".weight")].endswith(targets)]
    g = torch.Generator().manual_seed(0)
    lora = {}
    for m in modules:
        out_dim, in_dim = shapes[m + ".weight"]
        lora[f"transformer.{m}.lora_A.weight"] = torch.randn(2, in_dim, generator=g)
        lora[f"transformer.{m}.lora_B.weight"] = torch.randn(out_dim, 2, generator=g)
    kohya = flow_keys.peft_to_kohya(lora, flow_keys.FLUX, config, shapes=shapes)
    assert "lora_unet_single_blocks_0_linear1.lora_down.weight" in kohya
    diffusers_logging.set_verbosity_error()
    back = _convert_kohya_flux_lora_to_diffusers(dict(kohya))
    zeros = {k for k in back if ".proj_mlp." in k}                  # linear1's padding block, read as zeros
    assert all(not back[k].any() for k in zeros)
    assert_same({k: v for k, v in back.items() if k not in zeros}, lora, 0)


def test_kohya_files_of_another_family_or_layout_are_refused(flow, tmp_path):
    """A kohya FLUX LoRA on SD3 (and the reverse) is one clear line, and so is an unknown original module."""
    from safetensors.torch import save_file

    family, folder, lora = flow
    other = "lora_unet_joint_blocks_0_x_block_attn_qkv" if family == "flux" else "lora_unet_double_blocks_0_img_attn_qkv"
    bad = tmp_path / "other.safetensors"
    save_file({f"{other}.lora_down.weight": torch.zeros(2, 32), f"{other}.lora_up.weight": torch.zeros(96, 2),
               f"{other}.alpha": torch.tensor(2.0)}, str(bad))
    with pytest.raises(FewstepError, match="does not fit.*not one of this"):
        load_with_loras(folder, [str(bad)])


def test_single_file_transformer_round_trips_through_fewstep_and_diffusers(flow, tmp_path, capsys):
    """``fewstep export --single-file`` writes the transformer alone in its original layout (BFL's names, no prefix;
    SD3's under ``model.diffusion_model.``): diffusers' converter (SD3 at the tiny size; FLUX's in the next test)
    and ComfyUI's map read every weight back; ``--model FILE`` without ``--config`` is one line that says what to
    pass, with it the same images as the folder."""
    from diffusers import SD3Transformer2DModel
    from safetensors import safe_open
    from safetensors.torch import load_file

    family, folder, _ = flow
    out = tmp_path / f"{family}.safetensors"
    rc, _, err = run_cli(capsys, "export", "--single-file", "--model", str(folder), "--out", str(out))
    assert rc == 0, err
    state = load_file(out)
    base = load_model(folder).backbone
    weights, _ = comfy_model(family, base)                 # ComfyUI's model of it: the same names, the same values
    prefix = "" if family == "flux" else "model.diffusion_model."
    assert_same({prefix + k[len("diffusion_model."):]: v for k, v in weights.items()}, state, 0)
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["fewstep_format"] == f"{family}-transformer"
    if family == "sd3":
        theirs = SD3Transformer2DModel.from_single_file(str(out), config=str(folder), subfolder="transformer",
                                                        local_files_only=True)
        assert_same(theirs.state_dict(), base.state_dict(), 0)
    rc, _, err = run_cli(capsys, "sample", "--model", str(out), "--prompt", "x", "--out", str(tmp_path / "x.png"))
    assert rc != 0 and "--config" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    ours = generate_latent(load_model(out, config=folder), PROMPTS, steps=2, guidance_scale=2.0, seed=4)
    assert torch.equal(ours, generate_latent(load_model(folder), PROMPTS, steps=2, guidance_scale=2.0, seed=4))
    rc, _, err = run_cli(capsys, "sample", "--model", str(out), "--config", str(folder), "--prompt", "red apple",
                         "--steps", "2", "--out", str(tmp_path / "x.png"))
    assert rc == 0 and (tmp_path / "x.png").is_file(), err
    if family == "flux":                  # an LCD student's guidance embedding, read with its teacher's folder
        from safetensors.torch import save_file

        from fewstep.models.single_file_export import flow_original_state
        from fewstep.nets.flow_transformers import flow_student

        student = flow_student(base)
        with torch.no_grad():
            student.time_text_embed.guidance_embedder.linear_2.weight.normal_()
        save_file(flow_original_state(student), str(tmp_path / "student.safetensors"))
        read = load_model(tmp_path / "student.safetensors", config=folder)
        assert read.takes_guidance and read.backbone.config.guidance_embeds
        assert_same(read.backbone.state_dict(), student.state_dict(), 0)
    other = "sd3" if family == "flux" else "flux"
    wrong = save_tiny_flow(tmp_path / "other", other, **SIZES[other])
    with pytest.raises(FewstepError, match="config"):
        load_model(out, config=wrong)


def test_flux_single_file_is_diffusers_layout_at_flux1_sizes():
    """diffusers' ``convert_flux_transformer_checkpoint_to_diffusers`` (single_file_utils.py line 2294) reads
    fewstep's FLUX names back onto every weight of a FLUX.1-dev-sized transformer (one block of each kind), values
    included: the weights' output rows are FLUX.1's, their inputs cut to 2 (the converter only splits and swaps
    rows). It fixes inner_dim at 3072, which is why fewstep converts the tiny FLUX itself before from_single_file."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    config = {"num_layers": 1, "num_single_layers": 1, "num_attention_heads": 24, "attention_head_dim": 128,
              "in_channels": 64, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
              "axes_dims_rope": (16, 56, 56)}
    shapes = flow_keys.meta_shapes(flow_keys.FLUX, config)
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn((s[0], 2) if len(s) == 2 else s, generator=g) for k, s in shapes.items()}
    original = flow_keys.to_original(state, flow_keys.FLUX, config)
    assert_same(convert_flux_transformer_checkpoint_to_diffusers(dict(original)), state, 0)
    assert_same(flow_keys.from_original(original, flow_keys.FLUX, config, shapes), state, 0)


def test_single_file_with_vae_and_t5_reads_them_from_the_file(tmp_path):
    """An SD3 file that also holds the VAE (``first_stage_model.*``) and T5 (``text_encoders.t5xxl.transformer.*``),
    as sd3_medium_incl_clips_t5xxlfp16 does, gives those parts from the file (diffusers' pipeline from_single_file
    reads them) and the rest from --config."""
    from safetensors.torch import save_file

    from fewstep.models.ldm_keys import vae_to_original
    from fewstep.models.single_file_export import flow_original_state

    folder = save_tiny_flow(tmp_path / "sd3", "sd3", shift=3.0, **SIZES["sd3"])
    model = load_model(folder)
    with torch.no_grad():                                   # another model's parts: every weight moved
        for part in (model.backbone, model.parts["vae"], model.parts["text_encoder_3"]):
            for p in part.parameters():
                p.add_(0.01)
    vae = model.parts["vae"]
    state = {**flow_original_state(model.backbone), **vae_to_original(vae.state_dict(), vae.config),
             **{f"text_encoders.t5xxl.transformer.{k}": v for k, v in model.parts["text_encoder_3"].state_dict().items()}}
    save_file({k: v.clone().contiguous() for k, v in state.items()}, str(tmp_path / "incl.safetensors"))
    read = load_model(tmp_path / "incl.safetensors", config=folder)
    for part in ("vae", "text_encoder_3"):
        assert_same(read.parts[part].state_dict(), model.parts[part].state_dict(), 0)
    assert_same(read.backbone.state_dict(), model.backbone.state_dict(), 0)
    assert_same(read.parts["text_encoder"].state_dict(), load_model(folder).parts["text_encoder"].state_dict(), 0)


def test_flux_fill_and_unknown_transformers_are_refused(tmp_path):
    from safetensors.torch import save_file

    fill = tmp_path / "fill.safetensors"
    save_file({"double_blocks.0.img_attn.norm.key_norm.scale": torch.zeros(4), "guidance_in.in_layer.bias": torch.zeros(4),
               "img_in.weight": torch.zeros(8, 384)}, str(fill))
    with pytest.raises(FewstepError, match="flux-fill.*FLUX Fill"):
        load_model(fill, config=tmp_path)


def test_style_lora_merge_and_set_on_flow_bases(flow, tmp_path, capsys):
    """A style LoRA trains on a FLUX / SD3 base (its velocity loss, adapters under "transformer."); ``lora merge``
    fuses it with an LCM-LoRA into a pipeline diffusers runs with FlowMatchLCMScheduler, ``--no-fuse`` keeps them as
    a set whose README loads them in the family's pipeline, and both give the same images; ``--single-file`` writes
    the merge's transformer, read back (an LCM still) with the base as its config."""
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file

    from fewstep.methods.style_lora import train_style_lora
    from fewstep.training import TrainConfig

    family, folder, lora = flow
    config = TrainConfig(out_dir=str(tmp_path / "work"), max_steps=2, batch_size=4, lr=1e-2, progress=False,
                         checkpoint_every=2)
    style = train_style_lora(load_model(folder), tiny_data(8), tmp_path / "style", config, rank=2)
    assert json.loads((style / "fewstep.json").read_text())["kind"] == "style"
    assert all(k.startswith("transformer.") for k in load_file(style / LORA_FILE))
    merge = ["lora", "merge", "--base", str(folder), "--lora", f"{style}:0.8", "--lora", f"{lora}:1"]
    for extra in (["--out", str(tmp_path / "merged")], ["--no-fuse", "--out", str(tmp_path / "set")],
                  ["--single-file", "--out", str(tmp_path / "merged.safetensors")]):
        rc, _, err = run_cli(capsys, *merge, *extra)
        assert rc == 0, err
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "merged")
    assert type(pipe.scheduler).__name__ == "FlowMatchLCMScheduler"
    readme = (tmp_path / "set" / "README.md").read_text()
    assert type(pipe).__name__ in readme and "FlowMatchLCMScheduler" in readme
    merged = load_model(tmp_path / "merged")
    single = load_model(tmp_path / "merged.safetensors", config=folder)
    assert merged.config.kind == single.config.kind == "consistency"
    images = [generate_latent(m, PROMPTS, steps=2, seed=5) for m in
              (merged, load_with_loras(folder, [str(tmp_path / "set")]), single)]
    assert torch.allclose(images[0], images[1], atol=1e-4) and torch.allclose(images[0], images[2], atol=1e-4)
