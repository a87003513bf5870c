"""Full size on 24 GB (issue 15): peak memory and time of LCD and LCM-LoRA on random-weight pipelines built
offline: SD 1.5's architecture (UNet 859.5M, VAE 83.7M, CLIP-L-shaped text encoder 123M) and SDXL base's
(UNet 2.57B, CLIP-L and OpenCLIP-bigG text encoders 817M, from the shipped configs of
``fewstep/models/single_file_configs/sdxl-base``). Random weights: this measures memory, speed and plumbing,
never quality.

Each run is a real ``fewstep distill`` in its own process at 256² (32² latents), batch 1, on a folder of four
captioned emoji; its peak memory is the largest resident set of its process tree, sampled every 0.2 s, and a
run that passes ``--limit-gb`` is killed (and reported as not fitting) before it can take the machine with it.

    python bench/full_size.py [--work /tmp/full-size] [--steps 2] [--only NAME ...]   # → bench/results/full_size.json

The ``--optimizer adamw-8bit`` run needs bitsandbytes importable (``pip install bitsandbytes``; fewstep does not
depend on it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "full_size.json"
# what each run adds to `fewstep distill --teacher SD15 --dataset DATA --batch 1 ...`
RUNS = {
    "lcd (the defaults), --no-memory-check": ["--method", "lcd", "--no-memory-check"],
    "lcd (the defaults: fp32 teacher, weight EMA)": ["--method", "lcd"],
    "lcd --ema 0 --optimizer adamw-8bit (fp32 teacher)": ["--method", "lcd", "--ema", "0", "--optimizer", "adamw-8bit"],
    "lcd --teacher-dtype bf16 --ema 0 --gradient-checkpointing":
        ["--method", "lcd", "--teacher-dtype", "bf16", "--ema", "0", "--gradient-checkpointing"],
    "lcm-lora rank 64 (the defaults)": ["--method", "lcm-lora", "--lora-rank", "64"],
    "lcm-lora rank 64 --gradient-checkpointing (fp32)": ["--method", "lcm-lora", "--lora-rank", "64",
                                                         "--gradient-checkpointing"],
    "lcm-lora rank 64 --teacher-dtype bf16 --gradient-checkpointing":
        ["--method", "lcm-lora", "--lora-rank", "64", "--teacher-dtype", "bf16", "--gradient-checkpointing"],
}
# the same on the SDXL architecture (names start with "sdxl", which --only can pick)
RUNS_SDXL = {
    "sdxl lcd (the defaults)": ["--method", "lcd"],
    "sdxl lcm-lora rank 64 (the defaults)": ["--method", "lcm-lora", "--lora-rank", "64"],
}


def build_sdxl(folder: Path) -> Path:
    """A random-weight pipeline folder with SDXL base 1.0's architecture, from the configs fewstep ships for
    single-file checkpoints (UNet, VAE, both text encoders; CLIP's tokenizers built from its BPE file)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from fewstep.models.config import ModelConfig, read_json
    from fewstep.models.folders import new_pipeline, save_model
    from fewstep.models.single_file import CONFIGS, clip_tokenizer

    if (folder / "model_index.json").exists():
        return folder
    torch.manual_seed(0)
    cfg = CONFIGS / "sdxl-base"
    unet = UNet2DConditionModel.from_config(read_json(cfg / "unet" / "config.json"))
    vae = AutoencoderKL.from_config(read_json(cfg / "vae" / "config.json"))
    text = CLIPTextModel(CLIPTextConfig.from_json_file(cfg / "text_encoder" / "config.json"))
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_json_file(cfg / "text_encoder_2" / "config.json"))
    config = ModelConfig(kind="diffusion", parameterization="vp", image_size=256, channels=3, dataset="emoji",
                         default_sampler="dpmpp-2m", default_steps=25, default_guidance_scale=5.0)
    model = new_pipeline(config, unet, vae, text, clip_tokenizer("<|endoftext|>"), folder,   # SDXL's pad tokens
                         scheduler_config=read_json(cfg / "scheduler" / "scheduler_config.json"),
                         text_encoder_2=text_2, tokenizer_2=clip_tokenizer("!"))
    return save_model(folder, model)


