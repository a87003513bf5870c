"""``fewstep train-teacher``: a diffusion teacher from scratch (pixel-space EDM, or the tiny SD pipeline)."""

from __future__ import annotations

import argparse

from ..core.parameterizations import SPACES
from ..errors import FewstepError
from .args import (
    add_data_args,
    add_train_args,
    augment,
    command_line,
    positive,
    positive_int,
    probability,
    train_config,
    unet_width,
)


def add_parser(sub) -> None:
    p = sub.add_parser("train-teacher", help="train a diffusion teacher (class-conditional, or text-to-image for emoji)",
                       description="Train a class-conditional EDM diffusion model (diffusers UNet2DModel, label "
                                   "dropout for classifier-free guidance) and save its EMA weights as a model folder. "
                                   "On a captioned set (--dataset emoji) train a tiny Stable-Diffusion-format pipeline "
                                   "instead: AutoencoderKL (--vae-steps first), then CLIPTextModel + UNet2DConditionModel "
                                   "on its latents (--steps), saved in diffusers' layout; --pixel trains the "
                                   "class-conditional pixel model on its classes. "
                                   "Runs unchanged under `accelerate launch` and resumes from --work-dir.")
    p.add_argument("--dataset", default="digits", help="'digits', 'emoji' or an image folder (class sub-folders)")
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--image-size", type=positive_int, default=None, help="resize images (digits: 16)")
    p.add_argument("--channels", type=int, choices=[1, 3], default=1, help="for image folders: 1 (L) or 3 (RGB)")
    p.add_argument("--width", type=unet_width, default=32, help="UNet base width (32: 1.6M parameters)")
    p.add_argument("--label-dropout", type=probability, default=0.1,
                   help="probability of the null label / empty caption (for CFG)")
    p.add_argument("--vae-steps", type=positive_int, default=1000, help="text-to-image: AutoencoderKL steps")
    p.add_argument("--vae-lr", type=positive, default=1e-3, help="text-to-image: AutoencoderKL learning rate")
    p.add_argument("--sdxl", action="store_true",
                   help="text-to-image: an SDXL-format pipeline (two text encoders, pooled text and size/crop time ids)")
    p.add_argument("--family", choices=["sd", "sdxl", "flux", "sd3"], default=None,
                   help="text-to-image: the pipeline format — sd (StableDiffusionPipeline, the default), sdxl (as "
                        "--sdxl), flux (FluxPipeline: FluxTransformer2DModel, CLIP + T5, packed 2×2 latents) or sd3 "
                        "(StableDiffusion3Pipeline: SD3Transformer2DModel, CLIP-L + CLIP-G + T5); flux and sd3 are "
                        "rectified-flow models and need --vae-from")
    p.add_argument("--shift", type=positive, default=None,
                   help="flux/sd3: the flow scheduler's time shift (training and sampling; default FLUX.1-schnell's 1.0 "
                        "for flux, SD3's 3.0 for sd3)")
    p.add_argument("--vae-from", metavar="PIPELINE",
                   help="text-to-image: take this pipeline's trained VAE instead of training one (e.g. models/emoji-sd)")
    p.add_argument("--pixel", action="store_true",
                   help="on a captioned set (emoji): a class-conditional pixel-space EDM teacher on its classes (the "
                        "emoji's 9 Unicode groups) instead of a text-to-image pipeline")
    p.add_argument("--parameterization", choices=sorted(SPACES), default="edm",
                   help="pixel teachers: the noise space it learns (registered in fewstep.core.parameterizations): edm "
                        "(Karras et al. 2022, the default), vp (DDPM ε), flow (rectified flow: velocity on x_t = (1-t)x0 "
                        "+ t·noise, SD3's logit-normal times; sampled with --sampler euler as FlowMatchEulerDiscrete"
                        "Scheduler) or trigflow (the sCM paper's x_t = cos t·x0 + sin t·noise)")
    p.add_argument("--init-from", metavar="MODEL",
                   help="pixel teachers: start from this model folder's UNet weights (same --width and data set), e.g. "
                        "a flow teacher from models/emoji-pixel-teacher; default: a fresh UNet")
    add_data_args(p)
    add_train_args(p, steps=4000, batch=128, lr=2e-4)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..methods.teacher import train_flow_teacher, train_sd_teacher, train_teacher
    from ..models.data import load_dataset

    data = load_dataset(args.dataset, args.image_size, args.channels, augment(args))
    if data.captions is not None and not args.pixel:  # a text-to-image set: a Stable-Diffusion-format pipeline
        vae = None
        if args.vae_from:
            from ..models.folders import load_model

            source = load_model(args.vae_from)
            if "vae" not in source.parts:
                raise FewstepError(f"--vae-from {args.vae_from} is not a pipeline folder with a VAE")
            vae = source.parts["vae"].requires_grad_(False)
        if args.family in ("flux", "sd3"):
            if vae is None:
                raise FewstepError(f"--family {args.family} trains the transformer and text encoders on another "
                                   f"pipeline's VAE: add --vae-from PIPELINE (e.g. models/emoji-sd)")
            folder = train_flow_teacher(data, args.out, train_config(args), vae, args.family,
                                        caption_dropout=args.label_dropout, shift=args.shift, command=command_line(args))
            if folder is not None:
                print(f"saved text-to-image teacher ({args.family} pipeline) to {folder}")
            return
        if args.shift is not None:
            raise FewstepError("--shift is the flow scheduler's time shift: it applies to --family flux or sd3")
        folder = train_sd_teacher(data, args.out, train_config(args), vae_steps=0 if vae is not None else args.vae_steps,
                                  vae_lr=args.vae_lr, caption_dropout=args.label_dropout, command=command_line(args),
                                  xl=args.sdxl or args.family == "sdxl", vae=vae)
        if folder is not None:                          # None on the other processes of a multi-process run
            print(f"saved text-to-image teacher (diffusers pipeline) to {folder}")
        return
    init = None
    if args.init_from:
        from ..models.folders import load_model

        init = load_model(args.init_from).net
    folder = train_teacher(data, args.out, train_config(args), width=args.width, label_dropout=args.label_dropout,
                           command=command_line(args), parameterization=args.parameterization, init=init)
    if folder is not None:
        print(f"saved teacher to {folder}")
