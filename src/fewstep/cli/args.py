"""What every subcommand's parser shares: argparse types, the training flags and the command record.
A leaf: it imports nothing of fewstep's but the training config."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (and exit 2), like every other fewstep error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def command_line(args: argparse.Namespace) -> str:
    """The command as typed, recorded in everything a command writes."""
    return "fewstep " + " ".join(shlex.quote(a) for a in args.argv)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def step_list(text: str) -> list[int]:
    """Comma-separated step counts, e.g. ``1,2,4``."""
    try:
        steps = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2,4, got {text!r}") from None
    if not steps or min(steps) < 1:
        raise argparse.ArgumentTypeError(f"step counts must be at least 1, got {text!r}")
    return steps


def step_set(text: str) -> list[int]:
    """Distinct step counts, largest first."""
    return sorted(set(step_list(text)), reverse=True)


def sigma_list(text: str) -> list[float]:
    """Comma-separated, positive, strictly decreasing noise levels, e.g. ``80,20,5``."""
    try:
        sigmas = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated noise levels like 80,20,5, got {text!r}") from None
    if not sigmas or min(sigmas) <= 0 or any(a <= b for a, b in zip(sigmas, sigmas[1:])):
        raise argparse.ArgumentTypeError(f"noise levels must be positive and strictly decreasing, got {text!r}")
    return sigmas


def add_train_args(p: argparse.ArgumentParser, steps: int, batch: int, lr: float) -> None:
    g = p.add_argument_group("training (shared by every trainer)")
    g.add_argument("--steps", type=positive_int, default=steps, help=f"optimizer steps (default {steps})")
    g.add_argument("--batch", type=positive_int, default=batch, help=f"global batch size (default {batch})")
    g.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr})")
    g.add_argument("--warmup", type=int, default=200, help="linear LR warm-up steps")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    g.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights")
    g.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    g.add_argument("--checkpoint-every", type=positive_int, default=500)
    g.add_argument("--keep-checkpoints", type=positive_int, default=2)
    g.add_argument("--work-dir", help="checkpoints and metrics.jsonl (default: runs/<name of --out>); "
                                      "an existing run there is resumed")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def train_config(args: argparse.Namespace):
    from ..training import TrainConfig

    return TrainConfig(out_dir=args.work_dir or str(Path("runs") / Path(args.out).name), max_steps=args.steps,
                       batch_size=args.batch, grad_accum=args.grad_accum, lr=args.lr, warmup_steps=args.warmup,
                       grad_clip=args.grad_clip, ema_decay=args.ema, mixed_precision=args.mixed_precision,
                       checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
                       seed=args.seed, progress=not args.no_progress)


def add_lora_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--lora", action="append", metavar="PATH[:WEIGHT]",
                   help=f"text-to-image pipelines: {what} (a diffusers, peft or kohya file, or a fewstep LoRA folder or "
                        f"set) with weight λ (default 1); repeat to combine, e.g. a style LoRA and an LCM-LoRA (then "
                        f"2–8 steps)")
