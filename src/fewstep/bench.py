"""``fewstep bench``: quality versus steps and speed, side by side, in one process run.

- Quality: the teacher with each ODE solver at 1 … 50 steps (classifier-free guidance on), and
  every distilled model found beside it, scored by the same :class:`~fewstep.evaluate.Ruler`
  with the same labels, seeds and sample count.
- Speed: wall-clock per image at a fixed batch, measured in this process. The floor of a sampler
  is (network evaluations) × (time of one guided network evaluation at that batch); the ratio
  wall-clock / floor is the sampler's overhead.
- Speedup at matched quality: for each distilled model, the teacher's cheapest configuration
  that reaches the same FID, and the ratio of their wall-clock times.

Writes ``bench.json``, ``BENCHMARKS.md`` (machine, date, command) and two plots.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .atomic import write_text
from .errors import FewstepError
from .evaluate import EvalResult, evaluate, ruler_for
from .models import LoadedModel, load_model
from .sampling import conditioned, generate, nfe
from .solvers import get_sampler

TEACHER_SAMPLERS = ("ddim", "euler", "heun", "dpmpp-2m")
# Heun pays 2 evaluations per step but the last: these step counts give NFE ≈ 1, 3, 7, 15, 25, 49.
STEPS = {"heun": (1, 2, 4, 8, 13, 25)}
DEFAULT_STEPS = (1, 2, 4, 8, 16, 25, 50)


@dataclass
class BenchSettings:
    teacher: str = "digits-teacher"
    num: int = 1000             # samples per quality point
    seed: int = 0
    timing_batch: int = 64      # images per batch for the speed table
    timing_repeats: int = 5     # median of this many timed runs
    quick: bool = False
    reuse: str | None = None    # a previous bench.json: its teacher quality rows are reused if num and seed match
    edit_models: tuple[str, ...] = ("digits-cd",)  # zero-shot editing is measured on these (and the teacher)
    edit_num: int = 200         # real images per editing measurement

    @classmethod
    def quick_settings(cls) -> "BenchSettings":
        return cls(num=100, timing_repeats=2, quick=True, edit_num=50)


@dataclass
class SpeedRow:
    model: str
    sampler: str
    steps: int
    nfe: int
    seconds_per_image: float
    images_per_second: float
    floor_seconds_per_image: float
    overhead: float


@dataclass
class BenchReport:
    settings: dict
    machine: str
    date: str
    command: str
    quality: dict[str, list[dict]] = field(default_factory=dict)   # "model/sampler" -> EvalResult rows
    speed: list[dict] = field(default_factory=list)
    speedup: list[dict] = field(default_factory=list)
    costs: dict[str, dict] = field(default_factory=dict)            # distilled model -> training cost
    editing: dict[str, dict] = field(default_factory=dict)          # model -> fewstep.editing.edit_metrics
    guided: dict = field(default_factory=dict)                      # fewstep.guided_bench: Meng et al. 2023
    guided_latent: dict = field(default_factory=dict)               # fewstep.guided_bench: stage 1 on emoji-sd
    latent: dict = field(default_factory=dict)                      # fewstep.latent_bench: Luo et al. 2023
    lora: dict = field(default_factory=dict)                        # fewstep.lora_bench: Luo et al. 2023b


def distilled_models(models_dir: Path, teacher: LoadedModel) -> list[LoadedModel]:
    """Every few-step model of the teacher's data set under ``models_dir`` (kind != "diffusion")."""
    found = []
    for cfg in sorted(models_dir.glob("*/fewstep.json")):
        if not (cfg.parent / "unet" / "config.json").exists() or (cfg.parent / "model_index.json").exists():
            continue  # a diffusers pipeline (emoji-sd, emoji-lcm) or a LoRA: the latent sections measure those
        model = load_model(cfg.parent)
        if model.config.kind != "diffusion" and model.config.dataset == teacher.config.dataset:
            found.append(model)
    return found


