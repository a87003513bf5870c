"""ECT's FID against its training cost beside iCT's (``bench/ect_cost.py`` → ``bench/results/ect_cost.json``):
the section of BENCHMARKS.md and the claim "ECT reaches iCT's 2-step FID at a fraction of its cost" (Geng et al.
2024), both computed from that file when rendering, never typed."""

from __future__ import annotations

import json
from pathlib import Path

from .format import fid, verdict
from .results import features_of

RESULT = "ect_cost.json"
FRACTION = 4            # the target: iCT's 2-step FID at ≤ 1/4 of its cost


def _read(results: Path) -> dict | None:
    path = results / RESULT
    return json.loads(path.read_text()) if path.exists() else None


def _at(row: dict, steps: int, key: str = "fid") -> dict:
    """A point's FID (or accuracy) at ``steps`` as a row the formatters take (value and spread)."""
    return {"fid": row.get(f"{key}_{steps}"), "fid_std": row.get(f"{key}_{steps}_std")}


def _acc(row: dict, steps: int) -> str:
    value, std = row.get(f"acc_{steps}"), row.get(f"acc_{steps}_std")
    return "–" if value is None else f"{value:.3f}" + ("" if std is None else f" ± {std:.3f}")


def _minutes(p: dict) -> str:
    return "–" if p.get("cpu_minutes") is None else f"{p['cpu_minutes']:.1f}"


def _name(run: dict) -> str:
    return f"{run['name']}{' (shipped)' if run.get('shipped') else ''}"


