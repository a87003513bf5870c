"""Full size for the flow-matching families (issue 28 item 4): what LCD and LCM-LoRA of FLUX.1-dev and of SD3.5-medium
need per process, unsharded and under FSDP, and what this machine says to each — from parameter counts of the
published architectures built on the meta device (no weights exist here: a FLUX.1 transformer is 48 GB in fp32, more
than this machine's memory), never from a run. Activations come on top (they are what gradient checkpointing cuts).

    python bench/flow_memory.py   # → bench/results/flow_memory.json, rendered into BENCHMARKS.md's "Full size"

The configs are the published ``transformer/config.json`` of black-forest-labs/FLUX.1-dev and
stabilityai/stable-diffusion-3.5-medium, and their text encoders' (CLIP ViT-L/14, OpenCLIP ViT-bigG/14, T5 v1.1 XXL).
Each run as ``fewstep distill`` would hold it (fewstep.training.memory.per_process_bytes): LCD trains a full copy of
the transformer (fp32 weights, gradients, Adam moments, the weight EMA, the consistency target) beside the frozen
teacher in bf16 (``--teacher-dtype bf16``), both sharded under FSDP; LCM-LoRA trains rank-64 adapters on the frozen
bf16 transformer (sharded with it); the text encoders and VAE stay whole on every process in bf16.
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "flow_memory.json"

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384, qk_norm="rms_norm",
                   dual_attention_layers=tuple(range(13)))
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, vocab_size=49408,
              max_position_embeddings=77, projection_dim=768)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, vocab_size=49408,
              max_position_embeddings=77, projection_dim=1280)
T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, vocab_size=32128,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
VAE_16 = 83_819_683          # FLUX.1's / SD3's 16-channel AutoencoderKL (diffusers' own count)
PROCESSES = (1, 2, 4, 8, 16)
RANK = 64


def counts(family: str) -> dict:
    """Parameter counts of the family's parts (meta device), the largest FSDP unit (one block) and LoRA's size."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    from peft import LoraConfig
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from fewstep.nets.lora import lora_targets

    with init_empty_weights():
        if family == "flux":
            transformer = FluxTransformer2DModel(**FLUX_DEV)
            encoders = [CLIPTextModel(CLIPTextConfig(**CLIP_L)), T5EncoderModel(T5Config(**T5_XXL))]
        else:
            transformer = SD3Transformer2DModel(**SD35_MEDIUM)
            encoders = [CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)),
                        CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)), T5EncoderModel(T5Config(**T5_XXL))]
        blocks = [b for name in ("transformer_blocks", "single_transformer_blocks")
                  for b in getattr(transformer, name, [])]
        unit = max(sum(p.numel() for p in b.parameters()) for b in blocks)
        total = sum(p.numel() for p in transformer.parameters())
        transformer.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=list(lora_targets(transformer))))
        lora = sum(p.numel() for n, p in transformer.named_parameters() if "lora_" in n)
    return {"transformer": total, "unit": unit, "lora": lora, "text_encoders": sum(
        sum(p.numel() for p in e.parameters()) for e in encoders), "vae": VAE_16}


def rows(family: str, c: dict) -> list[dict]:
    from fewstep.training.memory import per_process_bytes

    whole = 2 * (c["text_encoders"] + c["vae"])            # bf16, on every process
    runs = {"lcd, bf16 teacher, weight EMA": dict(trained=c["transformer"], frozen=c["transformer"], ema=True),
            "lcd, bf16 teacher, --ema 0": dict(trained=c["transformer"], frozen=c["transformer"], ema=False),
            f"lcm-lora rank {RANK}, bf16 base": dict(trained=c["lora"], frozen=c["transformer"], ema=False)}
    out = []
    for name, kw in runs.items():
        per = {n: per_process_bytes(kw["trained"], n, ema=kw["ema"], frozen=kw["frozen"], frozen_dtype="bf16",
                                    unit=c["unit"]) + whole for n in PROCESSES}
        out.append({"family": family, "run": name, "bytes": per, "refusal": refusal(family, name, kw, whole, c)})
    return out


def refusal(family: str, name: str, kw: dict, whole: int, c: dict) -> str:
    """What fewstep's memory check says to this run on this machine, unsharded (its one line), or "" if it fits."""
    from fewstep.errors import FewstepError
    from fewstep.training.memory import Footprint, check_fits, footprint

    fp = footprint(kw["trained"], ema=kw["ema"], frozen=kw["frozen"], frozen_dtype="bf16", unit=c["unit"])
    fp = Footprint(sharded=fp.sharded, whole=fp.whole + whole, in_flight=fp.in_flight)
    try:
        check_fits(fp, f"{name} of a {c['transformer'] / 1e9:.1f}B-parameter {family} transformer")
    except FewstepError as e:
        return str(e)
    return ""


def main() -> None:
    import torch

    from fewstep.training.memory import available_bytes

    torch.set_num_threads(1)
    families = {f: counts(f) for f in ("flux", "sd3.5-medium")}
    result = {"command": "python bench/flow_memory.py", "date": datetime.date.today().isoformat(),
              "available_bytes": available_bytes(), "processes": list(PROCESSES), "rank": RANK,
              "parameters": families, "runs": [r for f, c in families.items() for r in rows(f, c)]}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    for r in result["runs"]:
        print(r["family"], r["run"], {n: f"{b / 2**30:.1f}" for n, b in r["bytes"].items()}, r["refusal"][:120])


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    main()
