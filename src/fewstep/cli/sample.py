"""``fewstep sample``: images from any model fewstep loads (labels or prompts, any sampler, step count and
pipeline size): a PNG grid, and/or one PNG per image with how it was made in its metadata."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..errors import FewstepError
from .args import (
    LIMITS,
    add_grid_args,
    add_limits,
    add_lora_arg,
    command_line,
    guidance_scale,
    label,
    load_options,
    positive_int,
    probability,
    seed,
    sigma_list,
)
from .checks import check_sample_request

SEEDS = ("image i of a run with --seed S (i as in --out-dir's numbering: labels or prompts in order, --num each) "
         "starts from the i-th block of one noise stream seeded S, as diffusers' "
         "generator=torch.Generator().manual_seed(S) for the whole batch; so with a deterministic sampler (euler, "
         "heun, dpmpp-2m, 1-step consistency) it is the same image in a shorter run that still reaches i (when a "
         "latent holds a multiple of 16 numbers, as SD/SDXL's at multiples of 16 pixels do). A stochastic sampler "
         "draws its step noise for chunks of 256 images, so its images depend on their chunk. --batch-size never "
         "changes an image; --height/--width do")


def add_parser(sub) -> None:
    from ..core.solvers import SAMPLERS

    p = sub.add_parser("sample", help="sample images from a model (a grid, or one PNG per image)",
                       description="Sample any model fewstep can load (a pixel model folder or a diffusers text-to-image "
                                   "pipeline) and write a PNG grid (--out) and/or one PNG per image with its prompt, "
                                   "seed and settings in its metadata (--out-dir). Without --label a class-conditional "
                                   "model gives --num rows of one image per class. Seeds: " + SEEDS + ".")
    p.add_argument("--model", required=True, help="model folder")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default=None,
                   help="ddim (= euler in σ space), euler, heun (2 evaluations/step), dpmpp-2m, ddpm (stochastic), "
                        "ddim-stochastic (Meng et al.'s, for progressive students), consistency (multistep consistency "
                        "sampling), tcd (TCD's strategic stochastic sampling with γ = --eta, diffusers' TCDScheduler; "
                        "any discrete-VP model); default: the model's (dpmpp-2m for a diffusion model, consistency for "
                        "a consistency model or an LCM, tcd for a TCD model or a pipeline with a TCD-LoRA)")
    p.add_argument("--eta", "--gamma", dest="eta", type=probability, default=None, metavar="G",
                   help="--sampler tcd: γ in [0, 1], the stochasticity of each step (TCD's 'gamma', diffusers' eta): "
                        "each step maps to s = floor((1 - γ)·t_next) and re-noises from s to the next timestep; 0 is "
                        "deterministic, 1 denoises fully each step (multistep consistency sampling); default 0.3, "
                        "TCDScheduler's. diffusers' pipelines default to eta=0: pass eta=G there for the same images")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="sampling steps (default: the model's, e.g. 50 for a diffusion model, 1 for a consistency model)")
    p.add_argument("--guidance-scale", type=guidance_scale, default=None,
                   help="classifier-free guidance, 1.0 = none (default: the model's, 2.0 for digits)")
    p.add_argument("--sigmas", type=sigma_list,
                   help="the noise levels of each step, e.g. 80,0.8 for 2-step consistency sampling with the "
                        "intermediate level 0.8 (σ = 0 is appended; overrides --steps)")
    p.add_argument("--label", type=label, nargs="+", help="class labels to sample (default: every class)")
    p.add_argument("--prompt", action="append",
                   help="text-to-image pipelines (emoji-sd, emoji-lcm): a prompt, one row of --num images each; "
                        "repeat for more rows (prompts longer than the tokenizer's limit are cut with a warning)")
    p.add_argument("--prompts-file", metavar="FILE",
                   help="text-to-image pipelines: prompts, one per line (UTF-8; blank lines and lines starting with # "
                        "are skipped), one row of --num images each; instead of --prompt")
    p.add_argument("--negative-prompt", metavar="TEXT",
                   help="text-to-image pipelines with classifier-free guidance (--guidance-scale other than 1): what "
                        "to guide away from, in place of the empty prompt (diffusers' negative_prompt); refused for "
                        "a model that takes the guidance scale as an input (an LCM, a guided student), which has no "
                        "unconditional branch (diffusers ignores it there)")
    add_lora_arg(p, "fuse a LoRA before sampling")
    p.add_argument("--tiny-vae", metavar="DIR", help="pipelines: decode with this AutoencoderTiny (fewstep train-tiny-vae)")
    p.add_argument("--num", type=positive_int, default=8, help="images per label or prompt (default 8)")
    p.add_argument("--height", type=positive_int,
                   help="pipelines: image height in pixels, a multiple of the VAE factor (8 for SD/SDXL; latents are "
                        "height/8 × width/8); default the model's size. Pixel models sample their own size only")
    p.add_argument("--width", type=positive_int, help="pipelines: image width in pixels (as --height)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="images through the network (and the VAE) at once, to fit memory (default: up to 256; with "
                        "classifier-free guidance each call also carries their unconditional twins); never changes "
                        "the images (beyond float32 rounding, far below one 8-bit level)")
    p.add_argument("--seed", type=seed, default=0,
                   help="the run's noise seed (default 0; how it maps to each image: see the description above)")
    p.add_argument("--scale", type=positive_int, default=4,
                   help="pixel upscaling of the grid (default 4); --out-dir images are always at native resolution")
    p.add_argument("--out", default=None, help="PNG grid to write (default samples.png unless --out-dir is given)")
    p.add_argument("--out-dir", metavar="DIR",
                   help="a new folder of one PNG per image at native resolution, 00000.png, 00001.png, … in the "
                        "order of the grid, each with its prompt or label, negative prompt, seed, index, steps, "
                        "sampler, guidance, size, model and LoRAs as PNG text: 'parameters' (AUTOMATIC1111's "
                        "infotext) and 'fewstep' (JSON)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an existing --out-dir that fewstep did not write: its PNGs of the same names are "
                        "replaced, everything else there stays")
    add_grid_args(p)
    add_limits(p, "steps", "num", "scale", "height", "width")
    p.set_defaults(func=run)


def conditions(args: argparse.Namespace, model, prompts: list[str] | None):
    """(the condition of each image, or None for unconditional; images per grid row) from the flags."""
    import torch

    text = model.conditioner.text
    if prompts and not text:
        raise FewstepError(f"{args.model} is not a text-to-image pipeline; --prompt and --prompts-file apply to those "
                           f"(give --label)")
    if args.label and text:
        raise FewstepError(f"{args.model} is a text-to-image pipeline: give --prompt TEXT, not --label")
    if text:
        return [p for p in (prompts or ["grinning face"]) for _ in range(args.num)], args.num
    if model.conditioner.conditional:
        classes = args.label or list(range(model.config.num_classes))
        return torch.tensor(classes).repeat_interleave(args.num), args.num
    if args.label:
        raise FewstepError(f"{args.model} is unconditional; it takes no --label")
    return None, math.ceil(math.sqrt(args.num))


def outputs(args: argparse.Namespace) -> tuple[Path | None, Path | None]:
    """(the grid file, the per-image folder), checked before any work: neither may be (in, around) the model or
    another input; an existing --out-dir is written into only with --overwrite (or when it is empty), even one
    an earlier ``sample`` wrote: sampled images are results, not a model a re-run rebuilds. With --overwrite only
    fewstep's images there are replaced (:mod:`fewstep.io.atomic`)."""
    from ..io.atomic import MARKER, allow_replacing, check_replaceable, check_writable, is_fewstep_output

    out = check_writable(args.out or "samples.png", ".png") if args.out or not args.out_dir else None
    if args.out_dir is None:
        return out, None
    folder = Path(args.out_dir)
    with allow_replacing(*([args.out_dir] if args.overwrite else [])):
        check_replaceable(folder, "--out-dir")
    if not args.overwrite and is_fewstep_output(folder) and any(p.name != MARKER for p in folder.iterdir()):
        raise FewstepError(f"--out-dir {folder} holds the images of an earlier run; give a new folder, or pass "
                           f"--overwrite to replace fewstep's images there (nothing else there is touched)")
    return out, folder


