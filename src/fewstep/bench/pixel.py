"""The digits section of ``fewstep bench``: the teacher with each ODE solver at 1 … 50 steps (classifier-free
guidance on) and every distilled pixel model beside it, scored by the same ruler with the same labels,
seeds and sample count; zero-shot editing; speed side by side; the speedup at matched quality (for each
distilled model, the teacher's cheapest configuration that reaches the same FID).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..eval.editing import edit_metrics
from ..models.folders import is_pipeline_folder, load_model
from ..models.handle import Model
from .format import acc, fid, ratio_cell, teacher_best
from .measure import quality_rows, speed_rows
from .results import load_report, reusable_rows

TEACHER_SAMPLERS = ("ddim", "euler", "heun", "dpmpp-2m")
# Heun pays 2 evaluations per step but the last: these step counts give NFE ≈ 1, 3, 7, 15, 25, 49.
STEPS = {"heun": (1, 2, 4, 8, 13, 25)}
DEFAULT_STEPS = (1, 2, 4, 8, 16, 25, 50)


def teacher_steps(quick: bool) -> dict[str, tuple[int, ...]]:
    return {s: (1, 2) if quick else STEPS.get(s, DEFAULT_STEPS) for s in TEACHER_SAMPLERS}


def distilled_models(models_dir: Path, teacher: Model) -> list[Model]:
    """Every few-step pixel model of the teacher's data set under ``models_dir`` (kind != "diffusion")."""
    found = []
    for cfg in sorted(models_dir.glob("*/fewstep.json")):
        if not (cfg.parent / "unet" / "config.json").exists() or is_pipeline_folder(cfg.parent):
            continue  # a diffusers pipeline (emoji-sd, emoji-lcm) or a LoRA: the latent sections measure those
        model = load_model(cfg.parent)
        if model.config.kind != "diffusion" and model.config.dataset == teacher.config.dataset:
            found.append(model)
    return found


def training_cost(model: Model) -> dict:
    """What a model cost to make, from its folder's training record: method, steps × batch, ACT's GAN weight λ
    (None for the others), and core-minutes (wall-clock × torch threads) on the machine that trained it."""
    t = model.config.training
    cfg = t.get("config", {})
    wall, threads = t.get("wall_seconds"), t.get("threads")
    return {"method": t.get("method", model.config.kind), "steps": t.get("steps"), "batch": cfg.get("batch_size"),
            "gan_weight": cfg.get("extra", {}).get("gan_weight") if t.get("method") == "act" else None,
            "wall_minutes": None if wall is None else wall / 60,
            "core_minutes": float("nan") if wall is None or threads is None else wall * threads / 60}


def reusable_quality(settings) -> dict[str, list[dict]]:
    """Quality rows of a previous run with the same sample count and seed (``--reuse``): the teacher's
    curves cost most of a bench and do not change when only distilled models are added."""
    if not settings.reuse:
        return {}
    old = load_report(Path(settings.reuse), "give the bench.json of an earlier run to --reuse")
    same = all(old.settings.get(k) == getattr(settings, k) for k in ("teacher", "num", "seed"))
    return old.quality if same else {}


def measure_quality(teacher: Model, distilled: list[Model], ruler, settings) -> dict[str, list[dict]]:
    """"model/sampler" → rows: the teacher's solvers (reused from ``--reuse`` when they match and have spreads), then every
    distilled model at 1, 2, 4 steps with its own sampler."""
    quality, previous = {}, reusable_quality(settings)
    guidance = teacher.config.default_guidance_scale
    for sampler, steps in teacher_steps(settings.quick).items():
        key = f"{teacher.path.name}/{sampler}"
        if reusable_rows(previous.get(key), steps):
            quality[key] = previous[key]
            print(f"{key}: reused from {settings.reuse}")
            continue
        quality[key] = quality_rows(teacher, ruler, steps, sampler, guidance, settings.num, settings.seed)
    for model in distilled:
        quality[f"{model.path.name}/{model.config.default_sampler}"] = quality_rows(
            model, ruler, (1, 2, 4), model.config.default_sampler, None, settings.num, settings.seed)
    return quality


