"""LCM-LoRA's target network (Luo et al. 2023b on the emoji pipeline): the online student under
stop-gradient (μ = 0, what diffusers' ``train_lcm_distill_lora_sd_wds.py`` does) against an EMA target
(μ = 0.95, what its full-LCD script does and fewstep's default), FID along training.

Both runs distil ``models/emoji-sd`` at s = 3 into a rank-4 LoRA (lr 1e-3, 800 steps × 64, checkpoints
every 200); every checkpoint's EMA adapter is fused into the base and scored at 2 and 4 LCM steps at
guidance 1 (the LoRA learned the s = 3 ODE), 500 samples.

    python bench/lcm_lora_ablation.py train --runs mu0      # one run per process if you like
    python bench/lcm_lora_ablation.py train --runs mu95
    python bench/lcm_lora_ablation.py score                 # → bench/results/lcm_lora_ablation.json

Runs go to runs/lcm-lora-ablation/ (not shipped); ``fewstep bench`` puts the JSON into BENCHMARKS.md.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from ablation import main, write_result
from safetensors.torch import load_file

from fewstep.eval.evaluate import evaluate, ruler_for
from fewstep.methods.lcm import LCMSettings, distill_lcm
from fewstep.models.data import load_emoji
from fewstep.models.folders import load_model
from fewstep.models.loras import apply_loras, save_lora
from fewstep.nets.lora import add_lora
from fewstep.training import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
MODELS, WORK = ROOT / "models", ROOT / "runs" / "lcm-lora-ablation"
OUT = ROOT / "bench" / "results" / "lcm_lora_ablation.json"
STEPS, EVERY, BATCH, LR, RANK, NUM, GUIDANCE = 800, 200, 64, 1e-3, 4, 500, 3.0
RUNS = {"mu0": 0.0, "mu95": 0.95}


def train_runs(names: list[str]) -> None:
    for name in names:
        if (WORK / name / "model" / "fewstep.json").exists():
            print(f"{name}: done already")
            continue
        config = TrainConfig(out_dir=str(WORK / name / "work"), max_steps=STEPS, batch_size=BATCH, lr=LR, warmup_steps=100,
                             checkpoint_every=EVERY, keep_checkpoints=STEPS // EVERY, progress=False)
        settings = LCMSettings(method="lcm-lora", skip=20, solver="ddim", guidance_min=GUIDANCE, guidance_max=GUIDANCE,
                               lora_rank=RANK, target_ema=RUNS[name])
        distill_lcm(load_model(MODELS / "emoji-sd"), load_emoji(), WORK / name / "model", config, settings,
                    command=f"bench/lcm_lora_ablation.py train --runs {name}")
        print(f"{name}: trained", flush=True)


def checkpoint_lora(teacher, checkpoint: Path, info: dict) -> Path:
    """A checkpoint's EMA adapter as a LoRA folder (the trainer keeps the EMA of the LoRA weights in order)."""
    unet = copy.deepcopy(teacher.unet)
    params = add_lora(unet, RANK)
    shadow = load_file(checkpoint / "ema.safetensors")
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(shadow[f"shadow.{i}"])
    return save_lora(checkpoint.parent.parent.parent / checkpoint.name, unet, info)


def score() -> None:
    teacher = load_model(MODELS / "emoji-sd")
    ruler = ruler_for(teacher, MODELS)
    runs = []
    for name, mu in RUNS.items():
        if not (WORK / name / "model" / "fewstep.json").exists():
            print(f"{name}: not trained, skipped")
            continue
        info = {k: v for k, v in json.loads((WORK / name / "model" / "fewstep.json").read_text()).items() if k != "training"}
        points = []
        for ck in sorted((WORK / name / "work" / "checkpoints").glob("step-*")):
            model = apply_loras(load_model(MODELS / "emoji-sd"), [(checkpoint_lora(teacher, ck, info), 1.0)])
            rows, _ = evaluate(model, ruler, [2, 4], "consistency", 1.0, NUM, 0, progress=False)
            points.append({"step": int(ck.name.split("-")[1]), **{f"fid_{r.steps}": r.fid for r in rows},
                           **{f"acc_{r.steps}": r.cond_accuracy for r in rows}})
            print(name, points[-1], flush=True)
        runs.append({"name": name, "target_ema": mu, "points": points})
    result = {"command": "python bench/lcm_lora_ablation.py train; python bench/lcm_lora_ablation.py score",
              "budget": f"rank {RANK}, s = {GUIDANCE:g}, lr {LR:g}, {STEPS} steps × batch {BATCH}", "num": NUM, "runs": runs}
    write_result(OUT, result)


if __name__ == "__main__":
    main(__doc__, RUNS, train_runs, score)
