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
from .format import acc, fid, teacher_best
from .measure import quality_rows, speed_rows

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
    """What a model cost to make, from its folder's training record: method, steps × batch, and
    core-minutes (wall-clock × torch threads) on the machine that trained it."""
    t = model.config.training
    cfg = t.get("config", {})
    wall, threads = t.get("wall_seconds"), t.get("threads")
    return {"method": t.get("method", model.config.kind), "steps": t.get("steps"), "batch": cfg.get("batch_size"),
            "wall_minutes": None if wall is None else wall / 60,
            "core_minutes": float("nan") if wall is None or threads is None else wall * threads / 60}


def reusable_quality(settings) -> dict[str, list[dict]]:
    """Quality rows of a previous run with the same sample count and seed (``--reuse``): the teacher's
    curves cost most of a bench and do not change when only distilled models are added."""
    if not settings.reuse:
        return {}
    old = json.loads(Path(settings.reuse).read_text())
    same = all(old["settings"].get(k) == getattr(settings, k) for k in ("teacher", "num", "seed"))
    return old["quality"] if same else {}


def measure_quality(teacher: Model, distilled: list[Model], ruler, settings) -> dict[str, list[dict]]:
    """"model/sampler" → rows: the teacher's solvers (reused from ``--reuse`` when they match), then every
    distilled model at 1, 2, 4 steps with its own sampler."""
    quality, previous = {}, reusable_quality(settings)
    guidance = teacher.config.default_guidance_scale
    for sampler, steps in teacher_steps(settings.quick).items():
        key = f"{teacher.path.name}/{sampler}"
        if key in previous and [r["steps"] for r in previous[key]] == list(steps):
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
            acc = "–" if r["cond_accuracy"] is None else f"{r['cond_accuracy']:.3f}"
            lines.append(f"| {name} | {sampler} | {r['steps']} | {r['nfe']} | {fid(r)} | "
                         f"{1e3 * r['kid']:.2f} ± {1e3 * r['kid_std']:.2f} | {r['precision']:.3f} | "
                         f"{r['recall']:.3f} | {acc} |")
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
                 f"{fid(dpm[4])} | {acc(dpm[1])} | {dpm[1]['fid'] / best['fid']:.2f} | "
                 f"{dpm[2]['fid'] / best['fid']:.2f} |")
    for name, rows in models:
        by = {r["steps"]: r for r in rows}
        t = costs.get(name, {})
        lines.append(f"| {name} | {t.get('method', '?')} | {t.get('steps', '?')} × {t.get('batch', '?')} | "
                     f"{t.get('core_minutes', float('nan')):.0f} | {fid(by[1])} | {fid(by[2])} | "
                     f"{fid(by[4])} | {acc(by[1])} | {by[1]['fid'] / best['fid']:.2f} | "
                     f"{by[2]['fid'] / best['fid']:.2f} |")
    return lines


def editing_section(report) -> list[str]:
    if not report.editing:
        return []
    lines = ["", "## Zero-shot editing", "",
             f"`fewstep edit` (Song et al. 2023, Algorithm 4) on {report.settings['edit_num']} random real digits, no "
             "task training, no label given (the label is what inpainting is judged by; \"label inferred\": the "
             "model picks the class whose f reconstructs the known half best, then inpaints conditioned on it). The teacher row uses the "
             "diffusion teacher as a one-step denoiser in the same loop, for comparison. Accuracy: the shipped "
             "classifier recovers the original label; blur fill: the hole filled by repeated 3×3 box blurs of the "
             "known part; bicubic: the same 4×4 patch means upsampled. Colorization needs RGB data (the digits are "
             "gray): that it keeps luminance exactly is checked in `tests/test_editing.py` (error ~1e-7).", "",
             "| model | inpaint bottom half: acc. (blur fill) | label inferred by the model: inference acc. / "
             "inpaint acc. | masked MSE (blur fill) | inpaint right half: acc. "
             "(blur fill) | 4× super-res PSNR dB (bicubic) | patch-mean error | denoise σ=0.3 PSNR (noisy) | "
             "interpolation min. confidence (uncond. / cond.) | stroke edit acc. (strokes) |",
             "|---|---|---|---|---|---|---:|---|---|---|"]
    for name, m in report.editing.items():
        ib, ir, sr, dn, st = m["inpaint_bottom"], m["inpaint_right"], m["superres_4x"], m["denoise"], m["stroke"]
        cond = m.get("interpolate_conditional")
        lines.append(
            f"| {name} | {ib['accuracy']:.3f} ({ib['baseline_accuracy']:.3f}) | "
            f"{ib.get('label_inference_accuracy', float('nan')):.3f} / {ib.get('accuracy_inferred_label', float('nan')):.3f} | "
            f"{ib['masked_mse']:.3f} "
            f"({ib['baseline_masked_mse']:.3f}) | {ir['accuracy']:.3f} ({ir['baseline_accuracy']:.3f}) | "
            f"{sr['psnr']:.2f} ({sr['bicubic_psnr']:.2f}) | {sr['max_patch_mean_error']:.1e} | "
            f"{dn['psnr']:.1f} ({dn['noisy_psnr']:.1f}) | {m['interpolate']['min_confidence']:.3f} / "
            f"{'–' if cond is None else format(cond['min_confidence'], '.3f')} | {st['accuracy']:.3f} "
            f"({st['strokes_accuracy']:.3f}) |")
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
