"""The guided-distillation section of ``fewstep bench`` (Meng et al. 2023 on digits).

Measures, with the bench's ruler, sample count and seed:
- stage 1 (``digits-guided``): DPM-Solver++ at 4, 8 and 50 steps with the teacher's guidance scale, one
  network evaluation per step, against the teacher's CFG rows (two per step); target: FID at 50 steps
  within 5% of the teacher's at half the evaluations;
- stage 2 (``digits-progressive``): every step count it serves, deterministic DDIM and the stochastic
  sampler; target: FID at 4 and 2 steps ≤ 1.3× the teacher's 50-step FID; CD beside it;
- guidance still works: FID and conditional accuracy over s ∈ {1, 2, 3, 4} for the teacher (CFG), the
  stage-1 student and the 4-step student, at DPM-Solver++ 8 steps for the first two (the teacher's best
  few-step setting; 50 steps × 4 scales is most of an hour here) and half the sample count;
- editing in 2–4 steps: half-digit inpainting (unconditional, judged by the original label) and SDEdit
  img2img from rough strokes at strength 0.5, beside the CD student's zero-shot loop;
- speed of the rows above, side by side in this process.

``fewstep bench --only guided --reuse OLD/bench.json`` runs just this section and merges it into the
previous report (its other sections and their command/date stay as they were).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..editing.constraints import half_mask, rough_strokes
from ..editing.zero_shot import infer_labels, stroke
from ..eval.editing import accuracy, inpaint_metrics
from ..models.folders import load_model
from ..models.handle import Model
from ..sampling.generate import generate
from .format import acc, fid, ratio_cell, target_met, teacher_best
from .measure import quality_rows, speed_rows

GUIDED, PROGRESSIVE = "digits-guided", "digits-progressive"
SWEEP = (1.0, 2.0, 3.0, 4.0)


def measure(models_dir: Path, teacher: Model, ruler, settings, quality: dict[str, list[dict]],
            command: str = "") -> dict:
    """The section's numbers (empty when the models are not there)."""
    if not (models_dir / GUIDED).is_dir() or not (models_dir / PROGRESSIVE).is_dir():
        return {}
    from .pixel import training_cost

    s = teacher.config.default_guidance_scale
    num, seed = settings.num, settings.seed
    guided, prog = load_model(models_dir / GUIDED), load_model(models_dir / PROGRESSIVE)
    served = sorted(prog.config.serves_steps)
    out: dict = {"command": command, "guidance_scale": s, "num": num, "edit_num": settings.edit_num, "quality": {}, "sweep": {}, "editing": {},
                 "costs": {GUIDED: training_cost(guided), PROGRESSIVE: _progressive_cost(prog)}}
    key = f"{teacher.path.name}/dpmpp-2m"
    if 50 not in [r["steps"] for r in quality.get(key, [])]:
        out["quality"][key] = quality_rows(teacher, ruler, [4, 8, 50], "dpmpp-2m", s, num, seed, confidence=True)
    out["quality"][f"{GUIDED}/dpmpp-2m"] = quality_rows(guided, ruler, [4, 8, 50], "dpmpp-2m", s, num, seed, confidence=True)
    for sampler in ("ddim", "ddim-stochastic"):
        out["quality"][f"{PROGRESSIVE}/{sampler}"] = quality_rows(prog, ruler, served, sampler, s, num, seed, confidence=True)

    half = max(num // 2, 10)
    lo, hi = guided.config.guidance_range
    out["sweep_scales"] = scales = [v for v in SWEEP if lo <= v <= hi]  # the students refuse s outside their range
    for name, model, sampler, steps in ((teacher.path.name, teacher, "dpmpp-2m", 8), (GUIDED, guided, "dpmpp-2m", 8),
                                        (PROGRESSIVE, prog, "ddim", max(served))):
        out["sweep"][f"{name}/{sampler}/{steps}"] = [quality_rows(model, ruler, [steps], sampler, g, half, seed, confidence=True)[0] for g in scales]

    out["editing"] = _editing(models_dir, prog, ruler, settings)
    batch, repeats = settings.timing_batch, settings.timing_repeats
    speed = speed_rows(teacher, {"dpmpp-2m": (8, 50)}, batch, repeats)
    speed += speed_rows(guided, {"dpmpp-2m": (8, 50)}, batch, repeats)
    speed += speed_rows(prog, {"ddim": tuple(served)}, batch, repeats)
    out["speed"] = speed
    return out


def _progressive_cost(model: Model) -> dict:
    rounds = model.config.training.get("rounds", {})
    first = next(iter(rounds.values()), {})
    cfg = first.get("config", {})
    wall = model.config.training.get("wall_seconds")
    threads = model.config.training.get("threads", first.get("threads"))
    return {"method": "progressive", "rounds": len(rounds), "steps": cfg.get("max_steps"), "batch": cfg.get("batch_size"),
            "core_minutes": float("nan") if wall is None or threads is None else wall * threads / 60}


@torch.no_grad()
def _editing(models_dir: Path, prog: Model, ruler, settings) -> dict:
    g = torch.Generator().manual_seed(settings.seed)
    idx = torch.randperm(len(ruler.data), generator=g)[: settings.edit_num]
    images, labels = ruler.data.images[idx], ruler.data.labels[idx]
    known, strokes = half_mask(images.shape[-1], "bottom"), rough_strokes(images)
    clf = ruler.classifier
    out = {}
    guess = infer_labels(prog, images, known, seed=settings.seed)  # the 4-step student as its own classifier (s = 1)
    for n in sorted(prog.config.serves_steps):
        if n < 2:
            continue
        out[f"{PROGRESSIVE}/{n}"] = {
            "inpaint_accuracy": accuracy(clf, generate(prog, steps=n, seed=settings.seed, init_images=images, mask=known), labels),
            "label_inference_accuracy": float((guess == labels).float().mean()),
            "inpaint_accuracy_inferred_label": accuracy(clf, generate(
                prog, guess, steps=n, seed=settings.seed, init_images=images, mask=known), labels),
            "img2img_accuracy": accuracy(clf, generate(prog, steps=n, seed=settings.seed, init_images=strokes, strength=0.5), labels)}
    if (models_dir / "digits-cd").is_dir():
        cd = load_model(models_dir / "digits-cd")
        m = inpaint_metrics(cd, clf, images, labels, seed=settings.seed)
        out["digits-cd/zero-shot"] = {"inpaint_accuracy": m["accuracy"],
                                      "label_inference_accuracy": m["label_inference_accuracy"],
                                      "inpaint_accuracy_inferred_label": m["accuracy_inferred_label"],
                                      "img2img_accuracy": accuracy(clf, stroke(cd, strokes, 1.5, seed=settings.seed), labels)}
    out["strokes"] = {"img2img_accuracy": accuracy(clf, strokes, labels)}
    for k, v in out.items():
        print(f"editing {k}: {v}", flush=True)
    return out


def section(report) -> list[str]:
    """The BENCHMARKS.md section."""
    g = getattr(report, "guided", None) or {}
    if not g:
        return []
    teacher = report.settings["teacher"]
    q = {**report.quality, **g["quality"]}  # the teacher's rows are measured here unless the report's match
    tdpm = {r["steps"]: r for r in q.get(f"{teacher}/dpmpp-2m", [])}
    same = tdpm[50]                                  # stage 1's target is the teacher at the same setting
    where, best = teacher_best(q, teacher)          # every ratio is to the teacher's best
    guided = {r["steps"]: r for r in q[f"{GUIDED}/dpmpp-2m"]}
    cd = {r["steps"]: r for r in q.get("digits-cd/consistency", [])}
    s = g["guidance_scale"]
    cost_g, cost_p = g["costs"][GUIDED], g["costs"][PROGRESSIVE]
    lines = ["", "## Guided distillation (Meng et al. 2023)", "",
             (f"Written by `{g['command']}`. " if g.get("command") else "") +
             f"Guidance scale s = {s:g} throughout (the teacher's default), {g['num']} samples per point. Stage 1 "
             f"(`{GUIDED}`, {cost_g.get('steps')} steps × {cost_g.get('batch')}, {cost_g.get('core_minutes', float('nan')):.0f} "
             f"core-min) takes s as an input: one network evaluation per step where the teacher's CFG takes two. "
             f"Stage 2 (`{PROGRESSIVE}`, {cost_p.get('rounds')} rounds × {cost_p.get('steps')} steps × {cost_p.get('batch')}, "
             f"{cost_p.get('core_minutes', float('nan')):.0f} core-min) halves the DDIM steps each round, s still an input. "
             f"The teacher's best: FID {fid(best)} ({where}), its lowest over every sampler and step count measured; "
             f"ratios are to it. Targets: stage 1 at 50 steps within 5% of the teacher's 50-step FID at the same s "
             f"({same['fid']:.3f}); progressive at 4 and 2 steps FID ≤ 1.3× the teacher's best (≤ {1.3 * best['fid']:.3f}).",
             "",
             "| model | sampler | steps | NFE | FID | FID / teacher's best | cond. acc. | target |",
             "|---|---|---:|---:|---:|---:|---:|---|"]

    def row(name, sampler, r, target=""):
        lines.append(f"| {name} | {sampler} | {r['steps']} | {r['nfe']} | {fid(r)} | {ratio_cell(r, best)} | "
                     f"{acc(r)} | {target} |")

    for n in (4, 8, 50):
        if n in tdpm:
            row(f"{teacher} (CFG)", "dpmpp-2m", tdpm[n])
    for n, r in sorted(guided.items()):
        ok = "" if n != 50 else f"≤ {1.05 * same['fid']:.3f}: {target_met(r, same, 1.05)}"
        row(GUIDED, "dpmpp-2m", r, ok)
    for sampler in ("ddim", "ddim-stochastic"):
        for r in q[f"{PROGRESSIVE}/{sampler}"]:
            ok = f"≤ 1.3×: {target_met(r, best, 1.3)}" if r["steps"] in (2, 4) and sampler == "ddim" else ""
            row(PROGRESSIVE, sampler, r, ok)
    for n, r in sorted(cd.items()):
        row("digits-cd", "consistency", r)

    lines += ["", f"Guidance after distillation: FID and conditional accuracy against s, {max(g['num'] // 2, 10)} samples "
              "per point (teacher and stage 1 at DPM-Solver++ 8 steps, the 4-step student with DDIM).", "",
              "| model | " + " | ".join(f"s = {v:g}: FID / acc. / conf." for v in g["sweep_scales"]) + " |",
              "|---|" + "---|" * len(g["sweep_scales"])]
    for key, rows in g["sweep"].items():
        name, sampler, steps = key.split("/")
        lines.append(f"| {name} ({sampler}, {steps} steps) | " +
                     " | ".join(f"{fid(r)} / {acc(r)} / {r.get('confidence', float('nan')):.4f}"
                                for r in rows) + " |")

    e = g["editing"]
    lines += ["", f"Editing in a few steps (`fewstep edit --task inpaint|img2img --steps N`), {g['edit_num']} "
              "real digits, no label given: classifier accuracy on the original label after generating the bottom half "
              "(inpainting: the known half replaced into each x0-estimate before the DDIM step) and after SDEdit img2img "
              "of rough 2×2-block strokes at strength 0.5 (from σ at the middle of the N-step grid). digits-cd: its "
              "zero-shot loop (41 evaluations for inpainting; stroke editing from σ = 1.5). Label inference: the "
              "class whose one-step reconstruction of the known half is best (5 levels × 4 noises × 10 classes = 200 "
              "evaluations per image, `fewstep edit --infer-label`), then inpainting conditioned on it at s = 2.", "",
              "| model | inpaint acc. | label inferred by the model: inference acc. / inpaint acc. | "
              "img2img from strokes acc. |", "|---|---:|---|---:|"]
    for k, v in e.items():
        if k != "strokes":
            lines.append(f"| {k} | {v['inpaint_accuracy']:.3f} | {v.get('label_inference_accuracy', float('nan')):.3f} / "
                         f"{v.get('inpaint_accuracy_inferred_label', float('nan')):.3f} | {v['img2img_accuracy']:.3f} |")
    lines.append(f"| the strokes themselves | – | – | {e['strokes']['img2img_accuracy']:.3f} |")

    lines += ["", "Speed, measured side by side in this process (batch "
              f"{report.settings['timing_batch']}):", "",
              "| model | sampler | steps | NFE | ms / image | overhead over NFE × one evaluation |", "|---|---|---:|---:|---:|---:|"]
    for r in g["speed"]:
        lines.append(f"| {r['model']} | {r['sampler']} | {r['steps']} | {r['nfe']} | {1e3 * r['seconds_per_image']:.2f} | "
                     f"{r['overhead']:.2f}× |")
    return lines


