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

from dataclasses import asdict
from pathlib import Path

import torch

from .evaluate import balanced_labels, evaluate
from .models import LoadedModel, load_model

GUIDED, PROGRESSIVE = "digits-guided", "digits-progressive"
SWEEP = (1.0, 2.0, 3.0, 4.0)


def _rows(model: LoadedModel, ruler, steps: list[int], sampler: str, guidance: float, num: int, seed: int) -> list[dict]:
    """Evaluation rows, plus the classifier's mean probability of the requested label ("confidence"), which
    keeps moving with s after accuracy saturates at 1."""
    rows, samples = evaluate(model, ruler, steps, sampler, guidance, num, seed)
    labels = balanced_labels(model, num)
    out = []
    for r in rows:
        probs = ruler.classifier.predict(samples[r.steps].clamp(-1, 1))
        out.append({**asdict(r), "confidence": float(probs.gather(1, labels[:, None]).mean())})
        print(f"{model.path.name:<20} {sampler:<15} s={guidance:g} steps {r.steps:>3} NFE {r.nfe:>3}  FID {r.fid:7.3f}  "
              f"acc {r.cond_accuracy:.3f}  conf {out[-1]['confidence']:.4f}", flush=True)
    return out


def measure(models_dir: Path, teacher: LoadedModel, ruler, settings, quality: dict[str, list[dict]],
            command: str = "") -> dict:
    """The section's numbers (empty when the models are not there)."""
    if not (models_dir / GUIDED).is_dir() or not (models_dir / PROGRESSIVE).is_dir():
        return {}
    from .bench import _speed_rows, training_cost

    s = teacher.config.default_guidance_scale
    num, seed = settings.num, settings.seed
    guided, prog = load_model(models_dir / GUIDED), load_model(models_dir / PROGRESSIVE)
    served = sorted(prog.config.serves_steps)
    out: dict = {"command": command, "guidance_scale": s, "num": num, "edit_num": settings.edit_num, "quality": {}, "sweep": {}, "editing": {},
                 "costs": {GUIDED: training_cost(guided), PROGRESSIVE: _progressive_cost(prog)}}
    key = f"{teacher.path.name}/dpmpp-2m"
    if 50 not in [r["steps"] for r in quality.get(key, [])]:
        out["quality"][key] = _rows(teacher, ruler, [4, 8, 50], "dpmpp-2m", s, num, seed)
    out["quality"][f"{GUIDED}/dpmpp-2m"] = _rows(guided, ruler, [4, 8, 50], "dpmpp-2m", s, num, seed)
    for sampler in ("ddim", "ddim-stochastic"):
        out["quality"][f"{PROGRESSIVE}/{sampler}"] = _rows(prog, ruler, served, sampler, s, num, seed)

    half = max(num // 2, 10)
    from .guided import guidance_range
    lo, hi = guidance_range(guided.config)
    out["sweep_scales"] = scales = [v for v in SWEEP if lo <= v <= hi]  # the students refuse s outside their range
    for name, model, sampler, steps in ((teacher.path.name, teacher, "dpmpp-2m", 8), (GUIDED, guided, "dpmpp-2m", 8),
                                        (PROGRESSIVE, prog, "ddim", max(served))):
        out["sweep"][f"{name}/{sampler}/{steps}"] = [_rows(model, ruler, [steps], sampler, g, half, seed)[0] for g in scales]

    out["editing"] = _editing(models_dir, prog, ruler, settings)
    speed = _speed_rows(teacher, {"dpmpp-2m": (8, 50)}, settings)
    speed += _speed_rows(guided, {"dpmpp-2m": (8, 50)}, settings)
    speed += _speed_rows(prog, {"ddim": tuple(served)}, settings)
    out["speed"] = speed
    return out


def _progressive_cost(model: LoadedModel) -> dict:
    rounds = model.config.training.get("rounds", {})
    first = next(iter(rounds.values()), {})
    cfg = first.get("config", {})
    wall = model.config.training.get("wall_seconds")
    threads = model.config.training.get("threads", first.get("threads"))
    return {"method": "progressive", "rounds": len(rounds), "steps": cfg.get("max_steps"), "batch": cfg.get("batch_size"),
            "core_minutes": float("nan") if wall is None or threads is None else wall * threads / 60}


@torch.no_grad()
def _editing(models_dir: Path, prog: LoadedModel, ruler, settings) -> dict:
    from . import sampler_editing
    from .editing import _accuracy, half_mask, infer_labels, inpaint_metrics, rough_strokes, stroke

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
            "inpaint_accuracy": _accuracy(clf, sampler_editing.inpaint(prog, images, known, n, seed=settings.seed), labels),
            "label_inference_accuracy": float((guess == labels).float().mean()),
            "inpaint_accuracy_inferred_label": _accuracy(clf, sampler_editing.inpaint(
                prog, images, known, n, labels=guess, seed=settings.seed), labels),
            "img2img_accuracy": _accuracy(clf, sampler_editing.img2img(prog, strokes, 0.5, n, seed=settings.seed), labels)}
    if (models_dir / "digits-cd").is_dir():
        cd = load_model(models_dir / "digits-cd")
        m = inpaint_metrics(cd, clf, images, labels, seed=settings.seed)
        out["digits-cd/zero-shot"] = {"inpaint_accuracy": m["accuracy"],
                                      "label_inference_accuracy": m["label_inference_accuracy"],
                                      "inpaint_accuracy_inferred_label": m["accuracy_inferred_label"],
                                      "img2img_accuracy": _accuracy(clf, stroke(cd, strokes, 1.5, seed=settings.seed), labels)}
    out["strokes"] = {"img2img_accuracy": _accuracy(clf, strokes, labels)}
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
    best = tdpm[50]
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
             f"Targets: stage 1 at 50 steps within 5% of the teacher's FID at the same s; progressive at 4 and 2 steps "
             f"FID ≤ 1.3× the teacher's 50-step FID ({best['fid']:.3f}, i.e. ≤ {1.3 * best['fid']:.3f}).", "",
             "| model | sampler | steps | NFE | FID | FID / teacher 50-step | cond. acc. | target |",
             "|---|---|---:|---:|---:|---:|---:|---|"]

    def row(name, sampler, r, target=""):
        lines.append(f"| {name} | {sampler} | {r['steps']} | {r['nfe']} | {r['fid']:.3f} | {r['fid'] / best['fid']:.2f} | "
                     f"{r['cond_accuracy']:.3f} | {target} |")

    for n in (4, 8, 50):
        if n in tdpm:
            row(f"{teacher} (CFG)", "dpmpp-2m", tdpm[n])
    for n, r in sorted(guided.items()):
        ok = "" if n != 50 else ("met" if r["fid"] <= 1.05 * best["fid"] else "missed") + f" (≤ {1.05 * best['fid']:.3f})"
        row(GUIDED, "dpmpp-2m", r, ok)
    for sampler in ("ddim", "ddim-stochastic"):
        for r in q[f"{PROGRESSIVE}/{sampler}"]:
            ok = ("met" if r["fid"] <= 1.3 * best["fid"] else "missed") if r["steps"] in (2, 4) and sampler == "ddim" else ""
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
                     " | ".join(f"{r['fid']:.3f} / {r['cond_accuracy']:.3f} / {r.get('confidence', float('nan')):.4f}"
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


# --- guided distillation on the emoji pipeline (latent space, text prompts) --------------------------
EMOJI_TEACHER, EMOJI_GUIDED, EMOJI_PROGRESSIVE, EMOJI_LCM = "emoji-sd", "emoji-guided", "emoji-progressive", "emoji-lcm"
LATENT_STEPS, FEW_STEPS, LATENT_SWEEP = (8, 25), (4, 2, 1), (1.0, 2.0, 3.0, 4.0, 6.0)


def measure_latent(models_dir: Path, settings, command: str = "", teacher_rows: dict | None = None) -> dict:
    """Guided distillation on ``emoji-sd`` (``fewstep bench --only guided-latent``): the stage-1 student at 8
    and 25 DPM-Solver++ steps beside the teacher's CFG at its default s (target: 25-step FID within 5% at half
    the UNet passes); the progressive students (DDIM and the stochastic sampler) beside the LCM at 4, 2, 1
    steps; FID and accuracy over s at half the sample count (stage 1 at 8 steps, the 4-step progressive
    student, the teacher at 8); wall-clock per image side by side (end to end and the sampling loop alone).
    ``teacher_rows``: the latent section's teacher rows by sampler, reused when they hold these step counts."""
    from .evaluate import ruler_for
    from .latent_bench import _rows, latent_run, side_by_side
    from .sd import load_latent_model

    if not (models_dir / EMOJI_TEACHER).is_dir() or not (models_dir / EMOJI_GUIDED).is_dir():
        return {}
    teacher, guided = load_latent_model(models_dir / EMOJI_TEACHER), load_latent_model(models_dir / EMOJI_GUIDED)
    optional = {n: load_latent_model(models_dir / n) for n in (EMOJI_PROGRESSIVE, EMOJI_LCM) if (models_dir / n).is_dir()}
    ruler = ruler_for(teacher, models_dir)
    s, num, seed = teacher.default_guidance_scale, settings.num, settings.seed
    out: dict = {"command": command, "guidance_scale": s, "num": num, "quality": {}, "sweep": {},
                 "training": guided.info.get("training", {})}
    reused = [r for r in (teacher_rows or {}).get("dpmpp-2m", []) if r["steps"] in LATENT_STEPS]
    out["quality"][f"{EMOJI_TEACHER}/dpmpp-2m"] = (reused if len(reused) == len(LATENT_STEPS) and
                                                   (teacher_rows or {}).get("num") == num else
                                                   _rows(teacher, ruler, LATENT_STEPS, "dpmpp-2m", s, num, seed))
    out["quality"][f"{EMOJI_GUIDED}/dpmpp-2m"] = _rows(guided, ruler, LATENT_STEPS, "dpmpp-2m", s, num, seed)
    runs = [(EMOJI_TEACHER, teacher, 25, "dpmpp-2m"), (EMOJI_GUIDED, guided, 25, "dpmpp-2m")]   # timed
    sweep = [(EMOJI_TEACHER, teacher, 8, "dpmpp-2m"), (EMOJI_GUIDED, guided, 8, "dpmpp-2m")]  # over s
    if EMOJI_PROGRESSIVE in optional:
        progressive = optional[EMOJI_PROGRESSIVE]
        serves = [n for n in FEW_STEPS if n in progressive.info["serves_steps"]]
        for sampler in ("ddim", "ddim-stochastic"):
            out["quality"][f"{EMOJI_PROGRESSIVE}/{sampler}"] = _rows(progressive, ruler, serves, sampler, s, num, seed)
        out["progressive_training"] = progressive.info.get("training", {})
        runs.append((EMOJI_PROGRESSIVE, progressive, progressive.default_steps, "ddim"))
        sweep.append((EMOJI_PROGRESSIVE, progressive, progressive.default_steps, "ddim"))
    if EMOJI_LCM in optional:
        out["quality"][f"{EMOJI_LCM}/consistency"] = _rows(optional[EMOJI_LCM], ruler, FEW_STEPS, "consistency", s, num, seed)
        runs.append((EMOJI_LCM, optional[EMOJI_LCM], 4, "consistency"))
    lo, hi = guided.info["guidance_range"]
    out["sweep_scales"] = scales = [v for v in LATENT_SWEEP if lo <= v <= hi]
    half = max(num // 2, 10)
    for name, model, steps, sampler in sweep:
        out["sweep"][name] = {"steps": steps, "sampler": sampler,
                              "rows": [_rows(model, ruler, (steps,), sampler, v, half, seed)[0] for v in scales]}
    batch = settings.timing_batch
    out["speed"] = [{"model": name, "steps": steps, "sampler": sampler, "batch": batch} for name, _, steps, sampler in runs]
    for key, unet_only in (("seconds", False), ("loop_seconds", True)):
        times = side_by_side([latent_run(m, steps, sampler, s, batch, unet_only) for _, m, steps, sampler in runs],
                             batch, settings.timing_repeats)
        for row, t in zip(out["speed"], times):
            row[key] = t
    for row in out["speed"]:
        print(f"speed {row['model']} {row['steps']} steps: {1e3 * row['seconds']:.2f} ms/img end to end, "
              f"{1e3 * row['loop_seconds']:.2f} sampling loop", flush=True)
    return out


def latent_section(report) -> list[str]:
    """The BENCHMARKS.md subsection of :func:`measure_latent`."""
    g = getattr(report, "guided_latent", None) or {}
    if not g:
        return []
    q, s, tr = g["quality"], g["guidance_scale"], g.get("training", {})
    teacher = {r["steps"]: r for r in q[f"{EMOJI_TEACHER}/dpmpp-2m"]}
    student = {r["steps"]: r for r in q[f"{EMOJI_GUIDED}/dpmpp-2m"]}
    lines = ["", "### On the emoji pipeline (latent space, text prompts)", "",
             (f"Written by `{g['command']}`. " if g.get("command") else "") +
             f"Stage 1 `{EMOJI_GUIDED}`: `{tr.get('command', '')}` ({tr.get('wall_seconds', 0) / 60:.0f} min on "
             f"{tr.get('threads', '?')} thread(s)); the teacher's UNet with diffusers' `time_cond_proj_dim` w-input, "
             f"saved as a `StableDiffusionPipeline` (which then feeds ψ(s − 1) and skips CFG). s = {s:g}, {g['num']} "
             f"samples per point, prompts = the emoji's own captions; FID on the emoji classifier's features. "
             f"Target: 25-step FID within 5% of the teacher's at half the UNet passes.", "",
             "| model | sampler | steps | UNet passes | FID | FID / teacher same steps | acc. | target |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for name, rows in ((f"{EMOJI_TEACHER} (CFG)", teacher), (EMOJI_GUIDED, student)):
        for n, r in sorted(rows.items()):
            ratio = r["fid"] / teacher[n]["fid"] if n in teacher else float("nan")
            ok = ("met" if ratio <= 1.05 else "missed") + " (≤ 1.05)" if rows is student and n == 25 else ""
            lines.append(f"| {name} | dpmpp-2m | {n} | {r['nfe']} | {r['fid']:.3f} | {ratio:.2f} | "
                         f"{r['cond_accuracy']:.3f} | {ok} |")
    few = [k for k in q if k.startswith((f"{EMOJI_PROGRESSIVE}/", f"{EMOJI_LCM}/"))]
    if few:
        pt = g.get("progressive_training", {})
        ref = teacher[25]["fid"]
        lines += ["", f"Progressive distillation of `{EMOJI_GUIDED}` (`{EMOJI_PROGRESSIVE}`: `{pt.get('command', '')}`, "
                  f"{pt.get('wall_seconds', 0) / 60:.0f} min) beside latent consistency distillation (`{EMOJI_LCM}`) at "
                  f"the same step counts, s = {s:g}; the teacher's 25-step FID (CFG, 50 UNet passes) is {ref:.3f}.", "",
                  "| model | sampler | steps | UNet passes | FID | FID / teacher 25-step | acc. |", "|---|---|---:|---:|---:|---:|---:|"]
        for key in few:
            name, sampler = key.split("/")
            for r in q[key]:
                lines.append(f"| {name} | {sampler} | {r['steps']} | {r['nfe']} | {r['fid']:.3f} | {r['fid'] / ref:.2f} | "
                             f"{r['cond_accuracy']:.3f} |")
    lines += ["", f"Guidance after distillation ({max(g['num'] // 2, 10)} samples per point): FID / caption-group "
              "accuracy against s.", "",
              "| model | " + " | ".join(f"s = {v:g}" for v in g["sweep_scales"]) + " |",
              "|---|" + "---|" * len(g["sweep_scales"])]
    for name, sw in g["sweep"].items():
        lines.append(f"| {name} ({sw['sampler']}, {sw['steps']} steps) | "
                     + " | ".join(f"{r['fid']:.3f} / {r['cond_accuracy']:.3f}" for r in sw["rows"]) + " |")
    base = g["speed"][0]
    lines += ["", f"Wall-clock per image, side by side in this process (batch {base['batch']}; the models' runs "
              "interleaved, median of each); speedup against the teacher's 25 CFG steps:", "",
              "| model | sampler | steps | end to end ms / image | speedup | sampling loop ms / image | speedup |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for r in g["speed"]:
        lines.append(f"| {r['model']} | {r['sampler']} | {r['steps']} | {1e3 * r['seconds']:.2f} | "
                     f"{base['seconds'] / r['seconds']:.2f}× | {1e3 * r['loop_seconds']:.2f} | "
                     f"{base['loop_seconds'] / r['loop_seconds']:.2f}× |")
    return lines
