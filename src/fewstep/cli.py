"""The ``fewstep`` command line. Every subcommand has ``--help``; bad input gets one line on
stderr and exit status 2, never a traceback and never a half-written output."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from .errors import FewstepError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (and exit 2), like every other fewstep error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def shipped_models_dir() -> Path:
    """Where the shipped models live: $FEWSTEP_MODELS, else the repository's models/, else ./models."""
    import os

    if os.environ.get("FEWSTEP_MODELS"):
        return Path(os.environ["FEWSTEP_MODELS"])
    repo = Path(__file__).resolve().parents[2] / "models"
    return repo if repo.is_dir() else Path("models")


def _command_line(args: argparse.Namespace) -> str:
    """The command as typed, recorded in everything a command writes."""
    return "fewstep " + " ".join(shlex.quote(a) for a in args.argv)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _train_args(p: argparse.ArgumentParser, steps: int, batch: int, lr: float) -> None:
    g = p.add_argument_group("training (shared by every trainer)")
    g.add_argument("--steps", type=_positive_int, default=steps, help=f"optimizer steps (default {steps})")
    g.add_argument("--batch", type=_positive_int, default=batch, help=f"global batch size (default {batch})")
    g.add_argument("--grad-accum", type=_positive_int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr})")
    g.add_argument("--warmup", type=int, default=200, help="linear LR warm-up steps")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    g.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights")
    g.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    g.add_argument("--checkpoint-every", type=_positive_int, default=500)
    g.add_argument("--keep-checkpoints", type=_positive_int, default=2)
    g.add_argument("--work-dir", help="checkpoints and metrics.jsonl (default: runs/<name of --out>); "
                                      "an existing run there is resumed")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _train_config(args: argparse.Namespace):
    from .train import TrainConfig

    return TrainConfig(out_dir=args.work_dir or str(Path("runs") / Path(args.out).name), max_steps=args.steps,
                       batch_size=args.batch, grad_accum=args.grad_accum, lr=args.lr, warmup_steps=args.warmup,
                       grad_clip=args.grad_clip, ema_decay=args.ema, mixed_precision=args.mixed_precision,
                       checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
                       seed=args.seed, progress=not args.no_progress)


# --- subcommands -------------------------------------------------------------------------------
def cmd_train_teacher(args: argparse.Namespace) -> None:
    from .data import load_dataset
    from .teacher import train_teacher

    data = load_dataset(args.dataset, args.image_size, args.channels)
    folder = train_teacher(data, args.out, _train_config(args), width=args.width,
                           label_dropout=args.label_dropout, command=_command_line(args))
    if folder is not None:
        print(f"saved teacher to {folder}")


def cmd_train_classifier(args: argparse.Namespace) -> None:
    from .classifier import save_classifier, train_classifier
    from .data import load_dataset

    data = load_dataset(args.dataset, args.image_size, args.channels)
    train_set, heldout = data.split(args.holdout, seed=args.seed)
    model = train_classifier(train_set, heldout, epochs=args.epochs, seed=args.seed, progress=not args.no_progress)
    save_classifier(model, args.out, _command_line(args))
    print(f"saved classifier to {args.out}: held-out accuracy {model.config.heldout_accuracy:.4f} "
          f"on {len(heldout)} images")


def cmd_sample(args: argparse.Namespace) -> None:
    import math

    import torch

    from .atomic import check_writable
    from .images import make_grid, save_png
    from .models import load_model
    from .sampling import generate

    out = check_writable(args.out, ".png")  # fail before any work
    model = load_model(args.model)
    cfg = model.config
    guidance = cfg.default_guidance_scale if args.guidance_scale is None else args.guidance_scale
    if cfg.class_names:  # one row per label, --num images each
        labels = torch.tensor(args.label or list(range(cfg.num_classes))).repeat_interleave(args.num)
        images = generate(model, labels, steps=args.steps, sampler=args.sampler, guidance_scale=guidance,
                          seed=args.seed, progress=True)
        nrow = args.num
    else:
        if args.label:
            raise FewstepError(f"{args.model} is unconditional; it takes no --label")
        images = generate(model, num=args.num, steps=args.steps, sampler=args.sampler, seed=args.seed, progress=True)
        nrow = math.ceil(math.sqrt(args.num))
    save_png(make_grid(images, nrow=nrow, scale=args.scale), out)
    print(f"wrote {len(images)} samples to {out}")


