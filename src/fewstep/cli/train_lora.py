"""``fewstep train-lora``: a style LoRA on a text-to-image pipeline."""

from __future__ import annotations

import argparse

from .args import add_data_args, add_train_args, augment, command_line, lora_rank, stream, train_config


def add_parser(sub) -> None:
    p = sub.add_parser("train-lora", help="fine-tune a style LoRA on a text-to-image pipeline",
                       description="Train LoRA adapters on a diffusers pipeline's UNet with the ordinary diffusion loss "
                                   "on a captioned data set (emoji, optionally one --group of it; an image folder with "
                                   "metadata.jsonl; a saved HF dataset; webdataset shards). The result is a diffusers "
                                   "LoRA that `fewstep sample --lora` and `fewstep lora merge` combine with an LCM-LoRA "
                                   "(Luo et al. 2023b: θ_pre + λ1·τ_style + λ2·τ_LCM, no further training).")
    p.add_argument("--base", required=True, help="the pipeline folder to adapt, e.g. models/emoji-sd")
    p.add_argument("--dataset", default="emoji", help="captioned data (default emoji)")
    p.add_argument("--group", help="only the images of this class/group, e.g. 'Animals & Nature'")
    p.add_argument("--out", required=True, help="LoRA folder to write")
    p.add_argument("--rank", type=lora_rank, default=8, help="LoRA rank (default 8)")
    add_data_args(p, stream=True)
    add_train_args(p, steps=1000, batch=64, lr=1e-3)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..methods.style_lora import train_style_lora
    from ..models.data import data_for
    from ..models.folders import load_model

    base = load_model(args.base)
    data = data_for(base, args.dataset, augment(args), stream(args))
    if args.group:
        data = data.of_class(args.group)
    folder = train_style_lora(base, data, args.out, train_config(args), rank=args.rank, command=command_line(args))
    if folder is not None:
        print(f"saved the style LoRA to {folder}")
