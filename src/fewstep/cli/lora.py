"""``fewstep lora merge``: LoRA arithmetic with no training, fused into a pipeline or kept as a set.
``fewstep lora export``: a LoRA in the key layout AUTOMATIC1111/ComfyUI/kohya, diffusers or peft read."""

from __future__ import annotations

import argparse
from pathlib import Path

from .args import Parser, add_dtype_args, command_line, load_options
from .export import SINGLE_FILE_HELP, written_dtype


class SingleFile(argparse.Action):
    """``--single-file``: --out is then a file, so it is not checked as a folder before the work
    (``folder_outputs``, :func:`fewstep.cli.check_outputs`); the file's own checks apply."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.single_file = True
        namespace.folder_outputs = ()


def add_parser(sub) -> None:
    p = sub.add_parser("lora", help="LoRA arithmetic and export: merge adapters into a pipeline, or export one",
                       description="Combine LoRAs with a base pipeline with no training, or export one for other "
                                   "tools.")
    lora_sub = p.add_subparsers(dest="lora_command", metavar="ACTION", required=True, parser_class=Parser)
    m = lora_sub.add_parser("merge", help="θ' = θ_base + Σ λ_i·τ_i: a fused pipeline folder, or a set of adapters",
                            description="Fuse LoRAs (diffusers, peft or kohya files, or fewstep LoRA folders) with weights "
                                        "into --base and write a diffusers pipeline folder. With an LCM-LoRA among them the "
                                        "result is an LCM (LCMScheduler, 2–8 steps). With --no-fuse, write the adapters and "
                                        "their weights as a set instead (sample it with --model BASE --lora SET). Each LoRA "
                                        "is checked against the base before anything is written.")
    m.add_argument("--base", required=True, help="pipeline folder, e.g. models/emoji-sd")
    m.add_argument("--lora", action="append", required=True, metavar="PATH[:WEIGHT][:lcm]",
                   help="a LoRA and its weight λ (default 1); repeat, e.g. --lora style:1.0 --lora "
                        "models/emoji-lcm-lora:1.0. A file that does not say what it is (no fewstep.json beside it, "
                        "no fewstep metadata) counts as a style LoRA; add :lcm to declare it an LCM-LoRA, e.g. "
                        "--lora lcm-lora-sdv1-5.safetensors:1:lcm")
    m.add_argument("--out", required=True, help="pipeline folder to write (with --no-fuse: the adapter set's folder; "
                                                "with --single-file: the .safetensors file)")
    m.add_argument("--no-fuse", action="store_true",
                   help="keep the adapters separate: a folder of the LoRAs and their weights, not a fused pipeline")
    m.add_argument("--single-file", action=SingleFile, nargs=0, default=False,
                   help="write the fused pipeline as one original-format checkpoint (--out FILE.safetensors) instead "
                        "of a folder: " + SINGLE_FILE_HELP.split(" (", 1)[0].removeprefix("write ") + " (SD 1.x, SDXL)")
    m.add_argument("--overwrite", action="store_true",
                   help="write --out even if it is an existing folder that fewstep did not write: fewstep's files "
                        "are put in (replacing those of the same names), everything else there stays")
    add_dtype_args(m)
    m.set_defaults(func=run_merge, folder_outputs=("out",))   # checked before any work (fewstep.cli.check_outputs)
    add_export_parser(lora_sub)


def add_export_parser(lora_sub) -> None:
    """``fewstep lora export LORA --format {kohya,diffusers,peft} --out FILE.safetensors [--overwrite]``."""
    e = lora_sub.add_parser("export", help="write a LoRA in the keys AUTOMATIC1111/ComfyUI/kohya, diffusers or "
                                           "peft read",
                            description="Write a fewstep LoRA in another tool's key layout, with diffusers' own "
                                        "converters. kohya: lora_unet_….lora_down/lora_up/alpha keys (α = the rank, "
                                        "scale 1), what AUTOMATIC1111, ComfyUI, kohya's tools and diffusers load; a "
                                        "FLUX or SD3 LoRA gets sd-scripts' names of the original transformer "
                                        "(lora_unet_double_blocks_0_img_attn_qkv, lora_unet_joint_blocks_0_x_block_"
                                        "attn_qkv: q/k/v fused exactly, block-diagonal), which ComfyUI and Forge load "
                                        "and diffusers reads for FLUX.1-sized models. "
                                        "diffusers: unet.….lora_A/lora_B keys, what pipe.load_lora_weights reads. "
                                        "peft: base_model.model.….lora_A/lora_B keys, a PeftModel's state dict; with "
                                        "--out a folder (no .safetensors suffix), peft's save_pretrained layout "
                                        "(adapter_model.safetensors + adapter_config.json) for "
                                        "PeftModel.from_pretrained(unet, FOLDER). Every file records in its "
                                        "safetensors metadata what the LoRA is (fewstep_kind: lcm-lora or style; "
                                        "fewstep_original_inference_steps; fewstep_rank, fewstep_alpha, fewstep_base, "
                                        "fewstep_format), so fewstep samples a bare exported LCM-LoRA with LCM's "
                                        "sampler.")
    e.add_argument("lora", metavar="LORA",
                   help="a fewstep LoRA folder (e.g. models/emoji-lcm-lora) or its .safetensors file")
    e.add_argument("--format", required=True, choices=("kohya", "diffusers", "peft"), help="the key layout to write")
    e.add_argument("--out", required=True, help="the .safetensors file to write (with --format peft, or a folder)")
    e.add_argument("--overwrite", action="store_true", help="replace --out if it exists (refused otherwise)")
    e.add_argument("--base", default=None, metavar="DIR",
                   help="the pipeline the LoRA adapts (default: the one its fewstep.json records). With --format "
                        "kohya an SDXL base gets kohya's SDXL module names, the original (SGM) blocks "
                        "(lora_unet_input_blocks_4_1_…), which AUTOMATIC1111 maps right; SD 1.x/2.x keep diffusers' "
                        "block names (lora_unet_down_blocks_1_…), kohya's SD 1.x convention; a FLUX or SD3 LoRA needs "
                        "its base (recorded, or this) for kohya's names, the two transformers' diffusers names being "
                        "alike")
    e.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> None:
    """A LoRA in another tool's layout (:func:`fewstep.models.lora_export.export_lora`)."""
    from ..models.lora_export import export_lora, readers
    from ..models.loras import lora_info

    out = export_lora(args.lora, args.format, args.out, overwrite=args.overwrite, base=args.base)
    info = lora_info(out if out.is_file() else out / "adapter_model.safetensors")
    kind = info.get("kind", "LoRA")
    print(f"wrote the {kind} {args.lora} in {args.format}'s layout to {out} ({readers(out, args.format)})")


