"""``fewstep demo``: the problem fewstep solves, on the shipped digits teacher.

A diffusion teacher is good at 50 steps and degrades at 1, 2 and 4 (few-step samples are blurred
posterior means: still recognisable, far from the data distribution): the demo samples the same
labels with the same seed at each step count and shows the grid and a table of steps, network
evaluations, seconds, FID and conditional accuracy (both from the shipped classifier).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .atomic import write_text
from .classifier import accuracy, load_classifier
from .data import load_digits
from .errors import FewstepError
from .evaluate import Ruler
from .images import labeled_rows, make_grid, save_png
from .models import load_model
from .sampling import generate, nfe


@dataclass
class DemoRow:
    model: str
    sampler: str
    steps: int
    guidance_scale: float
    nfe: int
    seconds: float
    seconds_per_image: float
    fid: float
    cond_accuracy: float


# (model folder name, sampler, step counts): later methods add their distilled models here.
DEMO_RUNS: list[tuple[str, str, tuple[int, ...]]] = [
    ("digits-teacher", "dpmpp-2m", (50, 4, 2, 1)),
    ("digits-cd", "consistency", (1, 2)),       # consistency distillation (Song et al. 2023), guidance built in
]


def run_demo(models_dir: Path, out_dir: Path, per_class: int = 20, seed: int = 0) -> list[DemoRow]:
    if not (models_dir / "digits-classifier").is_dir():
        raise FewstepError(f"no shipped models under {models_dir}: set FEWSTEP_MODELS or pass --models")
    out_dir.mkdir(parents=True, exist_ok=True)
    classifier = load_classifier(models_dir / "digits-classifier")
    ruler = Ruler(classifier, load_digits())
    rows, strips = [], []
    for name, sampler, step_counts in DEMO_RUNS:
        model = load_model(models_dir / name)
        labels = torch.arange(model.config.num_classes).repeat(per_class)
        guidance = model.config.default_guidance_scale
        for steps in step_counts:
            start = time.perf_counter()
            images = generate(model, labels, steps=steps, sampler=sampler, guidance_scale=guidance, seed=seed)
            seconds = time.perf_counter() - start
            row = DemoRow(name, sampler, steps, guidance, nfe(model, sampler, steps, guidance), round(seconds, 3),
                          round(seconds / len(labels), 5), round(ruler.fid(images), 3),
                          round(accuracy(classifier, images, labels), 4))
            rows.append(row)
            print(_format_row(row) if len(rows) > 1 else _header() + "\n" + _format_row(row), flush=True)
            strips.append((f"{name}\n{sampler}, {steps} step{'s' * (steps > 1)}\nFID {row.fid:.2f}, "
                           f"acc {row.cond_accuracy:.0%}",
                           make_grid(images[: 2 * model.config.num_classes], nrow=model.config.num_classes, scale=3)))
    print(f"\nFID: Fréchet distance of the shipped classifier's features of {len(labels)} samples to the whole "
          "data set (lower is better; small sample counts inflate it equally for every row).")
    png = save_png(labeled_rows(strips), out_dir / "demo.png")
    write_text(out_dir / "demo.json",
               json.dumps({"seed": seed, "per_class": per_class, "results": [asdict(r) for r in rows]}, indent=2))
    print(f"\nwrote {png} and {out_dir / 'demo.json'}")
    return rows


def _header() -> str:
    return (f"{'model':<16} {'sampler':<9} {'steps':>5} {'NFE':>4} {'seconds':>8} {'s/image':>8} {'FID':>7} "
            f"{'cond. acc.':>10}\n" + "-" * 74)


def _format_row(r: DemoRow) -> str:
    return (f"{r.model:<16} {r.sampler:<9} {r.steps:>5} {r.nfe:>4} {r.seconds:>8.2f} {r.seconds_per_image:>8.4f} "
            f"{r.fid:>7.3f} {r.cond_accuracy:>10.1%}")
