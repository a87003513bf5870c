"""``fewstep sample``: a PNG grid from any model fewstep loads (labels or prompts, any sampler and step count)."""

from __future__ import annotations

import argparse
import math

from ..errors import FewstepError
from .args import add_grid_args, add_limits, add_lora_arg, guidance_scale, positive_int, seed, sigma_list


def add_parser(sub) -> None:
    from ..core.solvers import SAMPLERS

    p = sub.add_parser("sample", help="sample a grid of images from a model",
                       description="Sample any model fewstep can load (a pixel model folder or a diffusers text-to-image "
                                   "pipeline) and write a PNG grid. Without --label a class-conditional model gives "
                                   "--num rows of one image per class.")
    p.add_argument("--model", required=True, help="model folder")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default=None,
                   help="ddim (= euler in σ space), euler, heun (2 evaluations/step), dpmpp-2m, ddpm (stochastic), "
                        "ddim-stochastic (Meng et al.'s, for progressive students), consistency (multistep consistency "
                        "sampling); default: the model's (dpmpp-2m for a diffusion model, consistency for a consistency "
                        "model or an LCM)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="sampling steps (default: the model's, e.g. 50 for a diffusion model, 1 for a consistency model)")
    p.add_argument("--guidance-scale", type=guidance_scale, default=None,
                   help="classifier-free guidance, 1.0 = none (default: the model's, 2.0 for digits)")
    p.add_argument("--sigmas", type=sigma_list,
                   help="the noise levels of each step, e.g. 80,0.8 for 2-step consistency sampling with the "
                        "intermediate level 0.8 (σ = 0 is appended; overrides --steps)")
    p.add_argument("--label", type=int, nargs="+", help="class labels to sample (default: every class)")
    p.add_argument("--prompt", action="append",
                   help="text-to-image pipelines (emoji-sd, emoji-lcm): a prompt, one row of --num images each; "
                        "repeat for more rows (prompts longer than the tokenizer's limit are cut with a warning)")
    add_lora_arg(p, "fuse a LoRA before sampling")
    p.add_argument("--tiny-vae", metavar="DIR", help="pipelines: decode with this AutoencoderTiny (fewstep train-tiny-vae)")
    p.add_argument("--num", type=positive_int, default=8, help="images per label or prompt (default 8)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--scale", type=positive_int, default=4, help="pixel upscaling of the grid (default 4)")
    p.add_argument("--out", default="samples.png", help="PNG file to write")
    add_grid_args(p)
    add_limits(p, "steps", "num", "scale")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    import torch

    from ..io.atomic import check_writable
    from ..io.images import make_grid, save_png
    from ..models.loras import load_with_loras
    from ..models.tiny_vae import with_tiny_vae
    from ..sampling.generate import generate

    out = check_writable(args.out, ".png")  # fail before any work
    model = with_tiny_vae(load_with_loras(args.model, args.lora), args.tiny_vae)
    text = model.conditioner.text
    if args.prompt and not text:
        raise FewstepError(f"{args.model} is not a text-to-image pipeline; --prompt applies to those (give --label)")
    if args.label and text:
        raise FewstepError(f"{args.model} is a text-to-image pipeline: give --prompt TEXT, not --label")
    if text:
        cond, nrow = [p for p in (args.prompt or ["grinning face"]) for _ in range(args.num)], args.num
    elif model.conditioner.conditional:
        classes = args.label or list(range(model.config.num_classes))
        cond, nrow = torch.tensor(classes).repeat_interleave(args.num), args.num
    else:
        if args.label:
            raise FewstepError(f"{args.model} is unconditional; it takes no --label")
        cond, nrow = None, math.ceil(math.sqrt(args.num))
    sigmas = None if args.sigmas is None else torch.tensor(args.sigmas + [0.0])
    images = generate(model, cond, num=args.num if cond is None else None, steps=args.steps, sampler=args.sampler,
                      guidance_scale=args.guidance_scale, seed=args.seed, progress=True, sigmas=sigmas,
                      rho=args.rho, clamp_x0=args.clamp_x0)
    save_png(make_grid(images, nrow=nrow, scale=args.scale), out)
    print(f"wrote {len(images)} samples to {out}")
