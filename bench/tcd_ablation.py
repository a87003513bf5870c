"""TCD-LoRA at LCM-LoRA's budget, what else was tried (Zheng et al. 2024 on the emoji pipeline).

The shipped ``models/emoji-tcd-lora`` (target EMA μ = 0.95, lr 1e-3: LCM-LoRA's settings) trails ``emoji-lcm-lora``
at 2 and 4 steps at TCD's default γ = 0.3 ("TCD-LoRA against LCM-LoRA" in BENCHMARKS.md). Two variants at the same
budget (rank 4, s = 3, 600 steps × batch 64), one change each:

- ``mu0``: the online student under stop-gradient as the target (μ = 0), what the public TCD-LoRA training script
  does (rootonchair/consistency_models_distill ``tcd/train_tcd_distill_lora_sd_wds.py``: no target network);
- ``lr2e-3``: twice the learning rate (the LoRA's trajectory part, s > 0, is what lags: γ = 1 matches LCM-LoRA).

Each final LoRA (its weight EMA, as the shipped one) is fused into ``emoji-sd`` and scored at 4 and 8 TCD steps at
γ 0.3 and 1, guidance 1, with the bench's ruler, 1,000 samples and seed 0 (the numbers of the bench's TCD table).

    python bench/tcd_ablation.py train --runs mu0       # one run per process if you like
    python bench/tcd_ablation.py train --runs lr2e-3
    python bench/tcd_ablation.py score                  # → bench/results/tcd_ablation.json

Runs go to runs/tcd-ablation/ (not shipped); ``fewstep bench --only tcd`` (or ``--render-only``) puts the JSON
into BENCHMARKS.md.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from ablation import main, write_result

from fewstep.eval.evaluate import evaluate, ruler_for
from fewstep.methods.lcm import LCMSettings
from fewstep.methods.tcd import distill_tcd
from fewstep.models.data import load_emoji
from fewstep.models.folders import load_model
from fewstep.models.loras import apply_loras
from fewstep.training import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
MODELS, WORK = ROOT / "models", ROOT / "runs" / "tcd-ablation"
OUT = ROOT / "bench" / "results" / "tcd_ablation.json"
STEPS, BATCH, RANK, NUM, GUIDANCE = 600, 64, 4, 1000, 3.0
RUNS = {"mu0": {"target_ema": 0.0, "lr": 1e-3}, "lr2e-3": {"target_ema": 0.95, "lr": 2e-3}}
POINTS = ((0.3, (4, 8)), (1.0, (4, 8)))


def train_runs(names: list[str]) -> None:
    for name in names:
        if (WORK / name / "model" / "fewstep.json").exists():
            print(f"{name}: done already")
            continue
        run = RUNS[name]
        config = TrainConfig(out_dir=str(WORK / name / "work"), max_steps=STEPS, batch_size=BATCH, lr=run["lr"],
                             warmup_steps=100, checkpoint_every=200, progress=False)
        settings = LCMSettings(method="tcd-lora", skip=20, solver="ddim", guidance_min=GUIDANCE, guidance_max=GUIDANCE,
                               lora_rank=RANK, target_ema=run["target_ema"])
        distill_tcd(load_model(MODELS / "emoji-sd"), load_emoji(), WORK / name / "model", config, settings,
                    command=f"python bench/tcd_ablation.py train --runs {name}")
        print(f"{name}: trained", flush=True)


def score() -> None:
    teacher = load_model(MODELS / "emoji-sd")
    ruler = ruler_for(teacher, MODELS)
    runs = []
    for name, run in RUNS.items():
        folder = WORK / name / "model"
        if not (folder / "fewstep.json").exists():
            print(f"{name}: not trained, skipped")
            continue
        model = apply_loras(load_model(MODELS / "emoji-sd"), [(folder, 1.0)])
        rows = []
        for gamma, steps in POINTS:
            found, _ = evaluate(model, ruler, list(steps), "tcd", 1.0, NUM, 0, progress=False, eta=gamma)
            rows += [{**asdict(r), "eta": gamma} for r in found]
            print(name, gamma, [(r.steps, round(r.fid, 3)) for r in found], flush=True)
        runs.append({"name": name, **run, "rows": rows,
                     "final_loss": json.loads((folder / "fewstep.json").read_text())["training"]["final_loss"]})
    write_result(OUT, {"command": "python bench/tcd_ablation.py train; python bench/tcd_ablation.py score",
                       "budget": f"rank {RANK}, s = {GUIDANCE:g}, {STEPS} steps × batch {BATCH}", "num": NUM, "seed": 0,
                       "runs": runs})


if __name__ == "__main__":
    main(__doc__, RUNS, train_runs, score)
