"""ECT's FID against its training cost, beside iCT's (issue 27, "the consistency frontier"): Geng et al. 2024 claim
that tuning a diffusion model into a consistency model (ECT) reaches consistency training's quality at a fraction
of its cost. On the emoji pixel testbed: ECT runs tuned from `models/emoji-pixel-teacher` at the checkpoints of
each run, and their common start (the teacher's weights as a consistency model, 0 steps), beside the shipped iCT
model `models/emoji-pixel-ict` (trained from data alone, 400 steps × 64). The runs:

- ``emoji-pixel-ect``: the shipped `models/emoji-pixel-ect`, 50 steps × 64 (its command is in its README.md);
- ``ect-100``: the same recipe at 100 steps × 64 (the stages twice as long), run first with --out
  models/emoji-pixel-ect and moved to runs/ect-100 when the 50-step run replaced it (its fewstep.json keeps the
  command as run);
- ``ect-1hour``: the reference's 1-hour recipe (run_ecm_1hour.sh: -q 256 --double 10000, i.e. Δt = t/256·n(t) from
  the first step and never shrinking) at the shipped run's 50 steps × 64.

    OMP_NUM_THREADS=1 python bench/ect_cost.py train --runs emoji-pixel-ect ect-100 ect-1hour
    python bench/ect_cost.py score     # → bench/results/ect_cost.json; `fewstep bench` renders it into BENCHMARKS.md

Each point is the EMA weights of one checkpoint (runs/<run>/.../checkpoints, every 25 steps), scored at 1 and 2
steps on the testbed's ruler (the shipped emoji classifier against all 3,655 emoji, 300 samples, seed 0, bootstrap
spreads), iCT in the same process with the same ruler. 2-step ECT samples on ECT's grid [80, 0.821, 0]
(ct_train.py --mid_t); each run's last point also on iCT's default Karras grid, to show the sampler's part. A run
whose points are already in bench/results/ect_cost.json (same command, same checkpoints) is not scored again, nor
the start, iCT or the step timing (ECT_COST_FRESH=1 scores everything).

Cost, three ways: (1) the run's wall-clock × torch threads to that checkpoint (state.json), as every model folder
records it: an upper bound, since the 2 cores were shared with other runs (the load average during the run is
recorded); (2) the CPU time the training process had used when the checkpoint was written (utime + stime from
/proc/PID/stat, logged every 10 s while it ran by ``train``, start-up included), where that log was
kept; (3) iCT-equivalent: steps × iCT's recorded core-minutes per step × the measured ratio of one ECT step's time
to one iCT step's (same UNet, same batch, one forward with and one without gradients; timed alternately in this
process, so under the same load; noisy on a loaded machine).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from ablation import main, write_result
from safetensors.torch import load_file

from fewstep.bench.results import features_of
from fewstep.eval.evaluate import evaluate, ruler_for
from fewstep.models.folders import load_model
from fewstep.objectives.consistency import ConsistencyLoss
from fewstep.objectives.curricula import Curriculum
from fewstep.objectives.distances import get_distance, pseudo_huber_c

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
OUT = Path(os.environ.get("ECT_COST_OUT", ROOT / "bench" / "results" / "ect_cost.json"))
NUM, SEED, STEPS = int(os.environ.get("ECT_COST_NUM", 300)), 0, [1, 2]
_RECIPE = "--batch 64 --lr 2e-4 --warmup 20 --checkpoint-every 25 --keep-checkpoints 4 --no-progress"
NOTES = {"ect-100": "run as --out models/emoji-pixel-ect --work-dir runs/emoji-pixel-ect, then moved to runs/ect-100/",
         "ect-1hour": "the reference's 1-hour recipe, run_ecm_1hour.sh's -q 256 --double 10000: Δt = t/256·n(t) throughout"}
RUNS = {   # name -> (command, model folder, work folder, folder of its cpu.log/load.log, shipped)
    "emoji-pixel-ect": (f"fewstep distill --method ect --teacher models/emoji-pixel-teacher --out models/emoji-pixel-ect "
                        f"--work-dir runs/emoji-pixel-ect --steps 50 {_RECIPE}",
                        MODELS / "emoji-pixel-ect", ROOT / "runs" / "emoji-pixel-ect", ROOT / "runs" / "ect-logs", True),
    "ect-100": (f"fewstep distill --method ect --teacher models/emoji-pixel-teacher --out runs/ect-100/model "
                f"--work-dir runs/ect-100/work --steps 100 {_RECIPE}",
                ROOT / "runs" / "ect-100" / "model", ROOT / "runs" / "ect-100" / "work", ROOT / "runs" / "ect-100", False),
    "ect-1hour": (f"fewstep distill --method ect --teacher models/emoji-pixel-teacher --out runs/ect-1hour/model "
                  f"--work-dir runs/ect-1hour/work --steps 50 --ect-q 256 --ect-stages 1 {_RECIPE}",
                  ROOT / "runs" / "ect-1hour" / "model", ROOT / "runs" / "ect-1hour" / "work", ROOT / "runs" / "ect-1hour",
                  False),
}


def train_runs(names: list[str]) -> None:
    """Each run's command, with its CPU time and the load logged beside it."""
    for name in names:
        command, model, work, logs, _ = RUNS[name]
        if (model / "fewstep.json").exists():
            print(f"{model} exists; delete it (and {work}) to train {name} again")
            continue
        logs.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.Popen([sys.executable, "-m", "fewstep", *command.split()[1:]], cwd=ROOT, env=env)
        while proc.poll() is None:          # every 10 s: its CPU ticks (utime + stime) and the load average
            try:
                fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
                with open(logs / "cpu.log", "a") as f:
                    f.write(f"{int(time.time())} {int(fields[11]) + int(fields[12])}\n")
                with open(logs / "load.log", "a") as f:
                    f.write(time.strftime("%H:%M:%S ", time.gmtime()) + " ".join(Path("/proc/loadavg").read_text().split()[:3]) + "\n")
            except (OSError, IndexError, ValueError):
                pass
            time.sleep(10)


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