def training_cost(model: LoadedModel) -> dict:
    """What a model cost to make, from its folder's training record: method, steps × batch, and
    core-minutes (wall-clock × torch threads) on the machine that trained it."""
    t = model.config.training
    cfg = t.get("config", {})
    wall, threads = t.get("wall_seconds"), t.get("threads")
    return {"method": t.get("method", model.config.kind), "steps": t.get("steps"), "batch": cfg.get("batch_size"),
            "wall_minutes": None if wall is None else wall / 60,
            "core_minutes": float("nan") if wall is None or threads is None else wall * threads / 60}


def time_network(model: LoadedModel, batch: int, guidance: float, repeats: int) -> float:
    """Median seconds of one (guided) network evaluation at ``batch`` images."""
    cfg = model.config
    x = torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size)
    sigma = torch.full((batch,), 1.0)
    den, extra = conditioned(model, _timing_labels(model, batch), guidance)
    with torch.no_grad():
        den(x, sigma, **extra)  # warm-up
        times = []
        for _ in range(max(3, repeats * 4)):
            start = time.perf_counter()
            den(x, sigma, **extra)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _timing_labels(model: LoadedModel, batch: int) -> torch.Tensor | None:
    return torch.arange(batch) % model.config.num_classes if model.config.class_names else None


def time_sampler(model: LoadedModel, sampler: str, steps: int, batch: int, guidance: float, repeats: int) -> float:
    """Median wall-clock seconds per image of a full batch sample."""
    labels = _timing_labels(model, batch)
    generate(model, labels, num=batch, steps=steps, sampler=sampler, guidance_scale=guidance, batch_size=batch)
    times = []
    for r in range(repeats):
        start = time.perf_counter()
        generate(model, labels, num=batch, steps=steps, sampler=sampler, guidance_scale=guidance, seed=r,
                 batch_size=batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times) / batch


def run_bench(models_dir: Path, out_dir: Path, settings: BenchSettings, command: str = "fewstep bench",
              write_markdown: Path | None = None) -> BenchReport:
    out_dir.mkdir(parents=True, exist_ok=True)
    teacher = load_model(models_dir / settings.teacher)
    ruler = ruler_for(teacher, models_dir)
    guidance = teacher.config.default_guidance_scale
    report = BenchReport(settings=asdict(settings), machine=_machine(), command=command,
                         date=datetime.date.today().isoformat())
    step_sets = {s: STEPS.get(s, DEFAULT_STEPS) for s in TEACHER_SAMPLERS}
    if settings.quick:
        step_sets = {s: (1, 2) for s in TEACHER_SAMPLERS}
    distilled = distilled_models(models_dir, teacher)

    # quality
    previous = _reusable_quality(settings)
    for sampler, steps in step_sets.items():
        key = f"{teacher.path.name}/{sampler}"
        if key in previous and [r["steps"] for r in previous[key]] == list(steps):
            report.quality[key] = previous[key]
            print(f"{key}: reused from {settings.reuse}")
            continue
        rows, _ = evaluate(teacher, ruler, list(steps), sampler, guidance, settings.num, settings.seed)
        report.quality[key] = [asdict(r) for r in rows]
        _print_quality(teacher.path.name, rows)
    for model in distilled:
        report.costs[model.path.name] = training_cost(model)
        rows, _ = evaluate(model, ruler, [1, 2, 4], model.config.default_sampler, None, settings.num, settings.seed)
        report.quality[f"{model.path.name}/{model.config.default_sampler}"] = [asdict(r) for r in rows]
        _print_quality(model.path.name, rows)

    report.editing = _editing([teacher, *(m for m in distilled if m.path.name in settings.edit_models)], ruler, settings)
    from . import guided_bench, latent_bench, lora_bench
    report.guided = guided_bench.measure(models_dir, teacher, ruler, settings, report.quality)
    report.latent = latent_bench.measure(models_dir, settings, command)
    report.lora = lora_bench.measure(models_dir, settings, command, _teacher_rows(report.latent))
    report.guided_latent = guided_bench.measure_latent(models_dir, settings, command, _teacher_rows(report.latent))

    # speed, side by side at one batch size
    report.speed += _speed_rows(teacher, step_sets, settings)
    for model in distilled:
        report.speed += _speed_rows(model, {model.config.default_sampler: (1, 2, 4)}, settings)
    report.speedup = _speedups(report)

    write_text(out_dir / "bench.json", json.dumps(asdict(report), indent=1) + "\n")
    _plots(report, out_dir)
    if write_markdown is not None:
        _write_markdown(report, write_markdown, out_dir)
    return report