def run_merge(args: argparse.Namespace) -> None:
    """θ_pre + Σ λ_i·τ_i fused into a new pipeline folder (an LCM when an LCM-LoRA is among them), or with
    ``--no-fuse`` the adapters and their weights as a set that ``--lora`` takes."""
    from ..errors import FewstepError
    from ..io.atomic import check_writable
    from ..models.folders import save_model
    from ..models.loras import (
        expand_lora_sets,
        load_with_loras,
        parse_lora_spec,
        save_lora_set,
    )

    if args.single_file and args.no_fuse:
        raise FewstepError("--single-file writes the fused pipeline; --no-fuse keeps the adapters apart: choose one")
    if args.single_file:                                  # before minutes of loading: the file's own checks
        check_writable(args.out, ".safetensors", "--out")
        if Path(args.out).exists() and not args.overwrite:
            raise FewstepError(f"--out {args.out} exists; choose another path, or pass --overwrite to replace it")
    model = load_with_loras(args.base, args.lora, **load_options(args))    # every adapter checked against the base, fused or not
    command = command_line(args)
    if args.single_file:
        from ..models.single_file_export import write_single_file

        out = write_single_file(model, args.out, written_dtype(args), overwrite=args.overwrite, source=command)
        print(f"wrote the merged pipeline as one original-format checkpoint to {out}"
              + (" (an LCM: sample it in 2–8 steps with an LCM scheduler)" if model.config.is_lcm else ""))
        return
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