def measure_editing(models: list[Model], ruler, settings) -> dict[str, dict]:
    """Zero-shot editing measurements (Song et al. 2023 §6) on the same random real images for each
    model (the teacher first, as a one-step-denoiser baseline, then those in ``settings.edit_models``)."""
    g = torch.Generator().manual_seed(settings.seed)
    idx = torch.randperm(len(ruler.data), generator=g)[: settings.edit_num]
    images, labels = ruler.data.images[idx], ruler.data.labels[idx]
    out = {}
    for model in models:
        name = model.path.name
        out[name] = edit_metrics(model, ruler.classifier, images, labels, seed=settings.seed)
        print(f"editing {name}: inpaint acc {out[name]['inpaint_bottom']['accuracy']:.3f}, "
              f"superres PSNR {out[name]['superres_4x']['psnr']:.2f} dB", flush=True)
    return out


def measure_speed(teacher: Model, distilled: list[Model], settings) -> list[dict]:
    """Speed, side by side at one batch size: the teacher's solvers, then every distilled model."""
    rows = speed_rows(teacher, teacher_steps(settings.quick), settings.timing_batch, settings.timing_repeats)
    for model in distilled:
        rows += speed_rows(model, {model.config.default_sampler: (1, 2, 4)}, settings.timing_batch,
                           settings.timing_repeats)
    return rows


def speedups(report) -> list[dict]:
    """For each distilled row: the teacher's cheapest configuration reaching the same FID."""
    speed = {(r["model"], r["sampler"], r["steps"]): r["seconds_per_image"] for r in report.speed}
    teacher_rows = [(key.split("/")[1], row) for key, rows in report.quality.items() for row in rows
                    if key.startswith(report.settings["teacher"] + "/")]
    out = []
    for key, rows in report.quality.items():
        name, sampler = key.split("/")
        if name == report.settings["teacher"]:
            continue
        for row in rows:
            t = speed.get((name, sampler, row["steps"]))
            matches = [(speed[(report.settings["teacher"], s, r["steps"])], s, r) for s, r in teacher_rows
                       if r["fid"] <= row["fid"] and (report.settings["teacher"], s, r["steps"]) in speed]
            if t is None or not matches:
                out.append({"model": name, "steps": row["steps"], "fid": row["fid"], "teacher_match": None})
                continue
            tt, s, r = min(matches, key=lambda m: m[0])
            out.append({"model": name, "steps": row["steps"], "fid": row["fid"], "teacher_match":
                        f"{s} {r['steps']} steps", "teacher_fid": r["fid"], "speedup": tt / t})
    return out