def _teacher_rows(latent: dict) -> dict:
    """The emoji teacher's quality rows by sampler, from the latent section (so the LoRA and guided-latent
    sections reuse them), with the sample count they were measured on under "num"."""
    rows = {k.split("/", 1)[1]: v for k, v in latent.get("quality", {}).items() if k.startswith("emoji-sd/")}
    return {**rows, "num": latent.get("num")} if rows else {}


def load_report(bench_json: Path, missing: str) -> BenchReport:
    """A saved bench.json (keys this version does not know are dropped); ``missing`` says what to do."""
    if not bench_json.exists():
        raise FewstepError(f"no report at {bench_json}: {missing}")
    old = json.loads(bench_json.read_text())
    return BenchReport(**{k: v for k, v in old.items() if k in BenchReport.__dataclass_fields__})


def render_report(bench_json: Path, markdown: Path, out_dir: Path) -> None:
    """BENCHMARKS.md from a saved bench.json, measuring nothing."""
    _write_markdown(load_report(bench_json, "run fewstep bench first, or pass --reuse OLD/bench.json"), markdown, out_dir)


def run_section_only(name: str, models_dir: Path, out_dir: Path, settings: BenchSettings, command: str,
                     markdown: Path | None) -> None:
    """``fewstep bench --only guided|latent|lora``: one section measured alone and merged into the
    ``--reuse`` report (its other sections, command and date stay as they were)."""
    from . import guided_bench, latent_bench, lora_bench

    missing = f"--only {name} merges into a previous report: give --reuse OLD/bench.json"
    if not settings.reuse:
        raise FewstepError(missing)
    report = load_report(Path(settings.reuse), missing)
    if name == "guided":
        teacher = load_model(models_dir / settings.teacher)
        report.guided = guided_bench.measure(models_dir, teacher, ruler_for(teacher, models_dir), settings,
                                             _reusable_quality(settings), command)
    elif name == "latent":
        report.latent = latent_bench.measure(models_dir, settings, command)
    elif name == "guided-latent":
        report.guided_latent = guided_bench.measure_latent(models_dir, settings, command, _teacher_rows(report.latent))
    else:
        report.lora = lora_bench.measure(models_dir, settings, command, _teacher_rows(report.latent))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "bench.json", json.dumps(asdict(report), indent=1) + "\n")
    if markdown is not None:
        _write_markdown(report, markdown, out_dir)


def _editing(models: list[LoadedModel], ruler, settings: BenchSettings) -> dict[str, dict]:
    """Zero-shot editing measurements (Song et al. 2023 §6) on the same random real images for each
    model (the teacher first, as a one-step-denoiser baseline, then those in ``settings.edit_models``)."""
    from .editing import edit_metrics

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


def _reusable_quality(settings: BenchSettings) -> dict[str, list[dict]]:
    """Quality rows of a previous run with the same sample count and seed (``--reuse``): the teacher's
    curves cost most of a bench and do not change when only distilled models are added."""
    if not settings.reuse:
        return {}
    old = json.loads(Path(settings.reuse).read_text())
    same = all(old["settings"].get(k) == getattr(settings, k) for k in ("teacher", "num", "seed"))
    return old["quality"] if same else {}


