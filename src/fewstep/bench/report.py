"""The bench report: its settings, what ``bench.json`` holds, and BENCHMARKS.md assembled from the
sections (:mod:`.pixel`, :mod:`.guided`, :mod:`.guided_latent`, :mod:`.latent`, :mod:`.lora`), plots."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import FewstepError
from ..io.atomic import write_text
from . import guided, guided_latent, latent, lora, pixel


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


def load_report(bench_json: Path, missing: str) -> BenchReport:
    """A saved bench.json (keys this version does not know are dropped); ``missing`` says what to do."""
    if not bench_json.exists():
        raise FewstepError(f"no report at {bench_json}: {missing}")
    old = json.loads(bench_json.read_text())
    return BenchReport(**{k: v for k, v in old.items() if k in BenchReport.__dataclass_fields__})


def write_markdown(report: BenchReport, path: Path, out_dir: Path) -> None:
    """BENCHMARKS.md: the header, then every section that has numbers (``out_dir`` holds the plots and the
    ablation scripts' JSON files)."""
    s = report.settings
    lines = [
        "# Benchmarks", "",
        f"Written by `{report.command}` on {report.date}, on {report.machine}. "
        f"{s['num']} samples per point (labels cycling through the classes, seed {s['seed']}), scored against the "
        f"whole data set with the shipped classifier's features (FID/KID/precision/recall) and its predictions "
        f"(conditional accuracy). Timings: batch {s['timing_batch']}, median of {s['timing_repeats']} runs, in the "
        "same process.", ""]
    lines += pixel.quality_section(report, rel(out_dir / "fid_vs_nfe.png", path), rel(out_dir / "fid_vs_seconds.png", path))
    lines += pixel.consistency_section(report) + pixel.editing_section(report)
    lines += guided.section(report) + guided_latent.section(report)
    lines += latent.section(report, out_dir) + lora.section(report, out_dir) + pixel.speedup_section(report)
    write_text(path, "\n".join(lines) + "\n")


def plots(report: BenchReport, out_dir: Path) -> None:
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


def rel(target: Path, md: Path) -> str:
    return os.path.relpath(target.resolve(), md.resolve().parent)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