def section(results: Path) -> list[str]:
    d = _read(results)
    if not d:
        return []
    ict, s, start = d["ict"], d["step_seconds"], d["start"]
    lines = ["", "### ECT's FID against its training cost, beside iCT's", "",
             f"Written by `{d['command']}`. ECT runs tuned from `emoji-pixel-teacher`, at each checkpoint (EMA weights; "
             "step 0 is the teacher's weights as a consistency model, the runs' common start), beside `emoji-pixel-ict` "
             f"scored in the same process: {d['num']} samples, seed {d['seed']}, {d['ruler']}. ECT's 2-step grid is its "
             "reference's [80, 0.821, 0] (ct_train.py --mid_t 0.821), iCT's the default Karras grid. Cost: wall-clock × "
             f"torch threads to the checkpoint, an upper bound (the {d['cores']} cores were shared with other training "
             "runs; load below); CPU: the CPU time the training process had used at the checkpoint (utime + stime, "
             f"start-up included); iCT-equivalent: steps × iCT's {ict['core_minutes'] / ict['steps']:.3f} core-min per "
             f"step × {s['ratio']:.2f}, one ECT step's time over one iCT step's (same UNet and batch, timed alternately "
             f"on the loaded machine: {s['ect']:.1f} s vs {s['ict']:.1f} s; both are one forward with and one without "
             "gradients, so the ratio is ≈ 1 up to that noise).", ""]
    for run in d["runs"]:
        load = run.get("load_average")
        note = f"; {run['note']}" if run.get("note") else ""
        lines.append(f"- `{_name(run)}`: `{run['run_command']}` ({run['threads']} torch thread(s){note}"
                     + (f"; 1-minute load average {load['mean_1min']:.1f} on average, at most {load['max_1min']:.1f}"
                        if load else "") + ")")
    lines += ["", "| run | steps × batch | cost (core-min, wall × threads) | CPU (min) | iCT-equivalent (core-min) | "
              "FID 1 step | FID 2 steps | acc. 1 step | acc. 2 steps | 2-step FID vs iCT |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]

    def row(name: str, p: dict, batch) -> str:
        versus = verdict(_at(p, 2), _at(ict, 2)).replace("wins", "lower").replace("loses", "higher")
        return (f"| {name} | {p['step']} × {batch} | {p['core_minutes']:.1f} | {_minutes(p)} | "
                f"{p['ict_equivalent_core_minutes']:.1f} | {fid(_at(p, 1))} | {fid(_at(p, 2))} | {_acc(p, 1)} | "
                f"{_acc(p, 2)} | {versus} |")

    batch = d["runs"][0]["batch"] if d["runs"] else "–"
    lines.append(row("start (the teacher's weights)", start, batch))
    for run in d["runs"]:
        lines += [row(_name(run), p, run["batch"]) for p in run["points"]]
    lines.append(f"| emoji-pixel-ict | {ict['steps']} × {ict['batch']} | {ict['core_minutes']:.1f} | – | "
                 f"{ict['core_minutes']:.1f} | {fid(_at(ict, 1))} | {fid(_at(ict, 2))} | {_acc(ict, 1)} | {_acc(ict, 2)} | – |")
    for run in d["runs"]:
        last = run["points"][-1] if run["points"] else {}
        if "fid_2_karras_grid" in last:
            lines += ["", f"`{run['name']}` at step {last['step']} sampled in 2 steps on iCT's grid {last['karras_grid']} "
                      f"instead: FID {fid({'fid': last['fid_2_karras_grid'], 'fid_std': last['fid_2_karras_grid_std']})} "
                      f"(vs {fid(_at(last, 2))} on its own)."]
    return lines


def claim(results: Path):
    """(claim, paper, fewstep, section, here) for BENCHMARKS.md's claims table, or None before the bench ran.
    Holds where the cheapest ECT checkpoint (of any run) whose 2-step FID is at most iCT's costs ≤ 1/4 of iCT's
    core-minutes (wall × threads, the upper bound); where only the compute measures (CPU time, iCT-equivalent) meet
    it, it says so. The shipped model's own 2-step FID is named beside it."""
    d = _read(results)
    if not d:
        return None
    ict = d["ict"]
    budget = ict["core_minutes"] / FRACTION
    trained = [(run, p) for run in d["runs"] for p in run["points"] if p["step"] > 0]
    reached = [(run, p) for run, p in trained if p["fid_2"] <= ict["fid_2"]]
    name = f"ECT reaches iCT's 2-step FID at ≤ 1/{FRACTION} of its cost (emoji pixel)"
    paper = ("CIFAR-10: ECT 2-step FID 2.73 in 1 A100-hour, matching CD's hundreds of GPU-hours (Geng et al. 2024); "
             "iCT 2.46 after 400k × 1024 images")
    notes = f"; the teacher's weights alone (0 steps): {fid(_at(d['start'], 2))}"
    shipped = next((run for run in d["runs"] if run.get("shipped") and run["points"]), None)
    if shipped:
        last = shipped["points"][-1]
        notes += (f"; the shipped `{shipped['name']}` ({last['step']} steps): {fid(_at(last, 2))} at 2 steps, "
                  f"{fid(_at(last, 1))} at 1 (iCT {fid(_at(ict, 1))})")
    if not reached:
        run, best = min(trained, key=lambda rp: rp[1]["fid_2"]) if trained else (None, None)
        ours = (f"best ECT 2-step {fid(_at(best, 2))} ({run['name']}, {best['step']} steps, {best['core_minutes']:.1f} "
                f"core-min) vs iCT {fid(_at(ict, 2))} at {ict['core_minutes']:.1f}" if best else "no ECT checkpoint") + notes
        return name, paper, ours, _where(d), "does not hold (ECT's 2-step FID stays above iCT's)"
    run, p = min(reached, key=lambda rp: rp[1]["core_minutes"])
    cpu = "" if p.get("cpu_minutes") is None else f"CPU {p['cpu_minutes']:.1f}, "
    ours = (f"ECT {fid(_at(p, 2))} after {p['step']} × {run['batch']} steps ({run['name']}), {p['core_minutes']:.1f} "
            f"core-min ({cpu}iCT-equivalent {p['ict_equivalent_core_minutes']:.1f}) vs iCT {fid(_at(ict, 2))} at "
            f"{ict['core_minutes']:.1f} core-min ({verdict(_at(p, 2), _at(ict, 2))})" + notes)
    same = "" if verdict(_at(p, 2), _at(ict, 2)) == "wins" else "; equal within the spread"
    if p["core_minutes"] <= budget:
        here = f"holds ({p['core_minutes'] / ict['core_minutes']:.2f}× iCT's cost{same})"
    elif p["ict_equivalent_core_minutes"] <= budget and (p.get("cpu_minutes") is None or p["cpu_minutes"] <= budget):
        here = (f"holds in compute (iCT-equivalent {p['ict_equivalent_core_minutes'] / ict['core_minutes']:.2f}×"
                + ("" if p.get("cpu_minutes") is None else f", CPU time {p['cpu_minutes'] / ict['core_minutes']:.2f}×")
                + f"), not in the loaded machine's wall-clock × threads ({p['core_minutes'] / ict['core_minutes']:.2f}×)")
    else:
        here = f"does not hold ({p['core_minutes'] / ict['core_minutes']:.2f}× iCT's cost)"
    return name, paper, ours, _where(d), here


def _where(d: dict) -> str:
    """The claim's section, with the network its FIDs were scored on where that is not the emoji ruler's now."""
    features = features_of(d)
    return "ECT's cost" if features == "emoji-features" else (
        f"ECT's cost (scored on `{features}`'s features, before `emoji-features`: its runs' checkpoints are not kept)")
