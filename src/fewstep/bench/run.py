"""``fewstep bench``: quality versus steps and speed, side by side, in one process run; every section
(:mod:`.pixel`, :mod:`.guided`, :mod:`.latent`, :mod:`.lora`, :mod:`.guided_latent`) scored by the same
ruler, sample count and seed. Writes ``bench.json``, ``BENCHMARKS.md`` (machine, date, command) and plots.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import asdict
from pathlib import Path

from ..errors import FewstepError
from ..eval.evaluate import dataset_ruler_name, ruler_for
from ..io.atomic import write_text
from ..models.folders import load_model
from . import flow, guided, guided_latent, latent, lora, pixel, quality_check, sdxl, serve, tcd, testbed
from . import ruler as ruler_check
from .measure import machine
from .report import plots, write_markdown
from .results import BenchReport, BenchSettings, features_of, load_report


def run_bench(models_dir: Path, out_dir: Path, settings: BenchSettings, command: str = "fewstep bench",
              markdown: Path | None = None) -> BenchReport:
    """Every section, then speed side by side, then the report."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = BenchReport(settings=asdict(settings), machine=machine(), command=command,
                         date=datetime.date.today().isoformat())
    teacher, ruler, distilled = _measure_digits(report, models_dir, settings)
    report.guided = guided.measure(models_dir, teacher, ruler, settings, report.quality)
    report.latent = latent.measure(models_dir, settings, command)
    report.lora = lora.measure(models_dir, settings, command, teacher_rows(report.latent, models_dir))
    report.tcd = tcd.measure(models_dir, settings, command, teacher_rows(report.latent, models_dir))
    report.guided_latent = guided_latent.measure(models_dir, settings, command, teacher_rows(report.latent, models_dir))
    report.ruler = ruler_check.measure(models_dir, settings, command)
    report.emoji_pixel = testbed.measure(models_dir, settings, command, out_dir / testbed.PROGRESS)
    report.sdxl = sdxl.measure(models_dir, settings, command)
    report.flow = flow.measure(models_dir, settings, command)
    report.serve = serve.measure(models_dir, settings, command, teacher_rows(report.latent, models_dir))
    report.quality_check = quality_check.measure(models_dir, settings, command)
    report.speed = pixel.measure_speed(teacher, distilled, settings)
    report.speedup = pixel.speedups(report)
    _write(report, out_dir, markdown)
    plots(report, out_dir)
    return report


def _measure_digits(report: BenchReport, models_dir: Path, settings: BenchSettings):
    """The digits sections' quality and editing rows (the teacher's reused from ``--reuse`` where they match);
    returns the teacher, its ruler and the distilled models for the sections that build on them."""
    teacher = load_model(models_dir / settings.teacher)
    ruler = ruler_for(teacher, models_dir)
    distilled = pixel.distilled_models(models_dir, teacher)
    report.costs = {m.path.name: pixel.training_cost(m) for m in distilled}
    report.quality = pixel.measure_quality(teacher, distilled, ruler, settings)
    report.editing = pixel.measure_editing([teacher, *(m for m in distilled if m.path.name in settings.edit_models)],
                                           ruler, settings)
    return teacher, ruler, distilled


def teacher_rows(latent_section: dict, models_dir: Path) -> dict:
    """The emoji teacher's quality rows by sampler, from the latent section (so the LoRA and guided-latent
    sections reuse them), with the sample count they were measured on under "num"; none when that section was
    scored on another feature network than the emoji ruler's now."""
    if features_of(latent_section) != dataset_ruler_name(models_dir, "emoji"):
        return {}
    rows = {k.split("/", 1)[1]: v for k, v in latent_section.get("quality", {}).items() if k.startswith("emoji-sd/")}
    return {**rows, "num": latent_section.get("num")} if rows else {}


def render_report(bench_json: Path, markdown: Path, out_dir: Path) -> None:
    """BENCHMARKS.md from a saved bench.json, measuring nothing."""
    write_markdown(load_report(bench_json, "run fewstep bench first, or pass --reuse OLD/bench.json"), markdown, out_dir)


def run_section_only(name: str, models_dir: Path, out_dir: Path, settings: BenchSettings, command: str,
                     markdown: Path | None) -> None:
    """``fewstep bench --only digits|guided|guided-latent|latent|lora|tcd|ruler|quality-check|emoji-pixel|sdxl|flow|serve|serve-sliders|serve-backends``: one section measured
    alone and merged into the ``--reuse`` report (its other sections, command and date stay as they were; digits
    re-measures the digits quality and editing rows, keeps the timings, and matches the speedups to them)."""
    missing = f"--only {name} merges into a previous report: give --reuse OLD/bench.json"
    if not settings.reuse:
        raise FewstepError(missing)
    report = load_report(Path(settings.reuse), missing)
    if name == "digits":
        _measure_digits(report, models_dir, settings)
        report.speedup = pixel.speedups(report)
        report.remeasured = {"command": command, "date": datetime.date.today().isoformat()}
    elif name == "guided":
        teacher = load_model(models_dir / settings.teacher)
        report.guided = guided.measure(models_dir, teacher, ruler_for(teacher, models_dir), settings,
                                       pixel.reusable_quality(settings), command)
    elif name == "latent":
        report.latent = latent.measure(models_dir, settings, command)
    elif name == "quality-check":
        report.quality_check = quality_check.measure(models_dir, settings, command)
    elif name == "ruler":
        report.ruler = ruler_check.measure(models_dir, settings, command)
    elif name == "emoji-pixel":
        report.emoji_pixel = testbed.measure(models_dir, settings, command, out_dir / testbed.PROGRESS)
    elif name == "sdxl":
        report.sdxl = sdxl.measure(models_dir, settings, command)
    elif name == "flow":
        report.flow = flow.measure(models_dir, settings, command)
    elif name == "serve":
        report.serve = serve.measure(models_dir, settings, command, teacher_rows(report.latent, models_dir))
    elif name == "serve-sliders":   # the LoRA sliders' servers alone, into the serve section
        report.serve = serve.measure_sliders(models_dir, settings, command, report.serve)
    elif name == "serve-backends":  # the backends' calls alone, into the serve section
        report.serve = serve.measure_backends(models_dir, command, report.serve)
    elif name == "tcd":
        report.tcd = tcd.measure(models_dir, settings, command, teacher_rows(report.latent, models_dir))
    elif name == "guided-latent":
        report.guided_latent = guided_latent.measure(models_dir, settings, command, teacher_rows(report.latent, models_dir))
    else:
        report.lora = lora.measure(models_dir, settings, command, teacher_rows(report.latent, models_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    _write(report, out_dir, markdown)


def _write(report: BenchReport, out_dir: Path, markdown: Path | None) -> None:
    write_text(out_dir / "bench.json", json.dumps(asdict(report), indent=1) + "\n")
    if markdown is not None:
        write_markdown(report, markdown, out_dir)