def _load_average(logs: Path) -> dict | None:
    path = logs / "load.log"
    if not path.exists():
        return None
    ones = [float(line.split()[1]) for line in path.read_text().splitlines() if len(line.split()) >= 2]
    return {"samples": len(ones), "mean_1min": round(statistics.mean(ones), 2), "max_1min": max(ones)} if ones else None


def _cpu_minutes(logs: Path, when: float) -> float | None:
    """CPU minutes the training process had used at unix time ``when`` (the last reading up to 10 s after it)."""
    path = logs / "cpu.log"
    if not path.exists():
        return None
    readings = [tuple(map(float, line.split())) for line in path.read_text().splitlines() if len(line.split()) == 2]
    before = [ticks for t, ticks in readings if t <= when + 10]
    return before[-1] / os.sysconf("SC_CLK_TCK") / 60 if before else None


def _checkpoints(work: Path) -> list[Path]:
    root = work / "checkpoints"
    return sorted(p for p in root.glob("step-*") if re.fullmatch(r"step-\d+", p.name))


def _score_run(name: str, ruler, ict_per_step: float, ratio: float) -> dict:
    _, folder, work, logs, shipped = RUNS[name]
    training = load_model(folder).config.training
    threads = training["threads"]
    points = []
    checkpoints = _checkpoints(work)
    for ckpt in checkpoints:
        state = json.loads((ckpt / "state.json").read_text())
        shadow = load_file(ckpt / "ema.safetensors")
        model = _with_weights(load_model(folder), [shadow[f"shadow.{i}"] for i in range(len(shadow))])
        step = state["step"]
        point = {"step": step, "core_minutes": state["elapsed_seconds"] * threads / 60,
                 "cpu_minutes": _cpu_minutes(logs, (ckpt / "state.json").stat().st_mtime),
                 "ict_equivalent_core_minutes": step * ict_per_step * ratio, **_rows(model, ruler)}
        if ckpt == checkpoints[-1]:
            karras = model.schedule.sampling_grid(2, "consistency")
            rows, _ = evaluate(model, ruler, [2], None, None, NUM, SEED, progress=False, sigmas=karras)
            point |= {"fid_2_karras_grid": rows[0].fid, "fid_2_karras_grid_std": rows[0].fid_std,
                      "karras_grid": [round(s, 4) for s in karras.tolist()]}
        points.append(point)
        print(name, points[-1], flush=True)
    return {"name": name, "shipped": shipped, "run_command": training["command"], "note": NOTES.get(name),
            "two_step_grid": load_model(folder).config.sampling_sigmas.get("2"), "threads": threads,
            "batch": training["config"]["batch_size"], "run_steps": training["steps"],
            "load_average": _load_average(logs), "checkpoints": [c.name for c in checkpoints], "points": points}