def _speed_rows(model: LoadedModel, step_sets: dict[str, tuple[int, ...]], settings: BenchSettings) -> list[dict]:
    """Wall-clock per image of each (sampler, steps) and its overhead over the network-time floor."""
    guidance, batch = model.config.default_guidance_scale, settings.timing_batch
    net = time_network(model, batch, guidance, settings.timing_repeats)
    rows = []
    for sampler, steps in step_sets.items():
        for n in steps:
            per_image = time_sampler(model, sampler, n, batch, guidance, settings.timing_repeats)
            floor = get_sampler(sampler).nfe(n) * net / batch  # guided calls × time of one guided call
            rows.append(asdict(SpeedRow(model.path.name, sampler, n, nfe(model, sampler, n, guidance), per_image,
                                        1 / per_image, floor, per_image / floor)))
    return rows


def _speedups(report: BenchReport) -> list[dict]:
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


def _print_quality(name: str, rows: list[EvalResult]) -> None:
    for r in rows:
        print(f"{name:<16} {r.sampler:<9} steps {r.steps:>3} NFE {r.nfe:>3}  FID {r.fid:8.3f}  "
              f"acc {r.cond_accuracy if r.cond_accuracy is not None else float('nan'):.3f}", flush=True)


def _plots(report: BenchReport, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = {(r["model"], r["sampler"], r["steps"]): r["seconds_per_image"] for r in report.speed}
    for xkey, fname, xlabel in (("nfe", "fid_vs_nfe.png", "network evaluations per image (CFG counts 2)"),
                                ("seconds", "fid_vs_seconds.png", "seconds per image (batch "
                                 f"{report.settings['timing_batch']})")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for key, rows in report.quality.items():
            name, sampler = key.split("/")
            xs = [r["nfe"] if xkey == "nfe" else speed.get((name, sampler, r["steps"]), float("nan")) for r in rows]
            ax.plot(xs, [r["fid"] for r in rows], marker="o", label=key)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("FID (classifier features)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=110)
        plt.close(fig)


def _write_markdown(report: BenchReport, path: Path, out_dir: Path) -> None:
    s = report.settings
    lines = [
        "# Benchmarks", "",
        f"Written by `{report.command}` on {report.date}, on {report.machine}. "
        f"{s['num']} samples per point (labels cycling through the classes, seed {s['seed']}), scored against the "
        f"whole data set with the shipped classifier's features (FID/KID/precision/recall) and its predictions "
        f"(conditional accuracy). Timings: batch {s['timing_batch']}, median of {s['timing_repeats']} runs, in the "
        "same process.", "",
        "## Quality versus steps", "",
        "| model | sampler | steps | NFE | FID | KID (×10³) | precision | recall | cond. acc. |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key, rows in report.quality.items():
        name, sampler = key.split("/")
        for r in rows:
            acc = "–" if r["cond_accuracy"] is None else f"{r['cond_accuracy']:.3f}"
            lines.append(f"| {name} | {sampler} | {r['steps']} | {r['nfe']} | {r['fid']:.3f} | "
                         f"{1e3 * r['kid']:.2f} ± {1e3 * r['kid_std']:.2f} | {r['precision']:.3f} | "
                         f"{r['recall']:.3f} | {acc} |")
    lines += ["", f"![FID versus NFE]({_rel(out_dir / 'fid_vs_nfe.png', path)}) "
                  f"![FID versus seconds]({_rel(out_dir / 'fid_vs_seconds.png', path)})", "",
              "## Speed and sampler overhead", "",
              "Floor = network evaluations × the time of one guided network evaluation (cond + uncond in one batch) "
              "at the same batch; overhead = wall-clock / floor.", "",
              "| model | sampler | steps | NFE | ms / image | images / s | floor ms / image | overhead |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in report.speed:
        lines.append(f"| {r['model']} | {r['sampler']} | {r['steps']} | {r['nfe']} | {1e3 * r['seconds_per_image']:.3f} "
                     f"| {r['images_per_second']:.0f} | {1e3 * r['floor_seconds_per_image']:.3f} | "
                     f"{r['overhead']:.3f}× |")
    lines += _consistency_section(report)
    lines += _editing_section(report)
    from .guided_bench import latent_section, section
    lines += section(report) + latent_section(report)
    from . import latent_bench, lora_bench
    lines += latent_bench.section(report)
    lines += lora_bench.section(report)
    if report.speedup:
        lines += ["", "## Speedup at matched quality", "",
                  "| model | steps | FID | teacher's cheapest match | its FID | speedup |", "|---|---:|---:|---|---:|---:|"]
        for r in report.speedup:
            if r["teacher_match"] is None:
                lines.append(f"| {r['model']} | {r['steps']} | {r['fid']:.3f} | none reaches it | – | – |")
            else:
                lines.append(f"| {r['model']} | {r['steps']} | {r['fid']:.3f} | {r['teacher_match']} | "
                             f"{r['teacher_fid']:.3f} | {r['speedup']:.1f}× |")
    write_text(path, "\n".join(lines) + "\n")


def _consistency_section(report: BenchReport) -> list[str]:
    """Consistency models beside the teacher: FID at 1, 2, 4 steps, training cost, and the CD targets
    (1-step ≤ 1.5×, 2-step ≤ 1.2× the teacher's best FID, its 50-step DPM-Solver++)."""
    teacher = report.settings["teacher"]
    dpm = {r["steps"]: r for r in report.quality.get(f"{teacher}/dpmpp-2m", [])}
    best = dpm.get(50)
    models = [(k.split("/")[0], rows) for k, rows in report.quality.items() if k.endswith("/consistency")]
    if not models or best is None:
        return []
    lines = ["", "## Consistency models", "",
             f"One network evaluation per step, no CFG pass (CD learns the teacher's guided ODE at s = "
             f"{best['guidance_scale']:g}; CT/iCT/ACT are conditional models trained from the data alone). "
             f"The teacher's best: FID {best['fid']:.3f} at 50 DPM-Solver++ steps (NFE {best['nfe']}). Cost: the "
             "training run's wall-clock × its torch threads, from the model folder; runs here shared the 2 cores with "
             "each other, so these are upper bounds. 2- and 4-step rows use the model's own grid (tuned by "
             "`fewstep eval --tune-sigmas` where it has one).", "",
             "| model | method | trained (steps × batch) | cost (core-min) | FID 1 step | FID 2 steps | FID 4 steps | "
             "acc. 1 step | 1-step FID / teacher best | 2-step FID / teacher best |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines.append(f"| {teacher} (DPM-Solver++, CFG) | – | – | – | {dpm[1]['fid']:.3f} | {dpm[2]['fid']:.3f} | "
                 f"{dpm[4]['fid']:.3f} | {dpm[1]['cond_accuracy']:.3f} | {dpm[1]['fid'] / best['fid']:.2f} | "
                 f"{dpm[2]['fid'] / best['fid']:.2f} |")
    for name, rows in models:
        by = {r["steps"]: r for r in rows}
        t = report.costs.get(name, {})
        lines.append(f"| {name} | {t.get('method', '?')} | {t.get('steps', '?')} × {t.get('batch', '?')} | "
                     f"{t.get('core_minutes', float('nan')):.0f} | {by[1]['fid']:.3f} | {by[2]['fid']:.3f} | "
                     f"{by[4]['fid']:.3f} | {by[1]['cond_accuracy']:.3f} | {by[1]['fid'] / best['fid']:.2f} | "
                     f"{by[2]['fid'] / best['fid']:.2f} |")
    return lines


def _editing_section(report: BenchReport) -> list[str]:
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


def _rel(target: Path, md: Path) -> str:
    return os.path.relpath(target.resolve(), md.resolve().parent)


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
