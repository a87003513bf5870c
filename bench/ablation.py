"""What the training-ablation scripts of bench/ share: their two-phase command line and how they write
their results (``python bench/<script>.py train [--runs ...]`` then ``score``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable, Sequence

import torch

from fewstep.io.atomic import write_text


def write_result(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


def main(doc: str, runs: Sequence[str], train_runs: Callable[[list[str]], None], score: Callable[[], None],
         argv: list[str] | None = None) -> None:
    """``train --runs NAME...`` (default: all of ``runs``), or ``score``."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=["train", "score"])
    ap.add_argument("--runs", nargs="+", choices=list(runs), default=list(runs))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    train_runs(args.runs) if args.phase == "train" else score()
