"""The latent-consistency section of ``fewstep bench`` (Luo et al. 2023 on the emoji pipeline).

Measures, with the emoji ruler (the feature network's features against all 3,655 emoji),
the bench's sample count and seed, prompts = the emoji's own captions:
- the teacher (``emoji-sd``) with classifier-free guidance, DDIM and DPM-Solver++ at 1, 2, 4, 8, 25 steps;
- the LCM (``emoji-lcm``) at 1, 2, 4, 8 steps at the same guidance scale (one evaluation per step);
  targets: 4-step FID ≤ 1.2× the teacher's 25-step DPM-Solver++, caption-class accuracy within 3 points;
- wall-clock per image, side by side in this process at one batch: the LCM at 4 steps against the
  teacher's cheapest DPM-Solver++ setting that matches its FID (or the teacher's 25 steps if none does),
  end to end (text encoder + sampling + VAE decoder) and for the UNet sampling alone;
- LCD ablations and LCF, rendered from ``bench/results/lcm_ablation.json`` when ``bench/lcm_ablation.py``
  has written it (its own command, budget and sample count): FID at 4 steps per skipping step k,
  teacher solver and guidance range.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..eval.evaluate import ruler_for
from ..models.folders import load_model
from .format import acc, fid, ratio_cell, target_met, teacher_best, verdict
from .measure import quality_rows, sample_run, side_by_side
from .results import OLD_FEATURES, features_of

TEACHER, LCM = "emoji-sd", "emoji-lcm"
TEACHER_STEPS = (1, 2, 4, 8, 25)
LCM_STEPS = (1, 2, 4, 8)
_LOWER = {"wins": "lower by more than the spread", "loses": "higher by more than the spread"}
ABLATION, DRIFT = "lcm_ablation.json", "lcd_drift.json"   # written by bench/lcm_ablation.py, bench/lcd_drift.py


def measure(models_dir: Path, settings, command: str = "") -> dict:
    """The section's numbers (empty when the emoji models are not there)."""
    if not (models_dir / TEACHER).is_dir() or not (models_dir / LCM).is_dir():
        return {}
    teacher, lcm = load_model(models_dir / TEACHER), load_model(models_dir / LCM)
    ruler = ruler_for(teacher, models_dir)
    s = lcm.config.default_guidance_scale
    num, seed = settings.num, settings.seed
    out: dict = {"command": command, "features": ruler.name, "guidance_scale": s, "num": num, "quality": {}, "teacher_training": teacher.config.training,
                 "lcm_training": lcm.config.training}
    for sampler in ("ddim", "dpmpp-2m"):
        out["quality"][f"{TEACHER}/{sampler}"] = quality_rows(teacher, ruler, TEACHER_STEPS, sampler, s, num, seed)
    out["quality"][f"{LCM}/consistency"] = quality_rows(lcm, ruler, LCM_STEPS, "consistency", s, num, seed)

    lcm4 = next(r for r in out["quality"][f"{LCM}/consistency"] if r["steps"] == 4)
    dpm = out["quality"][f"{TEACHER}/dpmpp-2m"]
    match = next((r for r in dpm if r["fid"] <= lcm4["fid"]), dpm[-1])
    batch, repeats = settings.timing_batch, settings.timing_repeats
    out["speed"] = []
    for unet_only in (False, True):
        t_teacher, t_lcm = side_by_side([sample_run(teacher, match["steps"], "dpmpp-2m", s, batch, unet_only),
                                         sample_run(lcm, 4, "consistency", s, batch, unet_only)], batch, repeats)
        out["speed"].append({"what": "sampling loop only" if unet_only else "end to end", "batch": batch,
                             "teacher_steps": match["steps"], "teacher_fid": match["fid"], "teacher_seconds": t_teacher,
                             "lcm_steps": 4, "lcm_fid": lcm4["fid"], "lcm_seconds": t_lcm, "speedup": t_teacher / t_lcm})
        print(f"speed ({out['speed'][-1]['what']}): teacher DPM++ {match['steps']} steps {1e3 * t_teacher:.2f} ms/img, "
              f"LCM 4 steps {1e3 * t_lcm:.2f} ms/img: {t_teacher / t_lcm:.1f}×", flush=True)
    return out


