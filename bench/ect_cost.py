"""ECT's FID against its training cost, beside iCT's (issue 27, "the consistency frontier"): Geng et al. 2024 claim
that tuning a diffusion model into a consistency model (ECT) reaches consistency training's quality at a fraction
of its cost. On the emoji pixel testbed: `models/emoji-pixel-ect` (tuned from `models/emoji-pixel-teacher`) at the
checkpoints of its run, and its starting point (the teacher's weights as a consistency model, 0 steps), beside the
shipped iCT model `models/emoji-pixel-ict` (trained from data alone, 400 steps × 64).

    python bench/ect_cost.py train     # the shipped run (its command is in models/emoji-pixel-ect/README.md)
    python bench/ect_cost.py score     # → bench/results/ect_cost.json; `fewstep bench` renders it into BENCHMARKS.md

Each point is the EMA weights of one checkpoint of that run (runs/emoji-pixel-ect/work/checkpoints, kept 4),
scored at 1 and 2 steps on the testbed's ruler (the shipped emoji classifier against all 3,655 emoji, 300 samples,
seed 0, bootstrap spreads), iCT in the same process with the same ruler. 2-step ECT samples on ECT's grid
[80, 0.821, 0] (ct_train.py --mid_t); the last point also on iCT's default Karras grid, to show the sampler's part.

Cost, three ways: (1) the run's wall-clock × torch threads to that checkpoint (state.json), as every model folder
records it: an upper bound, since the 2 cores were shared with other runs (the load average during the run is
recorded); (2) the CPU time the training process had used when the checkpoint was written (utime + stime from
/proc/PID/stat, logged every 10 s while it ran, start-up included), where that log was kept; (3) iCT-equivalent: steps × iCT's recorded core-minutes per step × the measured ratio of one ECT step's
time to one iCT step's (same UNet, same batch, one forward with and one without gradients; timed alternately in
this process, so under the same load).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from ablation import main, write_result
from safetensors.torch import load_file

from fewstep.eval.evaluate import evaluate, ruler_for
from fewstep.models.folders import load_model
from fewstep.objectives.consistency import ConsistencyLoss
from fewstep.objectives.curricula import Curriculum
from fewstep.objectives.distances import get_distance, pseudo_huber_c

ROOT = Path(__file__).resolve().parents[1]
MODELS, WORK = ROOT / "models", ROOT / "runs" / "emoji-pixel-ect"
SHIPPED = Path(os.environ.get("ECT_COST_MODEL", MODELS / "emoji-pixel-ect"))   # the env vars: a smoke test
LOAD_LOG = ROOT / "runs" / "ect-logs" / "load.log"      # `uptime` every 30 s while the shipped run trained (if kept)
CPU_LOG = ROOT / "runs" / "ect-logs" / "cpu.log"        # "unix-time cpu-ticks" of the training process every 10 s
OUT = Path(os.environ.get("ECT_COST_OUT", ROOT / "bench" / "results" / "ect_cost.json"))
NUM, SEED, STEPS = int(os.environ.get("ECT_COST_NUM", 300)), 0, [1, 2]
COMMAND = ("fewstep distill --method ect --teacher models/emoji-pixel-teacher --out models/emoji-pixel-ect "
           "--work-dir runs/emoji-pixel-ect --steps 100 --batch 64 --lr 2e-4 --warmup 20 --checkpoint-every 25 "
           "--keep-checkpoints 4 --no-progress")


def train_runs(names: list[str]) -> None:
    from fewstep.cli import main as fewstep

    if (MODELS / "emoji-pixel-ect" / "fewstep.json").exists():
        print("models/emoji-pixel-ect exists; delete it (and runs/emoji-pixel-ect) to train it again")
        return
    os.chdir(ROOT)
    sys.exit(fewstep(COMMAND.split()[1:]))


def _with_weights(template, tensors: list[torch.Tensor]):
    """The template model with its trained parameters replaced, in order (a checkpoint's EMA shadow params)."""
    params = list(template.denoiser.parameters())
    if len(params) != len(tensors):
        raise SystemExit(f"checkpoint holds {len(tensors)} tensors, the model {len(params)}")
    with torch.no_grad():
        for p, t in zip(params, tensors):
            p.copy_(t)
    return template


def _rows(model, ruler, **sampling) -> dict:
    rows, _ = evaluate(model, ruler, STEPS, None, None, NUM, SEED, progress=False, **sampling)
    out = {}
    for r in rows:
        out |= {f"fid_{r.steps}": r.fid, f"fid_{r.steps}_std": r.fid_std, f"acc_{r.steps}": r.cond_accuracy,
                f"acc_{r.steps}_std": r.cond_accuracy_std}
    return out


def _step_seconds(ect, ict_net, data, repeats: int = 4) -> tuple[float, float]:
    """Median seconds of one training step (loss, backward) of ECT's and iCT's objective on the same UNet and batch,
    alternated so that both see the same load."""
    batch = {"images": data.images[:64], "labels": data.labels[:64]}
    cond = ect.conditioner.training_condition(0.1)
    losses = {"ect": ConsistencyLoss(ect.schedule, Curriculum.for_method("ect", 100), pseudo_huber_c(0.0), condition=cond),
              "ict": ConsistencyLoss(ect.schedule, Curriculum.for_method("ict", 400), get_distance("pseudo-huber"),
                                     condition=cond)}
    nets = {"ect": ect.denoiser.train().requires_grad_(True), "ict": ict_net.train().requires_grad_(True)}
    times: dict[str, list[float]] = {"ect": [], "ict": []}
    for i in range(repeats + 1):
        for name in ("ect", "ict"):
            start = time.perf_counter()
            loss, _ = losses[name](nets[name], batch)
            loss.backward()
            nets[name].zero_grad(set_to_none=True)
            if i:                                            # the first round warms up
                times[name].append(time.perf_counter() - start)
    for net in nets.values():
        net.eval().requires_grad_(False)                     # dropout off again before any sampling
    return statistics.median(times["ect"]), statistics.median(times["ict"])


def _load_average() -> dict | None:
    if not LOAD_LOG.exists():
        return None
    ones = [float(line.split()[1]) for line in LOAD_LOG.read_text().splitlines() if len(line.split()) >= 2]
    return {"samples": len(ones), "mean_1min": round(statistics.mean(ones), 2), "max_1min": max(ones)} if ones else None


def _cpu_minutes(when: float) -> float | None:
    """CPU minutes the training process had used at unix time ``when`` (the last reading before it)."""
    if not CPU_LOG.exists():
        return None
    readings = [tuple(map(float, line.split())) for line in CPU_LOG.read_text().splitlines() if len(line.split()) == 2]
    before = [ticks for t, ticks in readings if t <= when + 10]
    return before[-1] / os.sysconf("SC_CLK_TCK") / 60 if before else None


def score() -> None:
    shipped = load_model(SHIPPED)
    ict = load_model(MODELS / "emoji-pixel-ict")
    ruler = ruler_for(shipped, MODELS)
    training = shipped.config.training
    threads = training["threads"]
    ict_t = ict.config.training
    ict_core_min = ict_t["wall_seconds"] * ict_t["threads"] / 60
    ict_per_step = ict_core_min / ict_t["steps"]

    torch.manual_seed(0)
    ect_s, ict_s = _step_seconds(load_model(SHIPPED), ict.denoiser, ruler.data)
    ratio = ect_s / ict_s
    print(f"one step: ECT {ect_s:.2f} s, iCT {ict_s:.2f} s (ratio {ratio:.2f})", flush=True)

    points = []
    teacher = load_model(MODELS / "emoji-pixel-teacher")
    start = _with_weights(load_model(SHIPPED), [p.detach() for p in teacher.denoiser.parameters()])
    points.append({"step": 0, "core_minutes": 0.0, "cpu_minutes": 0.0, "ict_equivalent_core_minutes": 0.0,
                   **_rows(start, ruler)})
    print(points[-1], flush=True)
    checkpoints = sorted(p for p in (WORK / "checkpoints").glob("step-*") if re.fullmatch(r"step-\d+", p.name))
    for ckpt in checkpoints:
        state = json.loads((ckpt / "state.json").read_text())
        shadow = load_file(ckpt / "ema.safetensors")
        model = _with_weights(load_model(SHIPPED), [shadow[f"shadow.{i}"] for i in range(len(shadow))])
        step = state["step"]
        point = {"step": step, "core_minutes": state["elapsed_seconds"] * threads / 60,
                 "cpu_minutes": _cpu_minutes((ckpt / "state.json").stat().st_mtime),
                 "ict_equivalent_core_minutes": step * ict_per_step * ratio, **_rows(model, ruler)}
        if ckpt == checkpoints[-1]:
            karras = torch.tensor(ict.schedule.sampling_grid(2, "consistency").tolist())
            rows, _ = evaluate(model, ruler, [2], None, None, NUM, SEED, progress=False, sigmas=karras)
            point |= {"fid_2_karras_grid": rows[0].fid, "fid_2_karras_grid_std": rows[0].fid_std,
                      "karras_grid": [round(s, 4) for s in karras.tolist()]}
        points.append(point)
        print(points[-1], flush=True)
    ict_row = {"steps": ict_t["steps"], "batch": ict_t["config"]["batch_size"], "core_minutes": ict_core_min,
               "command": ict_t["command"], **_rows(ict, ruler)}
    print("ict", ict_row, flush=True)
    result = {"command": "python bench/ect_cost.py score", "run_command": training["command"], "num": NUM, "seed": SEED,
              "ruler": "emoji classifier features against all 3,655 emoji; spreads: bootstrap over the samples",
              "two_step_grid": shipped.config.sampling_sigmas.get("2"), "threads": threads,
              "batch": training["config"]["batch_size"], "run_steps": training["steps"],
              "load_average": _load_average(), "cores": os.cpu_count(),
              "step_seconds": {"ect": ect_s, "ict": ict_s, "ratio": ratio}, "ect": points, "ict": ict_row}
    write_result(OUT, result)


if __name__ == "__main__":
    main(__doc__, ["emoji-pixel-ect"], train_runs, score)