def score() -> None:
    previous = json.loads(OUT.read_text()) if OUT.exists() and not os.environ.get("ECT_COST_FRESH") else {}
    if (previous.get("num"), previous.get("seed")) != (NUM, SEED) or "runs" not in previous:
        previous = {}
    ict = load_model(MODELS / "emoji-pixel-ict")
    ruler = ruler_for(ict, MODELS)
    if features_of(previous) != ruler.name:     # scored on another feature network
        previous = {}
    ict_t = ict.config.training
    ict_core_min = ict_t["wall_seconds"] * ict_t["threads"] / 60
    ict_per_step = ict_core_min / ict_t["steps"]
    template = RUNS["emoji-pixel-ect"][1]

    if "step_seconds" in previous:
        s = previous["step_seconds"]
    else:
        torch.manual_seed(0)
        ect_s, ict_s = _step_seconds(load_model(template), ict.denoiser, ruler.data)
        s = {"ect": ect_s, "ict": ict_s, "ratio": ect_s / ict_s}
    print(f"one step: ECT {s['ect']:.2f} s, iCT {s['ict']:.2f} s (ratio {s['ratio']:.2f})", flush=True)

    if "start" in previous:
        start = previous["start"]
    else:
        teacher = load_model(MODELS / "emoji-pixel-teacher")
        model = _with_weights(load_model(template), [p.detach() for p in teacher.denoiser.parameters()])
        start = {"step": 0, "core_minutes": 0.0, "cpu_minutes": 0.0, "ict_equivalent_core_minutes": 0.0,
                 **_rows(model, ruler)}
    ict_row = previous.get("ict") or {"steps": ict_t["steps"], "batch": ict_t["config"]["batch_size"],
                                      "core_minutes": ict_core_min, "command": ict_t["command"], **_rows(ict, ruler)}
    old = {r["name"]: r for r in previous.get("runs", [])}
    runs = []
    for name, (_, folder, work, _, _) in RUNS.items():
        if not (folder / "fewstep.json").exists():
            continue
        command = load_model(folder).config.training["command"]
        same = old.get(name, {})
        if same.get("run_command") == command and same.get("checkpoints") == [c.name for c in _checkpoints(work)]:
            runs.append(same)
            print(f"{name}: reused", flush=True)
        else:
            runs.append(_score_run(name, ruler, ict_per_step, s["ratio"]))
    result = {"command": "python bench/ect_cost.py score", "num": NUM, "seed": SEED,
              "features": ruler.name,
              "ruler": f"{ruler.name} features against all 3,655 emoji; spreads: bootstrap over the samples",
              "cores": os.cpu_count(), "step_seconds": s, "start": start, "ict": ict_row, "runs": runs}
    write_result(OUT, result)


if __name__ == "__main__":
    main(__doc__, list(RUNS), train_runs, score)
