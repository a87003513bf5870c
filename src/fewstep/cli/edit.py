"""``fewstep edit``: zero-shot editing with a consistency model, img2img and inpainting in a few sampler
steps with any model (a text-to-image pipeline: one result column per --prompt)."""

from __future__ import annotations

import argparse

from ..errors import FewstepError
from .args import (
    add_limits,
    add_lora_arg,
    guidance_scale,
    label,
    load_options,
    number,
    positive,
    positive_int,
    seed,
    sigma_list,
)


def add_parser(sub) -> None:
    from ..editing.tasks import TASKS

    p = sub.add_parser("edit", help="zero-shot editing: inpaint, colorize, superres, denoise, interpolate, stroke",
                       description="Edit images with no task training (Song et al. 2023, Algorithm 4): denoise with "
                                   "the model, put back what is known of the input (its unmasked pixels, its "
                                   "luminance, its patch means), re-noise to the next of --sigmas, repeat. "
                                   "interpolate slerps two initial noises; stroke starts from a rough painting plus "
                                   "noise (SDEdit). Writes a PNG with rows: reference, what the model is given, "
                                   "result (interpolate: one row of frames per pair). Meant for consistency models; "
                                   "a diffusion model works too, as a one-step denoiser (weaker).")
    p.add_argument("--task", choices=TASKS, required=True,
                   help="inpaint (fill masked pixels), colorize (RGB from luminance), superres (from patch means), "
                        "denoise, interpolate (between two noises), stroke (from a rough painting), img2img (SDEdit "
                        "in --steps sampler steps at --strength)")
    p.add_argument("--model", required=True, help="model folder")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--input", nargs="+", metavar="PNG",
                     help="image(s) of the model's size (superres also takes low-res ones, 1/--factor of it), "
                          "converted to the model's L or RGB")
    src.add_argument("--dataset", help="instead of --input: 'digits', 'emoji' or an image folder; --num images drawn "
                                       "with --seed (stroke: their rough block strokes)")
    p.add_argument("--num", type=positive_int, default=8, help="images from --dataset, pairs for interpolate (default 8)")
    p.add_argument("--out", default="edit.png", help="PNG file to write")
    g = p.add_argument_group("task options")
    mask = g.add_mutually_exclusive_group()
    mask.add_argument("--mask", metavar="PNG", help="inpaint: a mask of the model's size, white = keep, black = generate")
    mask.add_argument("--mask-half", choices=["bottom", "top", "left", "right"],
                      help="inpaint: generate this half of each image (default bottom)")
    g.add_argument("--factor", type=positive_int, default=4, help="superres: upscaling factor (default 4)")
    g.add_argument("--noise-sigma", type=positive, default=0.5,
                   help="denoise: std of the Gaussian noise added to the input, images in [-1, 1] (default 0.5)")
    g.add_argument("--noisy-input", action="store_true", help="denoise: the input already has noise of std "
                                                              "--noise-sigma; add none")
    g.add_argument("--frames", type=positive_int, default=8, help="interpolate: frames per pair (default 8)")
    g.add_argument("--sigma-start", type=positive, default=1.5,
                   help="stroke: noise level to start from; higher is more realistic, less faithful (default 1.5)")
    g.add_argument("--sigmas", type=sigma_list,
                   help="the loop's decreasing noise levels (default: the model's sigma_max, then 40 levels evenly "
                        "spaced in log from 3.16 to 0.1); denoise: "
                        "extra refinement levels below --noise-sigma (default none); stroke: levels after "
                        "--sigma-start; interpolate: default sigma_max alone")
    g.add_argument("--strength", type=number(0.0, 1.0, lo_open=True), default=0.5,
                   help="img2img: how much of the --steps grid to run from the noised input, in (0, 1] (SDEdit; "
                        "default 0.5)")
    g.add_argument("--steps", type=positive_int,
                   help="img2img, and inpaint with a diffusion model: sampler steps on the model's own grid "
                        "(a guided or progressive student: 2-4); default: the model's")
    p.add_argument("--prompt", action="append",
                   help="img2img and inpaint on a text-to-image pipeline: the target prompt(s), one result column each")
    add_lora_arg(p, "fuse a LoRA before editing")
    p.add_argument("--infer-label", action="store_true",
                   help="inpaint: let the model infer each image's class from its known part (the label c whose "
                        "f(known + noise; c) reconstructs it best), then inpaint conditioned on it")
    p.add_argument("--label", type=label, nargs="+", help="condition on a class, one or one per image/pair "
                                                        "(default: unconditional)")
    p.add_argument("--guidance-scale", type=guidance_scale, help="with --label or --prompt: the guidance scale, 1.0 = none "
                                                        "(default: the model's)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--scale", type=positive_int, default=4, help="pixel upscaling of the grid (default 4)")
    add_limits(p, "steps", "num", "scale", "frames")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..editing.constraints import half_mask
    from ..io.atomic import check_writable
    from ..io.images import labeled_rows, make_grid, read_png, save_png
    from ..models.loras import load_with_loras

    out = check_writable(args.out, ".png")  # fail before any work
    if (args.mask or args.mask_half) and args.task != "inpaint":
        raise FewstepError("--mask and --mask-half apply to --task inpaint only")
    model = load_with_loras(args.model, args.lora, **load_options(args))
    size, text = model.config.image_size, model.conditioner.text
    if text and args.task not in ("img2img", "inpaint"):
        raise FewstepError(f"{args.model} is a text-to-image pipeline; its editing tasks are img2img and inpaint "
                           f"(--task img2img, or --task inpaint --steps N)")
    if args.prompt and not text:
        raise FewstepError(f"{args.model} is not a text-to-image pipeline; --prompt applies to those (give --label)")
    images = _inputs(args, model)
    known = read_png(args.mask, 1, (size,))[0] > 0 if args.mask else None
    known = half_mask(size, args.mask_half) if args.mask_half else known
    if text:   # a prompt-conditioned model: each input under each --prompt (labels take the zero-shot task grid)
        grid = make_grid(_prompt_rows(args, model, images, known), nrow=len(args.prompt or [""]) + 1, scale=args.scale)
        save_png(grid, out)
        print(f"wrote {len(images)} input(s) and their {args.task} results to {out}")
        return
    rows = _task_rows(args, model, images, known)
    save_png(labeled_rows([(name, make_grid(row, nrow=len(row), scale=args.scale)) for name, row in rows], margin=110),
             out)
    print(f"wrote {args.task}: {len(rows)} rows of {len(rows[0][1])} images to {out}")


