"""The bench report: its settings, what ``bench.json`` holds, and BENCHMARKS.md assembled from the
sections (:mod:`.pixel`, :mod:`.guided`, :mod:`.guided_latent`, :mod:`.latent`, :mod:`.lora`), plots."""

from __future__ import annotations

import os
from pathlib import Path

from ..io.atomic import write_text
from . import (
    claims,
    ect,
    flow,
    guided,
    guided_latent,
    latent,
    lora,
    memory,
    pixel,
    quality_check,
    ruler,
    sdxl,
    serve,
    tcd,
    testbed,
)
from .results import OLD_FEATURES, BenchReport, features_of


def write_markdown(report: BenchReport, path: Path, out_dir: Path) -> None:
    """BENCHMARKS.md: the header, then every section that has numbers (``out_dir`` holds the plots and the
    ablation scripts' JSON files)."""
    s = report.settings
    lines = [
        "# Benchmarks", "",
        f"Written by `{report.command}` on {report.date}, on {report.machine}. "
        f"{s['num']} samples per point (labels cycling through the classes, seed {s['seed']}), scored against the "
        f"whole data set with the shipped classifier's predictions (conditional accuracy) and, for FID/KID/precision/"
        f"recall, the features of the data set's feature network where it has one (`emoji-features`, \"The ruler\"), "
        f"of the classifier otherwise (digits). {_older_ruler(report)}Timings: batch {s['timing_batch']}, median of "
        f"{s['timing_repeats']} runs, in the same process." + (f" The digits quality and editing rows were measured again, with spreads, by "
                           f"`{report.remeasured['command']}` on {report.remeasured['date']} (the timings are the "
                           "first command's)." if report.remeasured else ""), ""]
    lines += pixel.quality_section(report, rel(out_dir / "fid_vs_nfe.png", path), rel(out_dir / "fid_vs_seconds.png", path))
    lines += pixel.consistency_section(report) + pixel.editing_section(report)
    lines += guided.section(report) + guided_latent.section(report)
    lines += latent.section(report, out_dir) + lora.section(report, out_dir) + tcd.section(report, out_dir)
    lines += pixel.speedup_section(report)
    lines += sdxl.section(report) + flow.section(report) + memory.section(out_dir) + serve.section(report)
    lines += ruler.section(report) + testbed.section(report) + testbed.act_balance(out_dir)
    lines += ect.section(out_dir) + pixel.heun_section(out_dir)
    lines += claims.section(report, out_dir) + quality_check.section(report)
    write_text(path, "\n".join(lines) + "\n")


EMOJI_SECTIONS = {"latent": "LCM", "lora": "LCM-LoRA", "tcd": "TCD", "guided_latent": "guided (latent)",
                  "sdxl": "SDXL", "flow": "flow-matching", "serve": "real time", "emoji_pixel": "emoji pixel testbed"}


def _older_ruler(report: BenchReport) -> str:
    """The emoji sections whose rows were scored before the feature network, on the group classifier's features
    (a section records the network that gave its features under "features")."""
    sections = {title: getattr(report, key, None) for key, title in EMOJI_SECTIONS.items()}
    old = [title for title, section in sections.items()
           if section and features_of(section) == OLD_FEATURES]
    if not old:
        return ""
    return (f"The emoji rows of the {', '.join(old)} section{'s' * (len(old) > 1)} were scored before `emoji-features` "
            "existed, on the 9-group classifier's features (its FID is on another scale: compare within a section "
            "only). ")


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