def quality_section(report, nfe_png: str, seconds_png: str) -> list[str]:
    lines = [
        "## Quality versus steps", "",
        "| model | sampler | steps | NFE | FID | KID (×10³) | precision | recall | cond. acc. |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key, rows in report.quality.items():
        name, sampler = key.split("/")
        for r in rows:
            lines.append(f"| {name} | {sampler} | {r['steps']} | {r['nfe']} | {fid(r)} | "
                         f"{1e3 * r['kid']:.2f} ± {1e3 * r['kid_std']:.2f} | {r['precision']:.3f} | "
                         f"{r['recall']:.3f} | {acc(r)} |")
    lines += ["", f"![FID versus NFE]({nfe_png}) ![FID versus seconds]({seconds_png})", "",
              "## Speed and sampler overhead", "",
              "Floor = network evaluations × the time of one guided network evaluation (cond + uncond in one batch) "
              "at the same batch; overhead = wall-clock / floor.", "",
              "| model | sampler | steps | NFE | ms / image | images / s | floor ms / image | overhead |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in report.speed:
        lines.append(f"| {r['model']} | {r['sampler']} | {r['steps']} | {r['nfe']} | {1e3 * r['seconds_per_image']:.3f} "
                     f"| {r['images_per_second']:.0f} | {1e3 * r['floor_seconds_per_image']:.3f} | "
                     f"{r['overhead']:.3f}× |")
    return lines


def consistency_section(report) -> list[str]:
    return consistency_table(report.quality, report.costs, report.settings["teacher"], "## Consistency models")


def consistency_table(quality: dict[str, list[dict]], costs: dict, teacher: str, title: str) -> list[str]:
    """Consistency models beside their teacher: FID at 1, 2, 4 steps, training cost, and the ratios to the
    teacher's best (its lowest FID over every sampler and step count measured)."""
    dpm = {r["steps"]: r for r in quality.get(f"{teacher}/dpmpp-2m", [])}
    found = teacher_best(quality, teacher)
    models = [(k.split("/")[0], rows) for k, rows in quality.items() if k.endswith("/consistency")]
    if not models or found is None or not all(n in dpm for n in (1, 2, 4)):
        return []
    where, best = found
    lines = ["", title, "",
             f"One network evaluation per step, no CFG pass (CD learns the teacher's guided ODE at s = "
             f"{dpm[1]['guidance_scale']:g}; CT/iCT/ACT are conditional models trained from the data alone). "
             f"The teacher's best: FID {fid(best)} ({where}, NFE {best['nfe']}), its lowest over every sampler and "
             "step count measured. Cost: the training run's wall-clock × its torch threads, from the model folder; "
             "runs here shared the 2 cores with each other, so these are upper bounds. 2- and 4-step rows use the "
             "model's own grid (tuned by `fewstep eval --tune-sigmas` where it has one).", "",
             "| model | method | trained (steps × batch) | cost (core-min) | FID 1 step | FID 2 steps | FID 4 steps | "
             "acc. 1 step | 1-step FID / teacher best | 2-step FID / teacher best |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines.append(f"| {teacher} (DPM-Solver++, CFG) | – | – | – | {fid(dpm[1])} | {fid(dpm[2])} | "
                 f"{fid(dpm[4])} | {acc(dpm[1])} | {ratio_cell(dpm[1], best)} | "
                 f"{ratio_cell(dpm[2], best)} |")
    for name, rows in models:
        by = {r["steps"]: r for r in rows}
        t = costs.get(name, {})
        lines.append(f"| {name} | {t.get('method', '?')} | {t.get('steps', '?')} × {t.get('batch', '?')} | "
                     f"{t.get('core_minutes', float('nan')):.0f} | {fid(by[1])} | {fid(by[2])} | "
                     f"{fid(by[4])} | {acc(by[1])} | {ratio_cell(by[1], best)} | "
                     f"{ratio_cell(by[2], best)} |")
    return lines


def editing_section(report) -> list[str]:
    return editing_table(report.editing, report.settings["edit_num"], "digits", "## Zero-shot editing")


def editing_table(editing: dict, num: int, data: str, title: str) -> list[str]:
    """The zero-shot editing measurements of each model (:func:`fewstep.eval.editing.edit_metrics`)."""
    if not editing:
        return []
    colour = any(m.get("colorize") and "psnr" in m["colorize"] for m in editing.values())
    lines = ["", title, "",
             f"`fewstep edit` (Song et al. 2023, Algorithm 4) on {num} random real {data}, no task training, no label "
             "given (the label is what inpainting is judged by; \"label inferred\": the model picks the class whose f "
             "reconstructs the known half best, then inpaints conditioned on it). The teacher row uses the diffusion "
             "teacher as a one-step denoiser in the same loop, for comparison. Accuracy: the shipped classifier "
             "recovers the original label; blur fill: the hole filled by repeated 3×3 box blurs of the known part; "
             "bicubic: the same 4×4 patch means upsampled" + (
                 "; colorization: from the luminance alone, against the gray image itself." if colour else
                 ". Colorization needs RGB data (the digits are gray): that it keeps luminance exactly is checked in "
                 "`tests/test_editing.py` (error ~1e-7)."), "",
             "| model | inpaint bottom half: acc. (blur fill) | label inferred by the model: inference acc. / "
             "inpaint acc. | masked MSE (blur fill) | inpaint right half: acc. "
             "(blur fill) | 4× super-res PSNR dB (bicubic) | patch-mean error | denoise σ=0.3 PSNR (noisy) | "
             "interpolation min. confidence (uncond. / cond.) | stroke edit acc. (strokes) |"
             + (" colorization PSNR dB (gray) / acc. (gray) |" if colour else ""),
             "|---|---|---|---|---|---|---:|---|---|---|" + ("---|" if colour else "")]
    for name, m in editing.items():
        ib, ir, sr, dn, st = m["inpaint_bottom"], m["inpaint_right"], m["superres_4x"], m["denoise"], m["stroke"]
        cond, col = m.get("interpolate_conditional"), m.get("colorize") or {}
        lines.append(
            f"| {name} | {ib['accuracy']:.3f} ({ib['baseline_accuracy']:.3f}) | "
            f"{ib.get('label_inference_accuracy', float('nan')):.3f} / {ib.get('accuracy_inferred_label', float('nan')):.3f} | "
            f"{ib['masked_mse']:.3f} "
            f"({ib['baseline_masked_mse']:.3f}) | {ir['accuracy']:.3f} ({ir['baseline_accuracy']:.3f}) | "
            f"{sr['psnr']:.2f} ({sr['bicubic_psnr']:.2f}) | {sr['max_patch_mean_error']:.1e} | "
            f"{dn['psnr']:.1f} ({dn['noisy_psnr']:.1f}) | {m['interpolate']['min_confidence']:.3f} / "
            f"{'–' if cond is None else format(cond['min_confidence'], '.3f')} | {st['accuracy']:.3f} "
            f"({st['strokes_accuracy']:.3f}) |" + (
                f" {col['psnr']:.2f} ({col['gray_psnr']:.2f}) / {col['accuracy']:.3f} ({col['gray_accuracy']:.3f}) |"
                if colour and "psnr" in col else (" – |" if colour else "")))
    return lines


def speedup_section(report) -> list[str]:
    lines: list[str] = []
    if report.speedup:
        lines += ["", "## Speedup at matched quality", "",
                  "| model | steps | FID | teacher's cheapest match | its FID | speedup |", "|---|---:|---:|---|---:|---:|"]
        for r in report.speedup:
            if r["teacher_match"] is None:
                lines.append(f"| {r['model']} | {r['steps']} | {fid(r)} | none reaches it | – | – |")
            else:
                lines.append(f"| {r['model']} | {r['steps']} | {fid(r)} | {r['teacher_match']} | "
                             f"{r['teacher_fid']:.3f} | {r['speedup']:.1f}× |")
    return lines


def heun_section(results: Path) -> list[str]:
    """Why Heun collapses at 2–4 steps on the digits teacher (``bench/heun_study.py`` → heun.json)."""
    path = results / "heun.json"
    if not path.exists():
        return []
    h = json.loads(path.read_text())
    lines = ["", "## Heun at 2–4 steps", "",
             f"Written by `{h['command']}` ({h['num']} samples, digits teacher, s = 2 unless said). In σ space Heun's "
             "step is Euler's plus a corrector, x' = Euler(x; σ → σ') + (r − 1)/2 · (D(x_euler; σ') − D(x; σ)) with "
             "r = σ/σ' (`tests/test_parity.py` checks the identity): the change between two successive "
             "x0-estimates, multiplied by (r − 1)/2: " + _grid_factors(h["per_step"]) + " Per step, for the trained "
             "teacher and for the exact denoiser of the digits (whose "
             "x0-estimates are averages of real digits): the ratio, the range of D(x; σ) and the share of it outside "
             "[−1, 1], the mean |D' − D|, the largest corrector term, and the range of x after the step.", "",
             "| denoiser | s | steps | σ → σ' | r | D range | D outside | mean |D' − D| | max corrector | x range |",
             "|---|---:|---:|---|---:|---|---:|---:|---:|---|"]
    for key, rows in h["per_step"].items():
        name, s, steps = key.split("/")
        for r in rows:
            ratio = "–" if r["ratio"] is None else f"{r['ratio']:.1f}"
            lines.append(f"| {name} | {s[2:]} | {steps} | {r['sigma']:.3g} → {r['sigma_next']:.3g} | {ratio} | "
                         f"[{r['x0_min']:.2f}, {r['x0_max']:.2f}] | {r['x0_outside']:.3f} | {r['mean_change']:.3f} | "
                         f"{r['max_correction']:.2f} | [{r['x_min']:.2f}, {r['x_max']:.2f}] |")
    lines += ["", "The remedies, measured (FID ± bootstrap spread, accuracy, the raw range of the samples before the "
              "final clip): an x0 clamp (`fewstep sample --clamp-x0`, each D clipped to [−1, 1] before the solver uses "
              "it) and a gentler grid (ρ = 3: `--sigmas` with the levels of `EDMSchedule.grid(n, rho=3)`).", "",
              "| sampler | steps | grid ρ | x0 clamp | FID | acc. | sample range |", "|---|---:|---:|---|---:|---:|---|"]
    for r in h["runs"]:
        lines.append(f"| {r['sampler']} | {r['steps']} | {r['rho']:g} | {'yes' if r['clamp_x0'] else 'no'} | {fid(r)} | "
                     f"{acc(r)} | [{r['raw_min']:.2f}, {r['raw_max']:.2f}] |")
    return lines + ["", _heun_verdict(h)]


def _grid_factors(per_step: dict) -> str:
    """"EDM's ρ = 7 grid at N steps is a → b → … (r …: factors …)" from the study's own steps."""
    parts = []
    for key in sorted({k for k in per_step if k.startswith("teacher/s=2/")}, key=lambda k: int(k.split("/")[2])):
        rows = per_step[key]
        levels = " → ".join(f"{r['sigma']:.3g}" for r in rows) + " → 0"
        factors = ", ".join(f"{(r['ratio'] - 1) / 2:.1f}" for r in rows if r["ratio"])
        parts.append(f"at {key.split('/')[2]} steps EDM's ρ = 7 grid is {levels} (corrector factors {factors})")
    return "; ".join(parts) + "."


def _heun_verdict(h: dict) -> str:
    """What the numbers say: who overshoots, and which remedy wins at each step count."""
    runs = h["runs"]

    def best(steps: int) -> dict:
        return min((r for r in runs if r["steps"] == steps), key=lambda r: r["fid"])

    plain = {r["steps"]: r for r in runs if r["sampler"] == "heun" and r["rho"] == 7 and not r["clamp_x0"]}
    def corrector(name: str, s: str) -> float:
        return max(r["max_correction"] for r in h["per_step"].get(f"{name}/s={s}/4", [{"max_correction": 0}]))

    text = [f"Why: the corrector, not the network — with the exact oracle, whose every x0-estimate is an average "
            f"of real digits, the corrector's largest term on the 4-step grid is {corrector('oracle', '1'):.1f} with no "
            f"guidance ({corrector('teacher', '1'):.1f} for the teacher): the large ratios alone push x off the data; "
            f"guidance (s = 2) makes D leave [−1, 1] and the terms grow to {corrector('oracle', '2'):.1f} / "
            f"{corrector('teacher', '2'):.1f}, and the teacher's estimates at those off-data points go further out."]
    for n in sorted(plain):
        b = best(n)
        what = (f"Heun on the ρ = {b['rho']:g} grid" + (" with the x0 clamp" if b["clamp_x0"] else "")
                if b["sampler"] == "heun" else f"Euler (ρ = {b['rho']:g})")
        text.append(f"At {n} steps the best is {what}, FID {fid(b)} against plain Heun's {fid(plain[n])}.")
    text.append("The clamp bounds D but not the corrector's factor, so it helps only a little where that factor is "
                "large; a grid with smaller ratios at the low end removes the cause. `fewstep sample` / `eval` "
                "take `--rho` and `--clamp-x0` for this.")
    return " ".join(text)