def _step_list(text: str) -> list[int]:
    try:
        steps = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2,4, got {text!r}") from None
    if not steps or min(steps) < 1:
        raise argparse.ArgumentTypeError(f"step counts must be at least 1, got {text!r}")
    return steps


def cmd_eval(args: argparse.Namespace) -> None:
    import json

    from .atomic import check_writable, write_text
    from .evaluate import eval_report, evaluate, ruler_for
    from .images import labeled_rows, make_grid, save_png
    from .models import load_model

    for path, suffix in ((args.json, None), (args.grid, ".png")):
        if path:
            check_writable(path, suffix)  # fail before any work
    model = load_model(args.model)
    ruler = ruler_for(model, Path(args.models or shipped_models_dir()), args.classifier)
    rows, samples = evaluate(model, ruler, args.steps, args.sampler, args.guidance_scale, args.num, args.seed)
    report = eval_report(model, rows, args.num, args.seed)
    print(f"{'steps':>5} {'NFE':>4} {'FID':>8} {'KID':>9} {'prec':>6} {'recall':>6} {'acc':>6} {'s/img':>8}")
    for r in rows:
        acc = "-" if r.cond_accuracy is None else f"{r.cond_accuracy:.3f}"
        print(f"{r.steps:>5} {r.nfe:>4} {r.fid:>8.3f} {r.kid:>9.5f} {r.precision:>6.3f} {r.recall:>6.3f} "
              f"{acc:>6} {r.seconds_per_image:>8.5f}")
    if args.json:
        write_text(args.json, json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.grid:
        c = max(model.config.num_classes, 8)
        save_png(labeled_rows([(f"{n} steps", make_grid(samples[n][: 2 * c], nrow=c, scale=3)) for n in args.steps],
                              margin=70), args.grid)
        print(f"wrote {args.grid}")


def cmd_bench(args: argparse.Namespace) -> None:
    from .bench import BenchSettings, run_bench

    settings = BenchSettings.quick_settings() if args.quick else BenchSettings()
    if args.num:
        settings.num = args.num
    settings.seed = args.seed
    markdown = None if args.no_markdown else Path(args.markdown)
    run_bench(Path(args.models or shipped_models_dir()), Path(args.out), settings, _command_line(args), markdown)
    print(f"wrote {args.out}/bench.json and plots" + (f", and {markdown}" if markdown else ""))


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(Path(args.models or shipped_models_dir()), Path(args.out), per_class=args.per_class, seed=args.seed)


# --- parser ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from .solvers import SAMPLERS

    parser = _Parser(
        prog="fewstep",
        description="Make diffusion models fast: distill or train few-step generators, and run them.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    p = sub.add_parser("demo", help="the teacher at 50 steps beside 1, 2 and 4 steps: grid + table",
                       description="Sample the shipped digits teacher at 50 DPM-Solver++ steps and at 1, 2 and 4 "
                                   "steps, with classifier-free guidance, and show what few-step sampling costs in "
                                   "quality: a PNG grid and a table of steps, seconds and conditional accuracy.")
    p.add_argument("--out", default="fewstep-demo", help="output folder (default ./fewstep-demo)")
    p.add_argument("--models", help="folder of shipped models (default: the repository's models/)")
    p.add_argument("--per-class", type=_positive_int, default=20, help="samples per digit for the accuracy figure")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train-teacher", help="train a class-conditional diffusion teacher",
                       description="Train a class-conditional EDM diffusion model (diffusers UNet2DModel, label "
                                   "dropout for classifier-free guidance) and save its EMA weights as a model folder. "
                                   "Runs unchanged under `accelerate launch` and resumes from --work-dir.")
    p.add_argument("--dataset", default="digits", help="'digits' or an image folder (class sub-folders)")
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--image-size", type=_positive_int, default=None, help="resize images (digits: 16)")
    p.add_argument("--channels", type=int, choices=[1, 3], default=1, help="for image folders: 1 (L) or 3 (RGB)")
    p.add_argument("--width", type=_positive_int, default=32, help="UNet base width (32: 1.6M parameters)")
    p.add_argument("--label-dropout", type=float, default=0.1, help="probability of the null label (for CFG)")
    _train_args(p, steps=4000, batch=128, lr=2e-4)
    p.set_defaults(func=cmd_train_teacher)

    p = sub.add_parser("train-classifier", help="train the small classifier used for accuracy and FID features",
                       description="Train the CNN that judges samples (conditional accuracy) and embeds them "
                                   "(FID/KID features); reports held-out accuracy.")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--out", required=True)
    p.add_argument("--image-size", type=_positive_int, default=None)
    p.add_argument("--channels", type=int, choices=[1, 3], default=1)
    p.add_argument("--epochs", type=_positive_int, default=60)
    p.add_argument("--holdout", type=float, default=0.2, help="fraction held out for the accuracy figure")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train_classifier)

    p = sub.add_parser("eval", help="FID, KID, precision/recall and conditional accuracy per step count",
                       description="Sample a model with fixed seeds at each step count and score the samples "
                                   "with the data set's shipped classifier against the whole data set: FID, KID "
                                   "(± std), precision/recall (k=3), conditional accuracy, NFE and seconds/image.")
    p.add_argument("--model", required=True, help="model folder")
    p.add_argument("--steps", type=_step_list, default=[1, 2, 4], help="comma-separated step counts (default 1,2,4)")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default="dpmpp-2m")
    p.add_argument("--guidance-scale", type=float, default=None, help="1.0 = none (default: the model's)")
    p.add_argument("--num", type=_positive_int, default=1000, help="samples per step count (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classifier", help="classifier folder (default: models/<dataset>-classifier)")
    p.add_argument("--models", help="folder of shipped models (default: the repository's models/)")
    p.add_argument("--json", help="write the results as one JSON object here")
    p.add_argument("--grid", help="write a PNG of samples per step count here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="quality-vs-steps and speed tables for the teacher's solvers and distilled models",
                       description="In one process: the teacher with DDIM, Euler, Heun and DPM-Solver++(2M) at 1-50 "
                                   "steps and every distilled model, scored the same way; wall-clock per image at a "
                                   "fixed batch with each sampler's overhead over its NFE x network-time floor; and "
                                   "the speedup at matched FID. Writes JSON, PNG plots and BENCHMARKS.md.")
    p.add_argument("--out", default="bench/results", help="folder for bench.json and the plots")
    p.add_argument("--markdown", default="BENCHMARKS.md", help="the markdown table to (re)write")
    p.add_argument("--no-markdown", action="store_true", help="do not write the markdown table")
    p.add_argument("--quick", action="store_true", help="small sample counts and step sets (a smoke test)")
    p.add_argument("--num", type=_positive_int, help="samples per quality point (default 1000; quick: 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", help="folder of shipped models (default: the repository's models/)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("sample", help="sample a grid of images from a model",
                       description="Sample any model fewstep can load and write a PNG grid. Without --label a "
                                   "class-conditional model gives --num rows of one image per class.")
    p.add_argument("--model", required=True, help="model folder")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default="dpmpp-2m",
                   help="ddim (= euler in σ space), euler, heun (2 evaluations/step), dpmpp-2m, ddpm (stochastic)")
    p.add_argument("--steps", type=_positive_int, default=25, help="sampling steps (default 25)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance, 1.0 = none (default: the model's, 2.0 for digits)")
    p.add_argument("--label", type=int, nargs="+", help="class labels to sample (default: every class)")
    p.add_argument("--num", type=_positive_int, default=8, help="images per label (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=_positive_int, default=4, help="pixel upscaling of the grid (default 4)")
    p.add_argument("--out", default="samples.png", help="PNG file to write")
    p.set_defaults(func=cmd_sample)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        args.func(args)
    except FewstepError as e:
        print(f"fewstep: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fewstep: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
