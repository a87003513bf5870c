"""The ``fewstep`` command line: one module per subcommand, each with ``add_parser(sub)`` and ``run(args)``.
Every subcommand has ``--help``; bad input gets one line on stderr and exit status 2, never a traceback and
never a half-written output."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from ..errors import FewstepError
from ..io.atomic import allow_replacing
from ..models.folders import shipped_models_dir
from . import (
    bench,
    demo,
    distill,
    edit,
    evaluate,
    lora,
    sample,
    serve,
    train_classifier,
    train_lora,
    train_teacher,
    train_tiny_vae,
)
from .args import Parser, check_limits

__all__ = ["build_parser", "main", "shipped_models_dir"]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fewstep",
                    description="Make diffusion models fast: distill or train few-step generators, and run them.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)
    demo.add_parser(sub)
    train_teacher.add_parser(sub)
    distill.add_parsers(sub)           # distill, and train (its teacher-free methods)
    train_lora.add_parser(sub)
    train_tiny_vae.add_parser(sub)
    lora.add_parser(sub)
    train_classifier.add_parser(sub)
    evaluate.add_parser(sub)
    bench.add_parser(sub)
    sample.add_parser(sub)
    edit.add_parser(sub)
    serve.add_parser(sub)
    return parser


def _quiet_loaders() -> None:
    """No per-file "Loading weights" bars from transformers/diffusers: a command prints its own progress."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")   # nothing is fetched: no hub lookups, no "error while fetching"
    warnings.formatwarning = lambda message, *_, **__: f"fewstep: warning: {message}\n"
    _quiet_loaders()
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        check_limits(args)
    except argparse.ArgumentTypeError as e:
        parser.exit(2, f"fewstep {args.command}: error: {e}\n")
    overwrite = [args.out] if getattr(args, "overwrite", False) and getattr(args, "out", None) else []
    try:
        with allow_replacing(*overwrite):
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