def _inputs(args: argparse.Namespace, model):
    """The images to edit: --input files (superres also takes low-res ones: nearest upsampling keeps their
    patch means), or --num images of --dataset (stroke: their rough block strokes)."""
    import torch
    import torch.nn.functional as F

    from ..editing.constraints import rough_strokes
    from ..io.images import read_png
    from ..models.data import data_for

    size, channels = model.config.image_size, model.config.channels
    if args.input:
        sizes = (size, size // args.factor) if args.task == "superres" else (size,)
        return torch.cat([F.interpolate(read_png(path, channels, sizes), size=(size, size), mode="nearest")
                          for path in args.input])
    if args.dataset:
        data = data_for(model, args.dataset)
        images = data.images[torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))[:args.num]]
        return rough_strokes(images) if args.task == "stroke" else images
    if args.task != "interpolate":
        raise FewstepError(f"--task {args.task} needs --input PNG ... or --dataset NAME")
    return None


def _prompt_rows(args: argparse.Namespace, model, images, known):
    """One row per input: the input, then its result for each prompt (img2img at --strength, or inpainting
    the masked part)."""
    import torch

    from ..editing.constraints import half_mask
    from ..sampling.generate import generate

    prompts = list(args.prompt or [""])
    inputs = images.repeat_interleave(len(prompts), dim=0)
    if args.task == "inpaint":
        if args.steps is None:
            raise FewstepError("inpainting with a text-to-image pipeline runs its sampler: give --steps N")
        mask = half_mask(images.shape[-1], "bottom") if known is None else known
        results = generate(model, prompts * len(images), steps=args.steps, guidance_scale=args.guidance_scale,
                           seed=args.seed, init_images=inputs, mask=mask)
    else:
        results = generate(model, prompts * len(images), steps=args.steps, guidance_scale=args.guidance_scale,
                           seed=args.seed, init_images=inputs, strength=args.strength)
    return torch.cat([torch.cat([images[i:i + 1], results[i * len(prompts):(i + 1) * len(prompts)]])
                      for i in range(len(images))])


def _task_rows(args: argparse.Namespace, model, images, known):
    from ..editing.constraints import half_mask
    from ..editing.tasks import run_task
    from ..editing.zero_shot import infer_labels

    labels = args.label
    if args.infer_label:
        if args.task != "inpaint" or args.label:
            raise FewstepError("--infer-label applies to --task inpaint without --label")
        size = model.config.image_size
        labels = infer_labels(model, images, half_mask(size, "bottom") if known is None else known, seed=args.seed)
        print(f"inferred labels: {' '.join(str(int(c)) for c in labels)}")
    return run_task(model, args.task, images, known=known, factor=args.factor, noise_sigma=args.noise_sigma,
                    add_noise=not args.noisy_input, frames=args.frames, sigma_start=args.sigma_start, pairs=args.num,
                    labels=labels, sigmas=args.sigmas, guidance_scale=args.guidance_scale, seed=args.seed,
                    steps=args.steps, strength=args.strength)