def run(args: argparse.Namespace) -> None:
    import torch

    from .. import __version__
    from ..io.atomic import allow_replacing
    from ..io.images import make_grid, pil_images, save_png, write_png_folder
    from ..models.loras import load_with_loras
    from ..models.tiny_vae import with_tiny_vae
    from ..sampling.generate import generate
    from ..sampling.outputs import image_records, png_text, read_prompts, run_settings

    out, out_dir = outputs(args)  # fail before any work
    if args.prompt and args.prompts_file:
        raise FewstepError("give --prompt or --prompts-file, not both")
    prompts = read_prompts(args.prompts_file) if args.prompts_file else args.prompt
    model = with_tiny_vae(load_with_loras(args.model, args.lora, **load_options(args)), args.tiny_vae)
    rows = len(prompts or [""]) if model.conditioner.text else len(args.label or range(model.config.num_classes or 1))
    check_sample_request(args, model, args.num * rows)   # flags that apply, the size, the memory: before any sampling
    cond, nrow = conditions(args, model, prompts)
    total = args.num if cond is None else len(cond)
    if total > LIMITS["num"] and not args.allow_large:
        raise FewstepError(f"{total:,} images (prompts × --num) is over the limit of {LIMITS['num']:,} a run may ask "
                           f"for; pass --allow-large if you mean it")
    sigmas = None if args.sigmas is None else torch.tensor(args.sigmas + [0.0])
    images = generate(model, cond, num=args.num if cond is None else None, steps=args.steps, sampler=args.sampler,
                      guidance_scale=args.guidance_scale, seed=args.seed, progress=True, sigmas=sigmas,
                      rho=args.rho, clamp_x0=args.clamp_x0, negative_prompt=args.negative_prompt,
                      height=args.height, width=args.width, network_batch=args.batch_size, eta=args.eta)
    if out is not None:
        save_png(make_grid(images, nrow=nrow, scale=args.scale), out)
        print(f"wrote {len(images)} samples to {out}")
    if out_dir is not None:
        settings = run_settings(model, args.steps, args.sampler, args.guidance_scale, args.sigmas, args.eta)
        records = image_records(model, cond, len(images), args.seed, settings, tuple(images.shape[-2:]),
                                args.negative_prompt, model=args.model, loras=args.lora or [],
                                command=command_line(args), version=__version__)
        with allow_replacing(*([out_dir] if args.overwrite else [])):
            write_png_folder(out_dir, pil_images(images), [png_text(r) for r in records])
        print(f"wrote {len(images)} images to {out_dir}/")