def section(report, results: Path) -> list[str]:
    """The BENCHMARKS.md section."""
    g = getattr(report, "latent", None) or {}
    if not g:
        return []
    q, s = g["quality"], g["guidance_scale"]
    dpm = {r["steps"]: r for r in q[f"{TEACHER}/dpmpp-2m"]}
    ddim = {r["steps"]: r for r in q[f"{TEACHER}/ddim"]}
    lcm = {r["steps"]: r for r in q[f"{LCM}/consistency"]}
    where, ref = teacher_best(q, TEACHER)           # every ratio is to the teacher's best
    tt, lt = g.get("teacher_training", {}), g.get("lcm_training", {})
    lines = ["", "## Latent consistency models (Luo et al. 2023) on the emoji pipeline", "",
             (f"Written by `{g['command']}`. " if g.get("command") else "") +
             f"Teacher `{TEACHER}`: a tiny Stable-Diffusion-format pipeline trained here "
             f"({tt.get('wall_seconds', 0) / 60:.0f} min, `{tt.get('command', '')}`). LCM `{LCM}`: LCD from it "
             f"(`{lt.get('command', '')}`, {lt.get('wall_seconds', 0) / 60:.0f} min on {lt.get('threads', '?')} thread(s)). "
             f"Guidance scale s = {s:g} for every row; {g['num']} samples per point, prompts = the emoji's own captions; "
             f"FID on the features of `{features_of(g)}` against all 3,655 emoji; accuracy = the sample is classified into "
             f"its caption's Unicode group. The teacher's best: FID {fid(ref)} ({where}), its lowest over every sampler and "
             f"step count measured. Targets: LCM 4-step FID ≤ 1.2× the teacher's best (≤ {1.2 * ref['fid']:.3f}); "
             f"accuracy within 3 points of it ({ref['cond_accuracy']:.3f}).", "",
             "| steps | teacher DDIM FID / acc. (NFE) | teacher DPM-Solver++ FID / acc. (NFE) | LCM FID / acc. (NFE) | LCM / teacher's best |",
             "|---:|---|---|---|---:|"]
    for n in sorted(set(dpm) | set(lcm)):
        cell = lambda r: f"{fid(r)} / {acc(r)} ({r['nfe']})" if r else "–"  # noqa: E731
        ratio = ratio_cell(lcm[n], ref) if n in lcm else "–"
        lines.append(f"| {n} | {cell(ddim.get(n))} | {cell(dpm.get(n))} | {cell(lcm.get(n))} | {ratio} |")
    if 4 in lcm:
        ok_acc = abs(lcm[4]["cond_accuracy"] - ref["cond_accuracy"]) <= 0.03
        lines += ["", f"LCM at 4 steps: FID {fid(lcm[4])} = {ratio_cell(lcm[4], ref)} the teacher's best "
                  f"(≤ 1.2×: {target_met(lcm[4], ref, 1.2)}; {verdict(lcm[4], ref)} against it); accuracy {lcm[4]['cond_accuracy']:.3f} vs "
                  f"{acc(ref)} ({'met' if ok_acc else 'missed'})."]
    lines += ["", "Wall-clock, measured side by side in this process: the LCM at 4 steps against the teacher's cheapest "
              "DPM-Solver++ setting whose FID is at most the LCM's (its 25 steps if none is); the teacher runs CFG "
              "(two UNet passes per step in one batch).", "",
              "| what | batch | teacher (steps, FID) | teacher ms / image | LCM (steps, FID) | LCM ms / image | speedup |",
              "|---|---:|---|---:|---|---:|---:|"]
    for r in g["speed"]:
        lines.append(f"| {r['what']} | {r['batch']} | DPM-Solver++ {r['teacher_steps']}, {r['teacher_fid']:.3f} | "
                     f"{1e3 * r['teacher_seconds']:.2f} | {r['lcm_steps']}, {r['lcm_fid']:.3f} | {1e3 * r['lcm_seconds']:.2f} | "
                     f"{r['speedup']:.1f}× |")
    lines += ablation_section(_read(results / ABLATION))
    lines += drift_section(_read(results / DRIFT))
    return lines


def ablation_section(ab: dict | None) -> list[str]:
    if not ab:
        return ["", "LCD ablations (skipping step, teacher solver, guidance range) and LCF: not measured yet "
                "(`python bench/lcm_ablation.py` writes them)."]
    lines = ["", f"### LCD ablations ({ab['budget']})", "", f"Written by `{ab['command']}`. FID at 4 steps, "
             f"{ab['num']} samples, s = {ab['guidance_scale']:g}{_ruler_note(ab)}.", "", "| run | k | solver | guidance range | FID @4 | acc. @4 |",
             "|---|---:|---|---|---:|---:|"]
    for r in ab["runs"]:
        lines.append(f"| {r['name']} | {r['skip']} | {r['solver']} | {r['guidance_min']:g}–{r['guidance_max']:g} | "
                     f"{fid(r)} | {acc(r)} |")
    if ab.get("lcf"):
        f = ab["lcf"]
        before, after = ({"fid": v} if isinstance(v, float) else v for v in (f["before"], f["after"]))  # old files: bare FIDs
        lines += ["", f"LCF: `{LCM}` fine-tuned with no teacher on {f['subset']} ({f['size']} emoji, {f['steps']} steps): "
                  f"4-step FID on that subset {fid(before)} → {fid(after)} ({_LOWER.get(verdict(after, before), verdict(after, before))})."]
    return lines


def drift_section(d: dict | None) -> list[str]:
    """FID along training of the reference LCD run and three changes (``bench/lcd_drift.py``)."""
    if not d:
        return []
    steps = [p["step"] for p in d["runs"][0]["points"]]
    lines = ["", f"### LCD drift along training ({d['budget']})", "",
             f"Written by `{d['command']}`. Each run is `{LCM}`'s recipe with one change, trained on through the listed "
             f"step counts (resumed, constant lr); FID at 4 / 2 steps, {d['num']} samples, s = {d['guidance_scale']:g}"
             f"{_ruler_note(d)}.", "",
             "| run | change | lr | " + " | ".join(f"{n:,} steps" for n in steps) + " |",
             "|---|---|---:|" + "---|" * len(steps)]
    for r in d["runs"]:
        change = ", ".join(f"{k} = {v}" for k, v in r["change"].items()) or "—"
        cells = {p["step"]: f"{p['fid_4']:.3f} / {p['fid_2']:.3f}" for p in r["points"]}
        lr = f"{r['lr']:.0e}".replace("e-0", "e-")    # 1e-4, 2e-5
        lines.append(f"| {r['name']} | {change} | {lr} | " + " | ".join(cells.get(n, "–") for n in steps) + " |")
    return lines


def _ruler_note(results: dict) -> str:
    """Which features scored an ablation script's FIDs, where they are not the feature network's."""
    name = features_of(results)
    return (f"; scored on `{name}`'s features, before the feature network: comparable within this table, not with "
            f"the one above") if name == OLD_FEATURES else f"; FID on `{name}`"


def _read(path: Path) -> dict | None:
    """An ablation script's results, when it has written them beside bench.json."""
    return json.loads(path.read_text()) if path.exists() else None
