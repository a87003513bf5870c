"""LCD ablations of Luo et al. 2023 (§5.2, Fig. 3–4) re-run on the emoji pipeline, and LCF.

Every run distils ``models/emoji-sd`` with the same budget (optimizer steps × batch) and differs from the
reference run in one setting: the skipping step k ∈ {1, 5, 10, 20, 50}, the teacher's one-step solver
(DDIM, DPM-Solver-2, DPM-Solver++(2S), at k = 20) or the guidance range. Each is scored by FID at 4 steps.
LCF fine-tunes the shipped ``models/emoji-lcm`` with no teacher on one Unicode group and scores the
4-step FID on that group before and after.

    python bench/lcm_ablation.py train --runs k1 k5        # train some runs (skips finished ones);
    python bench/lcm_ablation.py train --runs k10 k50      # ... a second process can take others
    python bench/lcm_ablation.py score                     # score them all → bench/results/lcm_ablation.json

Models go to runs/lcm-ablation/ (not shipped: ~9 MB each); ``fewstep bench`` puts the JSON into BENCHMARKS.md.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from ablation import main, write_result

from fewstep.eval.evaluate import Ruler, evaluate, ruler_for
from fewstep.methods.lcm import LCMSettings, distill_lcm
from fewstep.models.data import load_emoji
from fewstep.models.folders import load_model
from fewstep.training import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
MODELS, WORK = ROOT / "models", ROOT / "runs" / "lcm-ablation"
OUT = ROOT / "bench" / "results" / "lcm_ablation.json"
STEPS, BATCH, NUM, GUIDANCE = 200, 64, 500, 3.0
BASE = dict(skip=20, solver="ddim", guidance_min=1.0, guidance_max=6.0)
RUNS = {f"k{k}": {"skip": k} for k in (1, 5, 10, 20, 50)}
RUNS |= {"dpm-solver": {"solver": "dpm-solver"}, "dpm-solver++": {"solver": "dpm-solver++"},
         "w-narrow": {"guidance_min": 2.0, "guidance_max": 4.0}}
LCF_GROUP, LCF_STEPS = "Food & Drink", 200


def settings_of(name: str) -> LCMSettings:
    return LCMSettings(method="lcd", **{**BASE, **RUNS[name]})


def train_runs(names: list[str]) -> None:
    teacher = load_model(MODELS / "emoji-sd")
    data = load_emoji()
    for name in (n for n in names if n in RUNS):
        if (WORK / name / "model_index.json").exists():
            print(f"{name}: done already")
            continue
        config = TrainConfig(out_dir=str(WORK / f"{name}-work"), max_steps=STEPS, batch_size=BATCH, lr=1e-4,
                             warmup_steps=50, checkpoint_every=100, progress=False)
        distill_lcm(teacher, data, WORK / name, config, settings_of(name), command=f"bench/lcm_ablation.py train --runs {name}")
        print(f"{name}: trained", flush=True)
    if "lcf" in names and not (WORK / "lcf" / "model_index.json").exists():
        lcm = load_model(MODELS / "emoji-lcm")
        config = TrainConfig(out_dir=str(WORK / "lcf-work"), max_steps=LCF_STEPS, batch_size=BATCH, lr=5e-5,
                             warmup_steps=50, checkpoint_every=100, progress=False)
        settings = LCMSettings(method="lcf", guidance_min=lcm.config.guidance_range[0],
                               guidance_max=lcm.config.guidance_range[1])
        distill_lcm(lcm, group(data), WORK / "lcf", config, settings, command="bench/lcm_ablation.py train --runs lcf")


def group(data):
    return data.of_class(LCF_GROUP)


def _scores(row) -> dict:
    """FID and caption-group accuracy with their bootstrap spreads (the eval's own keys)."""
    return {k: getattr(row, k) for k in ("fid", "fid_std", "cond_accuracy", "cond_accuracy_std")}


def score() -> None:
    teacher = load_model(MODELS / "emoji-sd")
    ruler = ruler_for(teacher, MODELS)
    runs = []
    for name in RUNS:
        if not (WORK / name / "model_index.json").exists():
            print(f"{name}: not trained, skipped")
            continue
        rows, _ = evaluate(load_model(WORK / name), ruler, [4], None, GUIDANCE, NUM, 0, progress=False)
        runs.append({"name": name, **{k: v for k, v in asdict(settings_of(name)).items()
                                      if k in ("skip", "solver", "guidance_min", "guidance_max")},
                     **_scores(rows[0])})
        print(runs[-1], flush=True)
    result = {"command": "python bench/lcm_ablation.py train --runs ...; python bench/lcm_ablation.py score",
              "budget": f"{STEPS} steps × batch {BATCH} each from the teacher, lr 1e-4", "num": NUM,
              "guidance_scale": GUIDANCE, "runs": runs}
    if (WORK / "lcf" / "model_index.json").exists():
        sub = group(load_emoji())
        sub_ruler = Ruler(ruler.classifier, sub)
        fid = {}
        for key, folder in (("before", MODELS / "emoji-lcm"), ("after", WORK / "lcf")):
            rows, _ = evaluate(load_model(folder), sub_ruler, [4], None, GUIDANCE, NUM, 0, progress=False)
            fid[key] = _scores(rows[0])
        result["lcf"] = {"subset": LCF_GROUP, "size": len(sub), "steps": LCF_STEPS, **fid}
        print(result["lcf"])
    write_result(OUT, result)


if __name__ == "__main__":
    main(__doc__, [*RUNS, "lcf"], train_runs, score)
