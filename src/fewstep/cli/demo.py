"""``fewstep demo``: the problem fewstep solves, on the shipped teachers and their distilled students.

A diffusion teacher is good at 50 steps and degrades at 1, 2 and 4 (few-step samples are blurred
posterior means: still recognisable, far from the data distribution): the demo samples the same
labels (digits) or captions (emoji, text-to-image) with the same seed at each step count and shows
the grid and a table of steps, network evaluations, seconds, FID and conditional accuracy (both
from the shipped classifier of the data set), for the teachers and the few-step students beside them.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import FewstepError
from ..eval.evaluate import eval_conditions, ruler_for
from ..io.atomic import check_creatable, write_text
from ..io.images import labeled_rows, make_grid, save_png
from ..models.folders import load_model, shipped_models_dir
from ..models.loras import apply_loras
from ..nets.classifier import accuracy
from ..sampling.generate import generate, nfe
from .args import per_class, seed


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="teachers at 25-50 steps beside their 1-4-step students: grid + table",
                       description="Sample the shipped teachers (digits at 50 DPM-Solver++ steps; the emoji text-to-image "
                                   "pipeline at 25) with classifier-free guidance, at 4, 2 and 1 steps, and their "
                                   "distilled students (CD, progressive, LCM) at 1-4 steps, with the same labels or "
                                   "captions and seed: a PNG grid and a table of steps, network evaluations, seconds, "
                                   "FID and conditional accuracy.")
    p.add_argument("--out", default="fewstep-demo", help="output folder (default ./fewstep-demo)")
    p.add_argument("--models", help="folder of shipped models (default: the repository's models/)")
    p.add_argument("--per-class", type=per_class, default=20, help="samples per digit for the accuracy figure")
    p.add_argument("--seed", type=seed, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise FewstepError(f"--out {args.out} is a file; the demo writes a folder (demo.png, demo.json)")
    check_creatable(args.out)        # an unwritable place is refused before minutes of sampling, not after
    run_demo(Path(args.models or shipped_models_dir()), Path(args.out), per_class=args.per_class, seed=args.seed)


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
# "BASE+LORA" is a pipeline folder with a LoRA plugged in (λ = 1).
DEMO_RUNS: list[tuple[str, str, tuple[int, ...]]] = [
    ("digits-teacher", "dpmpp-2m", (50, 4, 2, 1)),
    ("digits-cd", "consistency", (1, 2)),       # consistency distillation (Song et al. 2023), guidance built in
    ("digits-progressive", "ddim", (4, 2)),     # guided + progressive distillation (Meng et al. 2023), s an input
    ("emoji-sd", "dpmpp-2m", (25, 4)),          # the text-to-image teacher (a diffusers SD pipeline), CFG
    ("emoji-lcm", "consistency", (4, 2, 1)),    # latent consistency distillation (Luo et al. 2023)
    ("emoji-sd+emoji-lcm-lora", "consistency", (4,)),  # LCM-LoRA plugged into the teacher, no training (Luo et al. 2023b)
    ("emoji-progressive", "ddim-stochastic", (4, 2)),  # guided + progressive distillation of the text-to-image
                                                # teacher, Meng et al.'s stochastic sampler (better than DDIM here)
]


def run_demo(models_dir: Path, out_dir: Path, per_class: int = 20, seed: int = 0) -> list[DemoRow]:
    if not (models_dir / "digits-classifier").is_dir():
        raise FewstepError(f"no shipped models under {models_dir}: set FEWSTEP_MODELS or pass --models")
    out_dir.mkdir(parents=True, exist_ok=True)
    rulers: dict = {}
    rows, strips = [], []
    for name, sampler, step_counts in DEMO_RUNS:
        base, *loras = name.split("+")
        if not all((models_dir / n).is_dir() for n in (base, *loras)):
            continue
        model = load_model(models_dir / base)
        if loras:
            model = apply_loras(model, [(models_dir / n, 1.0) for n in loras])
        ruler = rulers.setdefault(model.config.dataset, ruler_for(model, models_dir))
        num_classes = len(ruler.data.class_names)
        guidance = model.config.default_guidance_scale
        for steps in step_counts:
            start = time.perf_counter()
            images, labels, evals = _sample(model, ruler, per_class * num_classes, steps, sampler, guidance, seed)
            seconds = time.perf_counter() - start
            row = DemoRow(name, sampler, steps, guidance, evals, round(seconds, 3),
                          round(seconds / len(labels), 5), round(ruler.fid(images), 3),
                          round(accuracy(ruler.classifier, images, labels), 4))
            rows.append(row)
            print(_format_row(row) if len(rows) > 1 else _header() + "\n" + _format_row(row), flush=True)
            strips.append((f"{name}\n{sampler}, {steps} step{'s' * (steps > 1)}\nFID {row.fid:.2f}, "
                           f"acc {row.cond_accuracy:.0%}",
                           make_grid(images[: 2 * num_classes], nrow=num_classes, scale=3 if model.config.image_size <= 16 else 2)))
    print(f"\nFID: Fréchet distance of the data set's classifier features of the samples ({per_class} per class or "
          "caption group) to the whole data set (lower is better; small sample counts inflate it equally for every row). "
          "emoji: prompts are the emoji's own captions, accuracy = classified into the caption's Unicode group.")
    png = save_png(labeled_rows(strips), out_dir / "demo.png")
    write_text(out_dir / "demo.json",
               json.dumps({"seed": seed, "per_class": per_class, "results": [asdict(r) for r in rows]}, indent=2))
    print(f"\nwrote {png} and {out_dir / 'demo.json'}")
    return rows


def _sample(model, ruler, num: int, steps: int, sampler: str, guidance: float, seed: int):
    """(images, the labels they should classify as, network evaluations per image): the captions of the data
    set for a text-to-image model, every class in turn for a pixel model."""
    if model.conditioner.text:
        cond, labels = eval_conditions(model, ruler.data, num, seed)
    else:
        cond = labels = torch.arange(model.config.num_classes).repeat(num // model.config.num_classes)
    images = generate(model, cond, steps=steps, sampler=sampler, guidance_scale=guidance, seed=seed)
    return images, labels, nfe(model, sampler, steps, guidance)


def _header() -> str:
    return (f"{'model':<23} {'sampler':<15} {'steps':>5} {'NFE':>4} {'seconds':>8} {'s/image':>8} {'FID':>7} "
            f"{'cond. acc.':>10}\n" + "-" * 87)


def _format_row(r: DemoRow) -> str:
    return (f"{r.model:<23} {r.sampler:<15} {r.steps:>5} {r.nfe:>4} {r.seconds:>8.2f} {r.seconds_per_image:>8.4f} "
            f"{r.fid:>7.3f} {r.cond_accuracy:>10.1%}")
