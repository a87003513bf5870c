"""``fewstep lora merge``: LoRA arithmetic with no training, fused into a pipeline or kept as a set."""

from __future__ import annotations

import argparse

from .args import Parser, command_line


def add_parser(sub) -> None:
    p = sub.add_parser("lora", help="LoRA arithmetic: merge adapters into a pipeline",
                       description="Combine LoRAs with a base pipeline with no training.")
    lora_sub = p.add_subparsers(dest="lora_command", metavar="ACTION", required=True, parser_class=Parser)
    m = lora_sub.add_parser("merge", help="θ' = θ_base + Σ λ_i·τ_i: a fused pipeline folder, or a set of adapters",
                            description="Fuse LoRAs (diffusers, peft or kohya files, or fewstep LoRA folders) with weights "
                                        "into --base and write a diffusers pipeline folder. With an LCM-LoRA among them the "
                                        "result is an LCM (LCMScheduler, 2–8 steps). With --no-fuse, write the adapters and "
                                        "their weights as a set instead (sample it with --model BASE --lora SET). Each LoRA "
                                        "is checked against the base before anything is written.")
    m.add_argument("--base", required=True, help="pipeline folder, e.g. models/emoji-sd")
    m.add_argument("--lora", action="append", required=True, metavar="PATH[:WEIGHT]",
                   help="a LoRA and its weight λ (default 1); repeat, e.g. --lora style:1.0 --lora models/emoji-lcm-lora:1.0")
    m.add_argument("--out", required=True, help="pipeline folder to write (with --no-fuse: the adapter set's folder)")
    m.add_argument("--no-fuse", action="store_true",
                   help="keep the adapters separate: a folder of the LoRAs and their weights, not a fused pipeline")
    m.add_argument("--overwrite", action="store_true",
                   help="replace --out even if it is an existing folder that fewstep did not write")
    m.set_defaults(func=run_merge)


def run_merge(args: argparse.Namespace) -> None:
    """θ_pre + Σ λ_i·τ_i fused into a new pipeline folder (an LCM when an LCM-LoRA is among them), or with
    ``--no-fuse`` the adapters and their weights as a set that ``--lora`` takes."""
    from ..models.folders import save_model
    from ..models.loras import (
        expand_lora_sets,
        load_with_loras,
        parse_lora_spec,
        save_lora_set,
    )

    model = load_with_loras(args.base, args.lora)    # every adapter checked against the base, fused or not
    command = command_line(args)
    if args.no_fuse:
        specs = expand_lora_sets([parse_lora_spec(s) for s in args.lora])
        folder = save_lora_set(args.out, specs, args.base, command)
        print(f"wrote the set of {len(specs)} adapters with their weights to {folder} "
              f"(use it as: --model {args.base} --lora {folder})")
        return
    readme = (f"# {args.out}\n\n`{args.base}` with LoRAs fused in: "
              + ", ".join(f"`{d['path']}` × {d['weight']:g}" for d in model.config.loras) + ".\n")
    merged = model.derive(config=model.replace_config(training={**model.config.training, "merge_command": command}))
    folder = save_model(args.out, merged, readme)
    print(f"wrote the merged pipeline to {folder}" + (" (an LCM: sample it in 2–8 steps)" if model.config.is_lcm else ""))
