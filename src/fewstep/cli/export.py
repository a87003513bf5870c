"""``fewstep export --single-file``: a pipeline folder as one original-format checkpoint for AUTOMATIC1111/ComfyUI."""

from __future__ import annotations

import argparse

from .args import DTYPES, add_dtype_args, load_options

SINGLE_FILE_HELP = ("write one original-format .safetensors checkpoint (LDM/CompVis key names: "
                    "model.diffusion_model.*, first_stage_model.*, cond_stage_model.* or SDXL's conditioner.*) of the "
                    "UNet, VAE and text encoder(s), the file AUTOMATIC1111 and ComfyUI load from their checkpoints "
                    "folder and diffusers' from_single_file and fewstep's --model read back (SD 1.x and SDXL); for "
                    "FLUX and SD3 the transformer alone in its original layout (as flux1-dev.safetensors / "
                    "sd3.5_medium.safetensors: ComfyUI's Load Diffusion Model, diffusers' "
                    "FluxTransformer2DModel/SD3Transformer2DModel.from_single_file), read back with --config FOLDER")


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a pipeline in another tool's format: --single-file for A1111/ComfyUI",
                       description="Write a diffusers pipeline folder (SD 1.x or SDXL; a fewstep LCM-LoRA merge "
                                   "included) as one original-format single-file checkpoint, with the key names of "
                                   "diffusers' convert_diffusers_to_original_stable_diffusion.py / _sdxl.py; a FLUX "
                                   "or SD3 folder as its transformer alone in Black Forest Labs' / Stability's layout "
                                   "(the inverse of diffusers' convert_flux/sd3_transformer_checkpoint_to_diffusers), "
                                   "whose VAE and text encoders stay in the folder: read it back with --model FILE "
                                   "--config FOLDER. Written "
                                   "atomically; an existing --out is replaced only with --overwrite, never when it is "
                                   "an input. --dtype fp16|bf16 writes every weight in that precision (half the "
                                   "size). Tiny or non-standard architectures load back with their folder as the "
                                   "config: fewstep sample --model FILE --config DIR, or diffusers' "
                                   "from_single_file(FILE, config=DIR, local_files_only=True). (LoRAs: fewstep lora "
                                   "export; a merge straight to one file: fewstep lora merge ... --single-file.)")
    p.add_argument("--single-file", action="store_true", required=True, help=SINGLE_FILE_HELP)
    p.add_argument("--model", required=True, help="the pipeline folder to write, e.g. models/emoji-sd")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (refused otherwise)")
    add_dtype_args(p)
    p.set_defaults(func=run)


def written_dtype(args: argparse.Namespace):
    """The torch dtype --dtype names (None: the weights as the files hold them, float32 by default)."""
    import torch

    return getattr(torch, DTYPES[args.dtype]) if getattr(args, "dtype", None) else None


def run(args: argparse.Namespace) -> None:
    from ..models.folders import load_model
    from ..models.single_file_export import write_single_file

    model = load_model(args.model, **load_options(args))
    out = write_single_file(model, args.out, written_dtype(args), overwrite=args.overwrite, source=args.model)
    print(f"wrote {args.model} as one original-format checkpoint to {out} "
          f"({READ_BACK.format(out=out, folder=args.model)})")


READ_BACK = ("AUTOMATIC1111 and ComfyUI load it; fewstep reads it as --model {out}, adding --config {folder} where the "
             "architecture is not a published one")
