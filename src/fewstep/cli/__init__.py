"""The ``fewstep`` command line: one module per subcommand, each with ``add_parser(sub)`` and ``run(args)``.
Every subcommand has ``--help``; bad input gets one line on stderr and exit status 2, never a traceback and
never a half-written output.

A user's files are never destroyed (DESIGN.md §2), for every subcommand at once, here at the edge: :func:`main`
names the parsed command's inputs (:data:`INPUTS`) to :func:`fewstep.io.atomic.protect_inputs`, so no output
of any subcommand may be, lie inside or contain one of them, and checks every output (:data:`OUTPUTS`) against
them before any work; a subcommand that writes a folder (``folder_outputs`` in its parser's defaults) has that
folder checked too (fewstep's own, or ``--overwrite``). A full disk or an unwritable folder is one line."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from ..errors import FewstepError
from ..io.atomic import (
    allow_replacing,
    check_not_input,
    check_replaceable,
    io_error_message,
    protect_inputs,
    recording_command,
    remove_stale_temporaries,
)
from ..models.folders import shipped_models_dir
from . import (
    bench,
    demo,
    distill,
    edit,
    evaluate,
    export,
    lora,
    sample,
    serve,
    train_classifier,
    train_lora,
    train_teacher,
    train_tiny_vae,
)
from .args import Parser, check_limits, command_line

__all__ = ["build_parser", "input_paths", "main", "shipped_models_dir"]

# every argument of any subcommand that names something the command reads: attribute -> flag
INPUTS = {"teacher": "--teacher", "base": "--base", "model": "--model", "lora": "--lora", "input": "--input",
          "dataset": "--dataset", "tiny_vae": "--tiny-vae", "classifier": "--classifier", "mask": "--mask",
          "prompts_file": "--prompts-file", "config": "--config", "vae_from": "--vae-from",
          "sample_model": "--sample-model", "models": "--models", "lpips_weights": "--lpips-weights",
          "init_from": "--init-from", "resume": "--resume", "images": "--images"}
# (``bench --reuse`` is read and then deliberately rewritten beside the new report: not an input here)
# every argument that names something the command writes: attribute -> flag
OUTPUTS = {"out": "--out", "out_dir": "--out-dir", "json": "--json", "grid": "--grid", "work_dir": "--work-dir",
           "markdown": "--markdown"}
BUILT_IN_DATA = ("digits", "emoji")


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
    export.add_parser(sub)
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


def _lora_path(spec: str) -> str:
    """The path of a ``PATH[:WEIGHT][:lcm|:style]`` LoRA spec: the part before its weight and kind."""
    parts = spec.split(":")
    while len(parts) > 1:
        try:
            float(parts[-1])
        except ValueError:
            if parts[-1].strip().lower() not in ("lcm", "tcd", "style", "lora"):
                break
        parts.pop()
    return ":".join(parts)


def input_paths(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(path, flag) of everything the parsed command reads from the user's disk (:data:`INPUTS`)."""
    found = []
    for attr, flag in INPUTS.items():
        value = getattr(args, attr, None)
        if attr == "lora" and isinstance(value, str):
            flag = "LORA"                                   # lora export's positional argument
        for item in value if isinstance(value, list) else [value]:
            if not isinstance(item, str) or not item:
                continue
            path = _lora_path(item) if attr == "lora" else item
            if attr == "dataset" and (path in BUILT_IN_DATA or not Path(path).exists()):
                continue                                    # a built-in data set's name, not a path
            found.append((path, flag))
    return found


def check_outputs(args: argparse.Namespace) -> None:
    """Before any work: no output is (in, around) an input; a folder output (``folder_outputs``) may be written
    (:func:`fewstep.io.atomic.check_replaceable`); temporaries a killed run left for an output are removed."""
    for attr, flag in OUTPUTS.items():
        value = getattr(args, attr, None)
        if isinstance(value, str) and value:
            check_not_input(value, flag)
    for attr in getattr(args, "folder_outputs", ()):
        if getattr(args, attr, None):
            check_replaceable(getattr(args, attr), OUTPUTS.get(attr, attr))
    for attr in OUTPUTS:
        value = getattr(args, attr, None)
        if isinstance(value, str) and value:
            remove_stale_temporaries(Path(value))


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
    overwrite = [getattr(args, a) for a in ("out", "out_dir") if getattr(args, "overwrite", False) and getattr(args, a, None)]
    try:
        with protect_inputs(input_paths(args)), recording_command(command_line(args)), allow_replacing(*overwrite):
            check_outputs(args)
            args.func(args)
    except FewstepError as e:
        print(f"fewstep: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:                    # a full disk or an unwritable place outside fewstep's own writes
        outputs = {flag: getattr(args, attr) for attr, flag in OUTPUTS.items() if isinstance(getattr(args, attr, None), str)}
        message = io_error_message(e, getattr(e, "filename", None), writing=False, outputs=outputs)
        if message is None:
            raise
        print(f"fewstep: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fewstep: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
