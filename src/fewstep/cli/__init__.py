"""The ``fewstep`` command line: one module per subcommand, each with ``add_parser(sub)`` and ``run(args)``.
Every subcommand has ``--help``; bad input gets one line on stderr and exit status 2, never a traceback and
never a half-written output."""

from __future__ import annotations

import argparse
import sys

from ..errors import FewstepError
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
from .args import Parser

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
