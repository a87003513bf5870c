"""LCD drift (Luo et al. 2023 on the emoji pipeline): FID along training for the reference LCD run and three
changes that could hold it still — a 5× smaller learning rate, iCT's pseudo-Huber distance, a slower target
EMA (μ = 0.99).

Every run distils ``models/emoji-sd`` as ``models/emoji-lcm`` was (k = 20, DDIM teacher step, s ∈ [1, 6],
batch 64, warm-up 50) and differs in one setting. It trains to 200, then resumes to 600 and to 1,200 steps
in one work folder (constant lr, so this is one run), saving the model at each; each is scored at 4 and 2
steps at s = 3, 500 samples.

    python bench/lcd_drift.py train --runs base lr2e-5     # one process per pair of runs, if you like
    python bench/lcd_drift.py train --runs huber mu99
    python bench/lcd_drift.py score                        # → bench/results/lcd_drift.json

Runs go to runs/lcd-drift/ (not shipped); ``fewstep bench`` puts the JSON into BENCHMARKS.md.
"""

from __future__ import annotations

from pathlib import Path

from ablation import main, write_result

from fewstep.eval.evaluate import evaluate, ruler_for
from fewstep.methods.lcm import LCMSettings, distill_lcm
from fewstep.models.data import load_emoji
from fewstep.models.folders import load_model
from fewstep.training import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
MODELS, WORK = ROOT / "models", ROOT / "runs" / "lcd-drift"
OUT = ROOT / "bench" / "results" / "lcd_drift.json"
STEPS, BATCH, NUM, GUIDANCE = (200, 600, 1200), 64, 500, 3.0
BASE = dict(skip=20, solver="ddim", guidance_min=1.0, guidance_max=6.0)
RUNS = {"base": ({}, 1e-4), "lr2e-5": ({}, 2e-5), "huber": ({"distance": "pseudo-huber"}, 1e-4),
        "mu99": ({"target_ema": 0.99}, 1e-4)}


def train_runs(names: list[str]) -> None:
    teacher, data = load_model(MODELS / "emoji-sd"), load_emoji()
    for name in names:
        change, lr = RUNS[name]
        for steps in STEPS:
            if (WORK / name / f"step-{steps}" / "model_index.json").exists():
                continue
            config = TrainConfig(out_dir=str(WORK / name / "work"), max_steps=steps, batch_size=BATCH, lr=lr,
                                 warmup_steps=50, checkpoint_every=200, progress=False)
            distill_lcm(teacher, data, WORK / name / f"step-{steps}", config,
                        LCMSettings(method="lcd", **{**BASE, **change}), command=f"bench/lcd_drift.py train --runs {name}")
            print(f"{name}: {steps} steps", flush=True)


def score() -> None:
    ruler = ruler_for(load_model(MODELS / "emoji-sd"), MODELS)
    runs = []
    for name, (change, lr) in RUNS.items():
        points = []
        for steps in STEPS:
            folder = WORK / name / f"step-{steps}"
            if not (folder / "model_index.json").exists():
                continue
            rows, _ = evaluate(load_model(folder), ruler, [4, 2], None, GUIDANCE, NUM, 0, progress=False)
            points.append({"step": steps, **{f"fid_{r.steps}": r.fid for r in rows}})
            print(name, points[-1], flush=True)
        if points:
            runs.append({"name": name, "lr": lr, "change": change, "points": points})
    result = {"command": "python bench/lcd_drift.py train; python bench/lcd_drift.py score",
              "budget": f"k = 20, DDIM teacher step, s ∈ [1, 6], batch {BATCH}", "num": NUM, "guidance_scale": GUIDANCE,
              "runs": runs}
    write_result(OUT, result)


if __name__ == "__main__":
    main(__doc__, RUNS, train_runs, score)