def build_sd15(folder: Path) -> Path:
    """A random-weight pipeline folder with SD 1.5's architecture (diffusers' configs of
    runwayml/stable-diffusion-v1-5; a tokenizer learned from the emoji captions, CLIP-L's 49,408-token width)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from fewstep.models.config import ModelConfig
    from fewstep.models.data import load_emoji
    from fewstep.models.folders import new_pipeline, save_model
    from fewstep.nets.unets import build_tokenizer

    if (folder / "model_index.json").exists():
        return folder
    torch.manual_seed(0)
    tok = build_tokenizer(load_emoji().captions, 49408, 77)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
                                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id))
    config = ModelConfig(kind="diffusion", parameterization="vp", image_size=256, channels=3, dataset="emoji",
                         default_sampler="dpmpp-2m", default_steps=25, default_guidance_scale=7.5)
    return save_model(folder, new_pipeline(config, unet, vae, text, tok, folder))


def data_folder(folder: Path) -> Path:
    """Four captioned emoji (the HF imagefolder layout): the data is encoded once before training, so a
    small set keeps the VAE's share of the run small."""
    from PIL import Image

    from fewstep.models.data import load_emoji

    folder.mkdir(parents=True, exist_ok=True)
    emoji = load_emoji()
    lines = []
    for i in range(4):
        image = ((emoji.images[i * 400].permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
        Image.fromarray(image).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": emoji.captions[i * 400]}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def unet_parameters(folder: Path) -> int:
    """The parameter count of the weights in ``folder`` (one file or shards), from their headers alone."""
    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and its children (Linux /proc)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue
    return total


def measure(name: str, flags: list[str], teacher: Path, data: Path, work: Path, steps: int, limit: float) -> dict:
    slug = "".join(c if c.isalnum() else "-" for c in name)[:60]
    out, wd = work / "out" / slug, work / "runs" / slug
    cmd = [sys.executable, "-m", "fewstep", "distill", *flags, "--teacher", str(teacher), "--dataset", str(data),
           "--out", str(out), "--work-dir", str(wd), "--steps", str(steps), "--batch", "1", "--warmup", "1",
           "--checkpoint-every", str(steps), "--no-progress", "--overwrite"]
    t0, peak = time.time(), 0
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = False
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        if peak > limit * 2 ** 30:
            proc.kill()
            killed = True
        time.sleep(0.2)
    log = proc.stdout.read()
    row = {"name": name, "command": " ".join(["fewstep", *cmd[3:]]), "peak_gb": round(peak / 2 ** 30, 2),
           "wall_seconds": round(time.time() - t0, 1), "fits": not killed and proc.returncode == 0,
           "returncode": proc.returncode, "killed_at_gb": limit if killed else None}
    metrics = wd / "metrics.jsonl"
    if metrics.exists():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line]
        row["seconds_per_step"] = round(records[-1]["time"] / records[-1]["step"], 1)
    ckpts = sorted((wd / "checkpoints").glob("step-*")) if (wd / "checkpoints").is_dir() else []
    if ckpts:
        row["checkpoint_mb"] = round(sum(f.stat().st_size for f in ckpts[-1].iterdir()) / 2 ** 20, 1)
    if not row["fits"]:
        row["log_tail"] = log[-600:]
    print(json.dumps({k: v for k, v in row.items() if k != "log_tail"}), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/full-size"))
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--limit-gb", type=float, default=19.0, help="kill a run whose memory passes this, in GiB (default 19 of the 23 here)")
    p.add_argument("--only", nargs="*", help="substrings of the run names to do (default all)")
    p.add_argument("--no-runs", action="store_true",
                   help="run nothing: rewrite full_size.json's list of planned runs (its rows and command stay)")
    args = p.parse_args()
    picked = [(n, f, runs is RUNS_SDXL) for runs in (RUNS, RUNS_SDXL) for n, f in runs.items()
              if not args.no_runs and (not args.only or any(s in n for s in args.only))]
    data, rows, params = data_folder(args.work / "data"), [], {}
    for name, flags, xl in picked:
        arch = "sdxl" if xl else "sd15"
        teacher = build_sdxl(args.work / "sdxl-random") if xl else build_sd15(args.work / "sd15-random")
        params[arch] = unet_parameters(teacher / "unet")
        rows.append({**measure(name, flags, teacher, data, args.work, args.steps, args.limit_gb), "arch": arch,
                     "date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads()})
    old = json.loads(OUT.read_text()) if OUT.exists() else {}
    rows += [r for r in old.get("runs", []) if r["name"] not in {x["name"] for x in rows}]
    order = [*RUNS, *RUNS_SDXL]
    rows.sort(key=lambda r: order.index(r["name"]) if r["name"] in order else len(order))
    params = {**old.get("parameters", {"sd15": old.get("unet_parameters")}), **params}
    old.pop("unet_parameters", None)
    old.pop("conclusion", None)      # the section's conclusion is computed from the rows (fewstep.bench.memory)
    # with --only the rows come from several invocations: the command names the pattern, each row its date and threads (killed_at_gb: the limit it passed)
    command = f"python bench/full_size.py --work {args.work} --steps {args.steps}" + (
        " --only NAME (one invocation per row)" if args.only else "")
    if args.no_runs:
        command, today = old.get("command", command), old.get("date", time.strftime("%Y-%m-%d"))
    else:
        today = time.strftime("%Y-%m-%d")
    OUT.write_text(json.dumps({**old, "command": command, "parameters": params, "date": today, "planned": order,
                               "runs": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
