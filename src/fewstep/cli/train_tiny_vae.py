"""``fewstep train-tiny-vae``: a TAESD-style tiny decoder (and encoder) for a pipeline's VAE."""

from __future__ import annotations

import argparse
import math

from .args import add_data_args, add_train_args, augment, command_line, stream, train_config, unet_width


def add_parser(sub) -> None:
    p = sub.add_parser("train-tiny-vae", help="distil a tiny AutoencoderTiny (TAESD) decoder for a pipeline's VAE",
                       description="Distil a diffusers AutoencoderTiny against a text-to-image pipeline's VAE (TAESD, "
                                   "Bohan 2023): the tiny decoder learns the VAE decoder's output on latents from its "
                                   "posterior of each training image, the tiny encoder its posterior means. The result "
                                   "is an AutoencoderTiny folder that --tiny-vae of sample, eval and serve takes and "
                                   "diffusers pipelines accept as pipe.vae: real-time decoding at a small quality cost.")
    p.add_argument("--base", required=True, help="the pipeline whose VAE to distil, e.g. models/emoji-sd")
    p.add_argument("--dataset", default=None, help="images to distil on (default: the pipeline's data set)")
    p.add_argument("--out", required=True, help="AutoencoderTiny folder to write")
    p.add_argument("--width", type=unet_width, default=16, help="channels at every resolution (default 16)")
    p.add_argument("--decoder-blocks", type=_blocks, default=[2, 1, 0],
                   help="residual blocks of the decoder per resolution, latent size first (default 2,1,0)")
    p.add_argument("--encoder-blocks", type=_blocks, default=[1, 1, 1],
                   help="residual blocks of the encoder per resolution, image size first (default 1,1,1)")
    p.add_argument("--encoder-weight", type=_weight, default=1.0, help="weight of the encoder's loss (default 1)")
    p.add_argument("--sample-model", metavar="DIR",
                   help="also distil on the latents this few-step model of the pipeline samples for the captions "
                        "(what a real-time server decodes), e.g. models/emoji-lcm")
    add_data_args(p, stream=True)
    add_train_args(p, steps=3000, batch=64, lr=1e-3)
    p.set_defaults(func=run)


def _blocks(text: str) -> list[int]:
    """Comma-separated block counts ≥ 0, e.g. 2,1,0."""
    try:
        counts = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated block counts like 2,1,0, got {text!r}") from None
    if min(counts) < 0:
        raise argparse.ArgumentTypeError(f"block counts must be at least 0, got {text!r}")
    return counts


def _weight(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def run(args: argparse.Namespace) -> None:
    from ..methods.tiny_vae import TinyVAESettings, distill_tiny_vae
    from ..models.data import data_for
    from ..models.folders import load_model

    base = load_model(args.base)
    settings = TinyVAESettings(width=args.width, decoder_blocks=tuple(args.decoder_blocks),
                               encoder_blocks=tuple(args.encoder_blocks), encoder_weight=args.encoder_weight,
                               sample_model=args.sample_model)
    sampler = load_model(args.sample_model) if args.sample_model else None
    folder = distill_tiny_vae(base, data_for(base, args.dataset, augment(args), stream(args)), args.out, train_config(args), settings,
                              command_line(args), sampler=sampler)
    if folder is not None:
        print(f"saved the tiny VAE to {folder}")
