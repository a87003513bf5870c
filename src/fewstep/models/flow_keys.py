"""diffusers' names ↔ the original names of the FLUX.1 and SD3 transformers: Black Forest Labs' ``flux`` layout
(``double_blocks.N.img_attn.qkv``, ``single_blocks.N.linear1``: flux1-dev.safetensors, ComfyUI's Flux model, kohya
sd-scripts' FLUX LoRAs) and Stability's MMDiT layout (``joint_blocks.N.x_block.attn.qkv``: sd3_medium.safetensors,
ComfyUI's SD3 model, sd-scripts' SD3 LoRAs). One map per family (:func:`blocks`), used by every writer and reader
of these names: single-file transformers (:mod:`fewstep.models.single_file_export`, :mod:`fewstep.models.single_file`)
and kohya LoRAs (:mod:`fewstep.models.lora_export` writes them, :func:`kohya_to_peft` reads them back).

The map is diffusers' own readers, inverted: ``convert_flux_transformer_checkpoint_to_diffusers`` and
``convert_sd3_transformer_checkpoint_to_diffusers`` (diffusers 0.42.1, loaders/single_file_utils.py lines 2294–2488
and 2018–2209), checked against ComfyUI's ``comfy/utils.py`` ``flux_to_diffusers`` / ``mmdit_to_diffusers`` in
tests/test_flow_files.py. What differs between the layouts:

- the original fuses q, k and v into one ``qkv`` linear (a FLUX single block's ``linear1`` also holds the MLP's input
  projection after them): diffusers' separate ``to_q``/``to_k``/``to_v`` (``add_*_proj`` for the text stream) are
  its row blocks, in that order;
- the final (and SD3's last context) AdaLayerNorm projection is (shift, scale) in the original, (scale, shift) in
  diffusers (``swap_scale_shift``);
- RMSNorm weights are ``….scale`` in FLUX (``query_norm``/``key_norm``), ``ln_q``/``ln_k`` in SD3.5.

A LoRA on fused modules: a kohya module on ``qkv`` is one low-rank factor pair for the stacked rows. diffusers'
separate adapters (A_i, B_i) of rank r become down = [A_q; A_k; A_v] (rank 3r) and a block-diagonal up, exactly
ΔW = blockdiag(B)·[A] — sd-scripts' own ``networks/convert_flux_lora.py`` ``convert_to_sd_scripts_cat`` layout, which
diffusers' ``_convert_kohya_flux_lora_to_diffusers`` recognises as "sparse" and splits back exactly; a part the LoRA
does not adapt (FLUX's ``proj_mlp`` in ``linear1``) gets a zero block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import FewstepError

FLUX, SD3 = "FluxTransformer2DModel", "SD3Transformer2DModel"
KOHYA_PREFIX = "lora_unet_"                  # sd-scripts' LORA_PREFIX_FLUX / LORA_PREFIX_SD3 ("make ComfyUI compatible")


@dataclass(frozen=True)
class Block:
    """One module of the original layout: ``parts``, diffusers' modules whose outputs it stacks (in order);
    ``swap``: its output's two halves are (shift, scale) where diffusers' are (scale, shift)."""

    original: str
    parts: tuple[str, ...]
    swap: bool = False


def _one(original: str, part: str, swap: bool = False) -> Block:
    return Block(original, (part,), swap)


def blocks(family: str, config) -> tuple[list[Block], dict[str, str]]:
    """The map of a transformer of class ``family`` with ``config`` (its config.json): its modules (weight and bias)
    and its renamed parameters (diffusers name → original name)."""
    if family == FLUX:
        return _flux_blocks(config)
    if family == SD3:
        return _sd3_blocks(config)
    raise FewstepError(f"{family} has no original single-file layout in fewstep (FLUX and SD3 transformers do)")


def _flux_blocks(config) -> tuple[list[Block], dict[str, str]]:
    """diffusers' ``convert_flux_transformer_checkpoint_to_diffusers``, inverted (guidance_in where the model has it)."""
    t = "time_text_embed."
    out = [_one("time_in.in_layer", t + "timestep_embedder.linear_1"),
           _one("time_in.out_layer", t + "timestep_embedder.linear_2"),
           _one("vector_in.in_layer", t + "text_embedder.linear_1"),
           _one("vector_in.out_layer", t + "text_embedder.linear_2"),
           _one("guidance_in.in_layer", t + "guidance_embedder.linear_1"),
           _one("guidance_in.out_layer", t + "guidance_embedder.linear_2"),
           _one("txt_in", "context_embedder"), _one("img_in", "x_embedder"),
           _one("final_layer.linear", "proj_out"), _one("final_layer.adaLN_modulation.1", "norm_out.linear", True)]
    renames = {}
    for i in range(config["num_layers"]):
        d, o = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        out += [_one(o + "img_mod.lin", d + "norm1.linear"), _one(o + "txt_mod.lin", d + "norm1_context.linear"),
                Block(o + "img_attn.qkv", (d + "attn.to_q", d + "attn.to_k", d + "attn.to_v")),
                Block(o + "txt_attn.qkv", (d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj")),
                _one(o + "img_attn.proj", d + "attn.to_out.0"), _one(o + "txt_attn.proj", d + "attn.to_add_out"),
                _one(o + "img_mlp.0", d + "ff.net.0.proj"), _one(o + "img_mlp.2", d + "ff.net.2"),
                _one(o + "txt_mlp.0", d + "ff_context.net.0.proj"), _one(o + "txt_mlp.2", d + "ff_context.net.2")]
        renames.update({d + "attn.norm_q.weight": o + "img_attn.norm.query_norm.scale",
                        d + "attn.norm_k.weight": o + "img_attn.norm.key_norm.scale",
                        d + "attn.norm_added_q.weight": o + "txt_attn.norm.query_norm.scale",
                        d + "attn.norm_added_k.weight": o + "txt_attn.norm.key_norm.scale"})
    for i in range(config["num_single_layers"]):
        d, o = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        out += [_one(o + "modulation.lin", d + "norm.linear"),
                Block(o + "linear1", (d + "attn.to_q", d + "attn.to_k", d + "attn.to_v", d + "proj_mlp")),
                _one(o + "linear2", d + "proj_out")]
        renames.update({d + "attn.norm_q.weight": o + "norm.query_norm.scale",
                        d + "attn.norm_k.weight": o + "norm.key_norm.scale"})
    return out, renames


def _sd3_blocks(config) -> tuple[list[Block], dict[str, str]]:
    """diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers``, inverted: the last joint block's context
    stream is pre-only (no proj, no MLP) and its AdaLayerNorm is (shift, scale); SD3.5's qk norms and dual
    attention (``attn2`` in ``dual_attention_layers``) where the config has them."""
    t, last = "time_text_embed.", config["num_layers"] - 1
    out = [_one("x_embedder.proj", "pos_embed.proj"),
           _one("t_embedder.mlp.0", t + "timestep_embedder.linear_1"),
           _one("t_embedder.mlp.2", t + "timestep_embedder.linear_2"),
           _one("y_embedder.mlp.0", t + "text_embedder.linear_1"), _one("y_embedder.mlp.2", t + "text_embedder.linear_2"),
           _one("context_embedder", "context_embedder"), _one("final_layer.linear", "proj_out"),
           _one("final_layer.adaLN_modulation.1", "norm_out.linear", True)]
    renames = {"pos_embed.pos_embed": "pos_embed"}
    for i in range(config["num_layers"]):
        d, x, c = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
        out += [Block(x + "attn.qkv", (d + "attn.to_q", d + "attn.to_k", d + "attn.to_v")),
                Block(c + "attn.qkv", (d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj")),
                _one(x + "attn.proj", d + "attn.to_out.0"), _one(c + "attn.proj", d + "attn.to_add_out"),
                _one(x + "adaLN_modulation.1", d + "norm1.linear"),
                _one(c + "adaLN_modulation.1", d + "norm1_context.linear", i == last),
                _one(x + "mlp.fc1", d + "ff.net.0.proj"), _one(x + "mlp.fc2", d + "ff.net.2"),
                _one(c + "mlp.fc1", d + "ff_context.net.0.proj"), _one(c + "mlp.fc2", d + "ff_context.net.2"),
                Block(x + "attn2.qkv", (d + "attn2.to_q", d + "attn2.to_k", d + "attn2.to_v")),
                _one(x + "attn2.proj", d + "attn2.to_out.0")]
        renames.update({d + "attn.norm_q.weight": x + "attn.ln_q.weight", d + "attn.norm_k.weight": x + "attn.ln_k.weight",
                        d + "attn.norm_added_q.weight": c + "attn.ln_q.weight",
                        d + "attn.norm_added_k.weight": c + "attn.ln_k.weight",
                        d + "attn2.norm_q.weight": x + "attn2.ln_q.weight",
                        d + "attn2.norm_k.weight": x + "attn2.ln_k.weight"})
    return out, renames


def swap_halves(t: Tensor) -> Tensor:
    """(a, b) → (b, a) along the output dimension: diffusers' ``swap_scale_shift`` (its own inverse)."""
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


# --- weights ---------------------------------------------------------------------------------------------
def to_original(state: dict[str, Tensor], family: str, config) -> dict[str, Tensor]:
    """A diffusers FLUX / SD3 transformer state dict under the original names (no prefix): fused modules
    concatenated along the output dimension, swapped halves swapped. A weight the map does not place is an error."""
    modules, renames = blocks(family, config)
    out, used = {}, set()
    for block in modules:
        for end in ("weight", "bias"):
            keys = [f"{p}.{end}" for p in block.parts]
            have = [k in state for k in keys]
            if not any(have):
                continue
            if not all(have):
                raise FewstepError(f"the transformer has {keys[have.index(True)]} but not {keys[have.index(False)]}, "
                                   f"which the original layout fuses with it into {block.original}.{end}")
            value = torch.cat([state[k] for k in keys], dim=0)
            out[f"{block.original}.{end}"] = swap_halves(value) if block.swap else value
            used.update(keys)
    for key, original in renames.items():
        if key in state:
            out[original] = state[key]
            used.add(key)
    left = [k for k in state if k not in used]
    if left:
        raise FewstepError(f"the {family} weight {left[0]} has no place in the original layout")
    return out


def from_original(state: dict[str, Tensor], family: str, config, shapes: dict[str, torch.Size]) -> dict[str, Tensor]:
    """The inverse of :func:`to_original` (no prefix), each fused module split into the sizes its parts have in
    ``shapes`` (the diffusers model's parameter shapes, e.g. from its config on the meta device)."""
    modules, renames = blocks(family, config)
    out, used = {}, set()
    for block in modules:
        for end in ("weight", "bias"):
            key = f"{block.original}.{end}"
            if key not in state:
                continue
            value = swap_halves(state[key]) if block.swap else state[key]
            sizes = [shapes[f"{p}.{end}"][0] if f"{p}.{end}" in shapes else None for p in block.parts]
            if None in sizes or sum(sizes) != value.shape[0]:
                raise FewstepError(f"the original weight {key} ({tuple(value.shape)}) does not fit the transformer "
                                   f"of this config ({', '.join(block.parts)})")
            out.update({f"{p}.{end}": v for p, v in zip(block.parts, torch.split(value, sizes, dim=0))})
            used.add(key)
    for key, original in renames.items():
        if original in state:
            out[key] = state[original]
            used.add(original)
    left = [k for k in state if k not in used]
    if left:
        raise FewstepError(f"the original weight {left[0]} is not one of a {family}'s of this config")
    return out


def meta_shapes(family: str, config) -> dict[str, torch.Size]:
    """The parameter shapes of the diffusers transformer ``config`` describes, built on the meta device (no memory)."""
    import diffusers
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = getattr(diffusers, family).from_config(dict(config))
    return {k: v.shape for k, v in model.state_dict().items()}


# --- kohya LoRAs -----------------------------------------------------------------------------------------
def kohya_name(original: str) -> str:
    """sd-scripts' name of an original module: ``lora_unet_`` + its path with ``_`` for ``.`` (what ComfyUI's
    ``model_lora_keys_unet`` maps back onto ``diffusion_model.<path>.weight``)."""
    return KOHYA_PREFIX + original.replace(".", "_")


def peft_to_kohya(state: dict[str, Tensor], family: str, config, prefix: str = "transformer.",
                  alpha: float | None = None, shapes: dict[str, torch.Size] | None = None) -> dict[str, Tensor]:
    """A transformer LoRA in peft's names (``<prefix><module>.lora_A.weight`` / ``lora_B.weight``, scale α/r with
    α = ``alpha`` or each module's rank) as sd-scripts' original-named kohya modules
    (``lora_unet_<original>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``, ΔW = α/rank · up·down). A fused
    module gets the stacked downs and the block-diagonal up (module docstring); its α keeps the parts' common
    scale (rank·scale), or, were their scales to differ, each scale is folded into its up and α is the rank. A
    part the LoRA leaves out gets a zero block of the others' rank (its output size from ``shapes``, default the
    model ``config`` describes). A module the map does not place is an error."""
    adapters = {}
    for key, value in state.items():
        module, _, part = key[len(prefix):].rpartition(".lora_")
        adapters.setdefault(module, {})[part] = value
    modules, _ = blocks(family, config)
    out, used = {}, set()
    for block in modules:
        present = [p for p in block.parts if p in adapters]
        if not present:
            continue
        used.update(present)
        downs = {p: adapters[p]["A.weight"] for p in present}
        ups = {p: adapters[p]["B.weight"] for p in present}
        scales = {p: (alpha if alpha is not None else downs[p].shape[0]) / downs[p].shape[0] for p in present}
        common = len(set(scales.values())) == 1
        if not common:
            ups = {p: ups[p] * scales[p] for p in present}
        if len(present) < len(block.parts):
            rank = {downs[p].shape[0] for p in present}
            if len(rank) != 1:
                raise FewstepError(f"the LoRA adapts {', '.join(present)} with different ranks and not the rest of "
                                   f"{block.original}; kohya's fused module cannot hold that")
            shapes = shapes or meta_shapes(family, config)
            ref = next(iter(downs.values()))
            for p in block.parts:
                if p not in present:
                    downs[p] = ref.new_zeros(ref.shape)
                    ups[p] = ref.new_zeros(shapes[p + ".weight"][0], ref.shape[0])
        down = torch.cat([downs[p] for p in block.parts], dim=0)
        up = torch.block_diag(*[ups[p] for p in block.parts]) if len(block.parts) > 1 else ups[block.parts[0]]
        name = kohya_name(block.original)
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = (swap_halves(up) if block.swap else up).contiguous()
        scale = next(iter(scales.values())) if common else 1.0
        out[f"{name}.alpha"] = torch.tensor(float(down.shape[0] * scale))
    left = sorted(set(adapters) - used)
    if left:
        raise FewstepError(f"the LoRA adapts {left[0]}, which is no module of this {family} (made for another base "
                           f"model? give it with --base)")
    return out


def kohya_to_peft(state: dict[str, Tensor], family: str, config, shapes: dict[str, torch.Size],
                  prefix: str = "transformer.") -> dict[str, Tensor]:
    """sd-scripts' original-named kohya LoRA of a FLUX / SD3 transformer (fewstep's export or sd-scripts' own) as
    peft's names under ``prefix`` with α/rank folded into lora_B (diffusers reads such keys at scale 1). A fused
    module's up is split into its parts' rows (sizes from ``shapes``); where it is block-diagonal in rank chunks
    (fewstep's and sd-scripts' converted files) each part gets its own chunk of down, else all parts share the
    whole down (ΔW is the same either way: diffusers' ``_convert_to_ai_toolkit_cat``); a part whose chunk is all
    zeros (a padding block) is dropped. A module name this transformer lacks is an error (diffusers' loader would
    drop it without a word); text-encoder modules (``lora_te…``) are refused: fewstep applies transformer LoRAs."""
    modules, _ = blocks(family, config)
    by_name = {kohya_name(b.original): b for b in modules}
    names = {k.split(".", 1)[0] for k in state}
    text = sorted(n for n in names if n.startswith("lora_te"))
    if text:
        raise FewstepError(f"the LoRA also adapts the text encoders ({text[0]}…); fewstep applies LoRAs of the "
                           f"transformer only")
    unknown = sorted(n for n in names if n not in by_name)
    if unknown:
        raise FewstepError(f"its module {unknown[0]} is not one of this {family}'s")
    out = {}
    for name in sorted(names):
        block = by_name[name]
        down, up = state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"]
        rank = down.shape[0]
        alpha = state.get(f"{name}.alpha")
        up = up * ((float(alpha) if alpha is not None else rank) / rank)
        if block.swap:
            up = swap_halves(up)
        sizes = [shapes[f"{p}.weight"][0] for p in block.parts]
        if sum(sizes) != up.shape[0]:
            raise FewstepError(f"its module {name} has {up.shape[0]} outputs, the transformer's {sum(sizes)}")
        rows = torch.split(up, sizes, dim=0)
        n = len(block.parts)
        chunk = rank // n
        sparse = n > 1 and rank % n == 0 and all(
            not bool(rows[j][:, k * chunk:(k + 1) * chunk].any()) for j in range(n) for k in range(n) if j != k)
        for j, part in enumerate(block.parts):
            a = down[j * chunk:(j + 1) * chunk] if sparse else down
            b = rows[j][:, j * chunk:(j + 1) * chunk] if sparse else rows[j]
            if n > 1 and not bool(b.any()):
                continue                                  # a zero block: ΔW of this part is 0
            out[f"{prefix}{part}.lora_A.weight"] = a.contiguous()
            out[f"{prefix}{part}.lora_B.weight"] = b.contiguous()
    return out


def is_kohya_original(keys) -> bool:
    """Whether a LoRA's keys are sd-scripts' original-named FLUX / SD3 modules."""
    return any(k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_", "lora_unet_joint_blocks_"))
               for k in keys)
