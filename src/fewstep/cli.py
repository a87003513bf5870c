"""The ``fewstep`` command line. Every subcommand has ``--help``; bad input gets one line on
stderr and exit status 2, never a traceback and never a half-written output."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from .errors import FewstepError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (and exit 2), like every other fewstep error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def shipped_models_dir() -> Path:
    """Where the shipped models live: $FEWSTEP_MODELS, else the repository's models/, else ./models."""
    import os

    if os.environ.get("FEWSTEP_MODELS"):
        return Path(os.environ["FEWSTEP_MODELS"])
    repo = Path(__file__).resolve().parents[2] / "models"
    return repo if repo.is_dir() else Path("models")


def _command_line(args: argparse.Namespace) -> str:
    """The command as typed, recorded in everything a command writes."""
    return "fewstep " + " ".join(shlex.quote(a) for a in args.argv)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _train_args(p: argparse.ArgumentParser, steps: int, batch: int, lr: float) -> None:
    g = p.add_argument_group("training (shared by every trainer)")
    g.add_argument("--steps", type=_positive_int, default=steps, help=f"optimizer steps (default {steps})")
    g.add_argument("--batch", type=_positive_int, default=batch, help=f"global batch size (default {batch})")
    g.add_argument("--grad-accum", type=_positive_int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr})")
    g.add_argument("--warmup", type=int, default=200, help="linear LR warm-up steps")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    g.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights")
    g.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    g.add_argument("--checkpoint-every", type=_positive_int, default=500)
    g.add_argument("--keep-checkpoints", type=_positive_int, default=2)
    g.add_argument("--work-dir", help="checkpoints and metrics.jsonl (default: runs/<name of --out>); "
                                      "an existing run there is resumed")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _train_config(args: argparse.Namespace):
    from .train import TrainConfig

    return TrainConfig(out_dir=args.work_dir or str(Path("runs") / Path(args.out).name), max_steps=args.steps,
                       batch_size=args.batch, grad_accum=args.grad_accum, lr=args.lr, warmup_steps=args.warmup,
                       grad_clip=args.grad_clip, ema_decay=args.ema, mixed_precision=args.mixed_precision,
                       checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
                       seed=args.seed, progress=not args.no_progress)


# --- subcommands -------------------------------------------------------------------------------
def cmd_train_teacher(args: argparse.Namespace) -> None:
    from .data import load_dataset
    from .teacher import train_teacher

    data = load_dataset(args.dataset, args.image_size, args.channels)
    if data.captions is not None and not args.pixel:  # a text-to-image set: a Stable-Diffusion-format pipeline
        from .sd_teacher import train_sd_teacher

        folder = train_sd_teacher(data, args.out, _train_config(args), vae_steps=args.vae_steps, vae_lr=args.vae_lr,
                                  caption_dropout=args.label_dropout, command=_command_line(args))
        print(f"saved text-to-image teacher (diffusers pipeline) to {folder}")
        return
    folder = train_teacher(data, args.out, _train_config(args), width=args.width,
                           label_dropout=args.label_dropout, command=_command_line(args))
    if folder is not None:
        print(f"saved teacher to {folder}")


def cmd_train_classifier(args: argparse.Namespace) -> None:
    from .classifier import save_classifier, train_classifier
    from .data import load_dataset

    data = load_dataset(args.dataset, args.image_size, args.channels)
    train_set, heldout = data.split(args.holdout, seed=args.seed)
    model = train_classifier(train_set, heldout, epochs=args.epochs, seed=args.seed, progress=not args.no_progress)
    save_classifier(model, args.out, _command_line(args))
    print(f"saved classifier to {args.out}: held-out accuracy {model.config.heldout_accuracy:.4f} "
          f"on {len(heldout)} images")


def cmd_distill(args: argparse.Namespace) -> None:
    from .data import load_dataset
    from .distill import ConsistencySettings, distill_consistency
    from .models import load_model

    if args.method in ("guided", "progressive"):  # Meng et al. 2023 (fewstep.guided_cli)
        from .guided_cli import run
        return run(args, _train_config(args), _command_line(args))
    if args.method in ("lcd", "lcf", "lcm-lora"):  # Luo et al. 2023a/b (fewstep.latent_cli)
        from .latent_cli import run_distill
        return run_distill(args, _train_config(args), _command_line(args))
    teacher = load_model(args.teacher) if args.teacher else None
    dataset = args.dataset or (teacher.config.dataset if teacher else "digits")
    data = load_dataset(dataset, args.image_size, args.channels)
    classifier = args.classifier or (str(shipped_models_dir() / f"{data.name}-classifier")
                                     if args.distance == "classifier" else None)
    settings = ConsistencySettings(
        method=args.method, distance=args.distance, solver=args.solver or "heun", guidance_scale=args.guidance_scale,
        label_dropout=args.label_dropout,
        num_scales=args.num_scales, start_scales=args.start_scales, target_ema=args.target_ema, width=args.width,
        classifier=classifier, lpips_weights=args.lpips_weights, gan_weight=args.gan_weight, d_lr=args.d_lr,
        r1_gamma=args.r1_gamma, r1_interval=args.r1_interval, augment=args.augment, gan_weighting=args.gan_weighting)
    folder = distill_consistency(data, args.out, _train_config(args), settings, teacher, command=_command_line(args))
    if folder is not None:
        print(f"saved {args.method} model to {folder}")


def _cmd_train_lora(args: argparse.Namespace) -> None:
    from .latent_cli import run_train_lora
    run_train_lora(args, _train_config(args), _command_line(args))


def _cmd_lora_merge(args: argparse.Namespace) -> None:
    from .latent_cli import run_lora_merge
    run_lora_merge(args, _command_line(args))


def cmd_sample(args: argparse.Namespace) -> None:
    import math

    import torch

    from .atomic import check_writable
    from .images import make_grid, save_png
    from .models import load_model
    from .sampling import generate

    from .sd import is_pipeline_folder

    if is_pipeline_folder(args.model):  # a diffusers text-to-image pipeline (fewstep.latent_cli)
        from .latent_cli import run_sample
        return run_sample(args)
    if args.prompt or args.lora:
        raise FewstepError(f"{args.model} is not a text-to-image pipeline; --prompt and --lora apply to those")
    out = check_writable(args.out, ".png")  # fail before any work
    model = load_model(args.model)
    cfg = model.config
    guidance = cfg.default_guidance_scale if args.guidance_scale is None else args.guidance_scale
    args.sampler = args.sampler or cfg.default_sampler
    args.steps = args.steps or cfg.default_steps
    sigmas = None if args.sigmas is None else torch.tensor(args.sigmas + [0.0])
    if cfg.class_names:  # one row per label, --num images each
        labels = torch.tensor(args.label or list(range(cfg.num_classes))).repeat_interleave(args.num)
        images = generate(model, labels, steps=args.steps, sampler=args.sampler, guidance_scale=guidance,
                          seed=args.seed, progress=True, sigmas=sigmas)
        nrow = args.num
    else:
        if args.label:
            raise FewstepError(f"{args.model} is unconditional; it takes no --label")
        images = generate(model, num=args.num, steps=args.steps, sampler=args.sampler, seed=args.seed, progress=True,
                          sigmas=sigmas)
        nrow = math.ceil(math.sqrt(args.num))
    save_png(make_grid(images, nrow=nrow, scale=args.scale), out)
    print(f"wrote {len(images)} samples to {out}")


def _step_list(text: str) -> list[int]:
    try:
        steps = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2,4, got {text!r}") from None
    if not steps or min(steps) < 1:
        raise argparse.ArgumentTypeError(f"step counts must be at least 1, got {text!r}")
    return steps


def cmd_eval(args: argparse.Namespace) -> None:
    import json

    from .atomic import check_writable, write_text
    from .evaluate import eval_report, evaluate, evaluate_latent, ruler_for
    from .images import labeled_rows, make_grid, save_png
    from .models import load_model
    from .sd import is_pipeline_folder

    for path, suffix in ((args.json, None), (args.grid, ".png")):
        if path:
            check_writable(path, suffix)  # fail before any work
    latent = is_pipeline_folder(args.model)
    if latent and args.tune_sigmas:
        raise FewstepError("--tune-sigmas is for pixel-space consistency models; an LCM samples on its skipped grid")
    if args.lora and not latent:
        raise FewstepError(f"{args.model} is not a text-to-image pipeline; --lora applies to those")
    if latent:
        from .latent_cli import load_with_loras
        model = load_with_loras(args.model, args.lora)
    else:
        model = load_model(args.model)
    ruler = ruler_for(model, Path(args.models or shipped_models_dir()), args.classifier)
    if latent:
        rows, samples = evaluate_latent(model, ruler, args.steps, args.sampler, args.guidance_scale, args.num, args.seed)
    else:
        args.sampler = args.sampler or model.config.default_sampler
        if args.tune_sigmas:
            _tune_sigmas(model, ruler, args)
        rows, samples = evaluate(model, ruler, args.steps, args.sampler, args.guidance_scale, args.num, args.seed)
    report = eval_report(model, rows, args.num, args.seed)
    print(f"{'steps':>5} {'NFE':>4} {'FID':>8} {'KID':>9} {'prec':>6} {'recall':>6} {'acc':>6} {'s/img':>8}")
    for r in rows:
        acc = "-" if r.cond_accuracy is None else f"{r.cond_accuracy:.3f}"
        print(f"{r.steps:>5} {r.nfe:>4} {r.fid:>8.3f} {r.kid:>9.5f} {r.precision:>6.3f} {r.recall:>6.3f} "
              f"{acc:>6} {r.seconds_per_image:>8.5f}")
    if args.json:
        write_text(args.json, json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.grid:
        c = max(len(ruler.data.class_names), 8)
        save_png(labeled_rows([(f"{n} steps", make_grid(samples[n][: 2 * c], nrow=c, scale=3)) for n in args.steps],
                              margin=70), args.grid)
        print(f"wrote {args.grid}")


def _tune_sigmas(model, ruler, args: argparse.Namespace) -> None:
    """``fewstep eval --tune-sigmas``: ternary-search each multi-step count's intermediate levels and use
    them for the evaluation that follows; ``--save-sigmas`` also stores them in the model's fewstep.json."""
    import json
    from dataclasses import asdict

    from .atomic import write_text
    from .evaluate import tune_sigmas
    from .models import CONFIG_NAME

    for n in (n for n in args.steps if n >= 2):
        grid, fid = tune_sigmas(model, ruler, n, num=min(args.num, 500), seed=args.seed, sampler=args.sampler,
                                guidance_scale=args.guidance_scale)
        model.config.sampling_sigmas[str(n)] = [round(s, 4) for s in grid]
        print(f"{n} steps: best σ grid {', '.join(f'{s:.4g}' for s in grid)} (FID {fid:.3f} on {min(args.num, 500)} samples)")
    if args.save_sigmas:
        write_text(model.path / CONFIG_NAME, json.dumps(asdict(model.config), indent=2) + "\n")
        print(f"saved the tuned grids to {model.path / CONFIG_NAME}")


def cmd_bench(args: argparse.Namespace) -> None:
    from .bench import BenchSettings, run_bench

    settings = BenchSettings.quick_settings() if args.quick else BenchSettings()
    if args.num:
        settings.num = args.num
    settings.seed = args.seed
    settings.reuse = args.reuse
    markdown = None if args.no_markdown else Path(args.markdown)
    if args.render_only:  # no measuring: BENCHMARKS.md again from --reuse's bench.json (e.g. after an ablation)
        from .bench import render_report
        render_report(Path(args.reuse or Path(args.out) / "bench.json"), Path(args.markdown), Path(args.out))
        print(f"wrote {args.markdown}")
        return
    if args.only:  # one section, merged into --reuse's report
        from .bench import run_section_only
        run_section_only(args.only, Path(args.models or shipped_models_dir()), Path(args.out), settings,
                         _command_line(args), markdown)
        print(f"wrote the {args.only} section into {args.out}/bench.json" + (f" and {markdown}" if markdown else ""))
        return
    run_bench(Path(args.models or shipped_models_dir()), Path(args.out), settings, _command_line(args), markdown)
    print(f"wrote {args.out}/bench.json and plots" + (f", and {markdown}" if markdown else ""))


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(Path(args.models or shipped_models_dir()), Path(args.out), per_class=args.per_class, seed=args.seed)


# --- edit: zero-shot editing (logic in fewstep.editing) --------------------------------------------
def _sigma_list(text: str) -> list[float]:
    try:
        sigmas = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated noise levels like 80,20,5, got {text!r}") from None
    if not sigmas or min(sigmas) <= 0 or any(a <= b for a, b in zip(sigmas, sigmas[1:])):
        raise argparse.ArgumentTypeError(f"noise levels must be positive and strictly decreasing, got {text!r}")
    return sigmas


def _add_edit_parser(sub) -> None:
    from .editing import TASKS

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
    src.add_argument("--dataset", help="instead of --input: 'digits' or an image folder; --num images drawn with "
                                       "--seed (stroke: their rough block strokes)")
    p.add_argument("--num", type=_positive_int, default=8, help="images from --dataset, pairs for interpolate (default 8)")
    p.add_argument("--out", default="edit.png", help="PNG file to write")
    g = p.add_argument_group("task options")
    mask = g.add_mutually_exclusive_group()
    mask.add_argument("--mask", metavar="PNG", help="inpaint: a mask of the model's size, white = keep, black = generate")
    mask.add_argument("--mask-half", choices=["bottom", "top", "left", "right"],
                      help="inpaint: generate this half of each image (default bottom)")
    g.add_argument("--factor", type=_positive_int, default=4, help="superres: upscaling factor (default 4)")
    g.add_argument("--noise-sigma", type=float, default=0.5,
                   help="denoise: std of the Gaussian noise added to the input, images in [-1, 1] (default 0.5)")
    g.add_argument("--noisy-input", action="store_true", help="denoise: the input already has noise of std "
                                                              "--noise-sigma; add none")
    g.add_argument("--frames", type=_positive_int, default=8, help="interpolate: frames per pair (default 8)")
    g.add_argument("--sigma-start", type=float, default=1.5,
                   help="stroke: noise level to start from; higher is more realistic, less faithful (default 1.5)")
    g.add_argument("--sigmas", type=_sigma_list,
                   help="the loop's decreasing noise levels (default: the model's sigma_max, then 40 levels evenly "
                        "spaced in log from 3.16 to 0.1); denoise: "
                        "extra refinement levels below --noise-sigma (default none); stroke: levels after "
                        "--sigma-start; interpolate: default sigma_max alone")
    g.add_argument("--strength", type=float, default=0.5,
                   help="img2img: how much of the --steps grid to run from the noised input, in (0, 1] (SDEdit; "
                        "default 0.5)")
    g.add_argument("--steps", type=_positive_int,
                   help="img2img, and inpaint with a diffusion model: sampler steps on the model's own grid "
                        "(a guided or progressive student: 2-4); default: the model's")
    p.add_argument("--prompt", action="append", help="img2img on a text-to-image pipeline: the target prompt(s)")
    p.add_argument("--lora", action="append", metavar="PATH[:WEIGHT]",
                   help="img2img on a text-to-image pipeline: fuse this LoRA with weight λ first (repeatable; an "
                        "LCM-LoRA makes it a 2-8-step LCM)")
    p.add_argument("--infer-label", action="store_true",
                   help="inpaint: let the model infer each image's class from its known part (the label c whose "
                        "f(known + noise; c) reconstructs it best), then inpaint conditioned on it")
    p.add_argument("--label", type=int, nargs="+", help="condition on a class, one or one per image/pair "
                                                        "(default: unconditional)")
    p.add_argument("--guidance-scale", type=float, help="with --label or --prompt: the guidance scale, 1.0 = none "
                                                        "(default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=_positive_int, default=4, help="pixel upscaling of the grid (default 4)")
    p.set_defaults(func=_cmd_edit)


def _cmd_edit(args: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F

    from .atomic import check_writable
    from .data import load_dataset
    from .editing import half_mask, rough_strokes, run_task
    from .images import labeled_rows, make_grid, read_png, save_png
    from .models import load_model

    from .sd import is_pipeline_folder

    if is_pipeline_folder(args.model):  # a diffusers text-to-image pipeline (fewstep.latent_cli)
        from .latent_cli import run_img2img
        return run_img2img(args)
    if args.prompt or args.lora:
        raise FewstepError(f"{args.model} is not a text-to-image pipeline; --prompt and --lora apply to those")
    out = check_writable(args.out, ".png")  # fail before any work
    if (args.mask or args.mask_half) and args.task != "inpaint":
        raise FewstepError("--mask and --mask-half apply to --task inpaint only")
    model = load_model(args.model)
    size, channels = model.config.image_size, model.config.channels
    images = None
    if args.input:  # superres also takes low-res inputs: nearest upsampling keeps their patch means
        sizes = (size, size // args.factor) if args.task == "superres" else (size,)
        images = torch.cat([F.interpolate(read_png(path, channels, sizes), size=(size, size), mode="nearest")
                            for path in args.input])
    elif args.dataset:
        data = load_dataset(args.dataset, size, channels)
        images = data.images[torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))[:args.num]]
        images = rough_strokes(images) if args.task == "stroke" else images
    elif args.task != "interpolate":
        raise FewstepError(f"--task {args.task} needs --input PNG ... or --dataset NAME")
    known = read_png(args.mask, 1, (size,))[0] > 0 if args.mask else None
    known = half_mask(size, args.mask_half) if args.mask_half else known
    if args.infer_label:
        if args.task != "inpaint" or args.label:
            raise FewstepError("--infer-label applies to --task inpaint without --label")
        from .editing import infer_labels
        args.label = infer_labels(model, images, half_mask(size, "bottom") if known is None else known, seed=args.seed)
        print(f"inferred labels: {' '.join(str(int(c)) for c in args.label)}")
    rows = run_task(model, args.task, images, known=known, factor=args.factor, noise_sigma=args.noise_sigma,
                    add_noise=not args.noisy_input, frames=args.frames, sigma_start=args.sigma_start, pairs=args.num,
                    labels=args.label, sigmas=args.sigmas, guidance_scale=args.guidance_scale, seed=args.seed,
                    steps=args.steps, strength=args.strength)
    grid = labeled_rows([(name, make_grid(row, nrow=len(row), scale=args.scale)) for name, row in rows], margin=110)
    save_png(grid, out)
    print(f"wrote {args.task}: {len(rows)} rows of {len(rows[0][1])} images to {out}")


# --- parser ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from .solvers import SAMPLERS

    parser = _Parser(
        prog="fewstep",
        description="Make diffusion models fast: distill or train few-step generators, and run them.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    p = sub.add_parser("demo", help="teachers at 25-50 steps beside their 1-4-step students: grid + table",
                       description="Sample the shipped teachers (digits at 50 DPM-Solver++ steps; the emoji text-to-image "
                                   "pipeline at 25) with classifier-free guidance, at 4, 2 and 1 steps, and their "
                                   "distilled students (CD, progressive, LCM) at 1-4 steps, with the same labels or "
                                   "captions and seed: a PNG grid and a table of steps, network evaluations, seconds, "
                                   "FID and conditional accuracy.")
    p.add_argument("--out", default="fewstep-demo", help="output folder (default ./fewstep-demo)")
    p.add_argument("--models", help="folder of shipped models (default: the repository's models/)")
    p.add_argument("--per-class", type=_positive_int, default=20, help="samples per digit for the accuracy figure")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train-teacher", help="train a diffusion teacher (class-conditional, or text-to-image for emoji)",
                       description="Train a class-conditional EDM diffusion model (diffusers UNet2DModel, label "
                                   "dropout for classifier-free guidance) and save its EMA weights as a model folder. "
                                   "On a captioned set (--dataset emoji) train a tiny Stable-Diffusion-format pipeline "
                                   "instead: AutoencoderKL (--vae-steps first), then CLIPTextModel + UNet2DConditionModel "
                                   "on its latents (--steps), saved in diffusers' layout. "
                                   "Runs unchanged under `accelerate launch` and resumes from --work-dir.")
    p.add_argument("--dataset", default="digits", help="'digits', 'emoji' or an image folder (class sub-folders)")
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--image-size", type=_positive_int, default=None, help="resize images (digits: 16)")
    p.add_argument("--channels", type=int, choices=[1, 3], default=1, help="for image folders: 1 (L) or 3 (RGB)")
    p.add_argument("--width", type=_positive_int, default=32, help="UNet base width (32: 1.6M parameters)")
    p.add_argument("--label-dropout", type=float, default=0.1,
                   help="probability of the null label / empty caption (for CFG)")
    p.add_argument("--vae-steps", type=_positive_int, default=1000, help="text-to-image: AutoencoderKL steps")
    p.add_argument("--vae-lr", type=float, default=1e-3, help="text-to-image: AutoencoderKL learning rate")
    p.add_argument("--pixel", action="store_true",
                   help="on a captioned set (emoji): a class-conditional pixel-space EDM teacher on its classes (the "
                        "emoji's 9 Unicode groups) instead of a text-to-image pipeline")
    _train_args(p, steps=4000, batch=128, lr=2e-4)
    p.set_defaults(func=cmd_train_teacher)

    for name in ("distill", "train"):
        _add_distill_parser(sub, name)

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
    p.add_argument("--rank", type=_positive_int, default=8, help="LoRA rank (default 8)")
    _train_args(p, steps=1000, batch=64, lr=1e-3)
    p.set_defaults(func=_cmd_train_lora)

    p = sub.add_parser("lora", help="LoRA arithmetic: merge adapters into a pipeline",
                       description="Combine LoRAs with a base pipeline with no training.")
    lora_sub = p.add_subparsers(dest="lora_command", metavar="ACTION", required=True, parser_class=_Parser)
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
    m.set_defaults(func=_cmd_lora_merge)

    p = sub.add_parser("train-classifier", help="train the small classifier used for accuracy and FID features",
                       description="Train the CNN that judges samples (conditional accuracy) and embeds them "
                                   "(FID/KID features); reports held-out accuracy.")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--out", required=True)
    p.add_argument("--image-size", type=_positive_int, default=None)
    p.add_argument("--channels", type=int, choices=[1, 3], default=1)
    p.add_argument("--epochs", type=_positive_int, default=60)
    p.add_argument("--holdout", type=float, default=0.2, help="fraction held out for the accuracy figure")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train_classifier)

    p = sub.add_parser("eval", help="FID, KID, precision/recall and conditional accuracy per step count",
                       description="Sample a model with fixed seeds at each step count and score the samples "
                                   "with the data set's shipped classifier against the whole data set: FID, KID "
                                   "(± std), precision/recall (k=3), conditional accuracy, NFE and seconds/image.")
    p.add_argument("--model", required=True, help="model folder")
    p.add_argument("--steps", type=_step_list, default=[1, 2, 4], help="comma-separated step counts (default 1,2,4)")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default=None, help="default: the model's")
    p.add_argument("--guidance-scale", type=float, default=None, help="1.0 = none (default: the model's)")
    p.add_argument("--num", type=_positive_int, default=1000, help="samples per step count (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classifier", help="classifier folder (default: models/<dataset>-classifier)")
    p.add_argument("--models", help="folder of shipped models (default: the repository's models/)")
    p.add_argument("--json", help="write the results as one JSON object here")
    p.add_argument("--grid", help="write a PNG of samples per step count here")
    p.add_argument("--tune-sigmas", action="store_true",
                   help="first ternary-search the intermediate noise levels of each multi-step count for the "
                        "lowest FID (Song et al. 2023; for consistency models), then evaluate with them")
    p.add_argument("--save-sigmas", action="store_true", help="with --tune-sigmas: store the grids in the model folder")
    p.add_argument("--lora", action="append", metavar="PATH[:WEIGHT]",
                   help="text-to-image pipelines: fuse this LoRA with weight λ first (repeatable)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="quality-vs-steps and speed tables for the teacher's solvers and distilled models",
                       description="In one process: the teacher with DDIM, Euler, Heun and DPM-Solver++(2M) at 1-50 "
                                   "steps and every distilled model, scored the same way; wall-clock per image at a "
                                   "fixed batch with each sampler's overhead over its NFE x network-time floor; and "
                                   "the speedup at matched FID. Writes JSON, PNG plots and BENCHMARKS.md.")
    p.add_argument("--out", default="bench/results", help="folder for bench.json and the plots")
    p.add_argument("--markdown", default="BENCHMARKS.md", help="the markdown table to (re)write")
    p.add_argument("--no-markdown", action="store_true", help="do not write the markdown table")
    p.add_argument("--quick", action="store_true", help="small sample counts and step sets (a smoke test)")
    p.add_argument("--num", type=_positive_int, help="samples per quality point (default 1000; quick: 100)")
    p.add_argument("--reuse", help="a previous bench.json whose teacher quality rows are reused when its sample "
                                   "count and seed match (timings are always re-measured side by side)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", help="folder of shipped models (default: the repository's models/)")
    p.add_argument("--render-only", action="store_true",
                   help="measure nothing: rewrite the markdown from --reuse's bench.json (picks up "
                        "bench/results/lcm_ablation.json after bench/lcm_ablation.py)")
    p.add_argument("--only", choices=["guided", "guided-latent", "latent", "lora"],
                   help="run one section and merge it into the --reuse report: guided (guided and progressive "
                        "distillation on digits), guided-latent (stages 1 and 2 on the emoji pipeline, beside the LCM), latent (the emoji "
                        "LCM beside its teacher), lora (LCM-LoRA and style arithmetic)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("sample", help="sample a grid of images from a model",
                       description="Sample any model fewstep can load and write a PNG grid. Without --label a "
                                   "class-conditional model gives --num rows of one image per class.")
    p.add_argument("--model", required=True, help="model folder")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default=None,
                   help="ddim (= euler in σ space), euler, heun (2 evaluations/step), dpmpp-2m, ddpm (stochastic), "
                        "consistency (multistep consistency sampling); default: the model's (dpmpp-2m for a "
                        "diffusion model, consistency for a consistency model)")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="sampling steps (default: the model's, 50 for a diffusion model, 1 for a consistency model)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance, 1.0 = none (default: the model's, 2.0 for digits)")
    p.add_argument("--sigmas", type=_sigma_list,
                   help="the noise levels of each step, e.g. 80,0.8 for 2-step consistency sampling with the "
                        "intermediate level 0.8 (σ = 0 is appended; overrides --steps)")
    p.add_argument("--label", type=int, nargs="+", help="class labels to sample (default: every class)")
    p.add_argument("--prompt", action="append",
                   help="text-to-image pipelines (emoji-sd, emoji-lcm): a prompt, one row of --num images each; "
                        "repeat for more rows (prompts longer than the tokenizer's limit are cut with a warning)")
    p.add_argument("--lora", action="append", metavar="PATH[:WEIGHT]",
                   help="text-to-image pipelines: fuse a LoRA (diffusers, peft or kohya file, or a fewstep LoRA folder) "
                        "with weight λ (default 1) before sampling; repeat to combine, e.g. a style LoRA and an "
                        "LCM-LoRA (then sample in 2–8 steps)")
    p.add_argument("--num", type=_positive_int, default=8, help="images per label (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=_positive_int, default=4, help="pixel upscaling of the grid (default 4)")
    p.add_argument("--out", default="samples.png", help="PNG file to write")
    p.set_defaults(func=cmd_sample)
    _add_edit_parser(sub)
    return parser


def _add_distill_parser(sub, name: str) -> None:
    from .distances import DISTANCES

    if name == "distill":
        p = sub.add_parser("distill", help="make a few-step model: cd, ct, ict, act, lcd, lcf, lcm-lora, guided, progressive",
                           description="Distill a diffusion teacher into a few-step model, or train one from data. "
                                       "Pixel space (fewstep model folders): --method cd (consistency distillation, Song "
                                       "et al. 2023: the student maps every point of the teacher's guided PF-ODE to its "
                                       "origin, so 1-2 steps suffice), ct | ict | act (consistency training from data "
                                       "alone; improved CT of Song & Dhariwal 2023; adversarial CT of Kong et al. 2024), "
                                       "guided | progressive (Meng et al. 2023: a w-conditioned student, then halving "
                                       "its DDIM steps). Latent space (any diffusers SD 1.x/2.x pipeline folder): --method "
                                       "lcd (latent consistency distillation, Luo et al. 2023), lcf (fine-tune an LCM on "
                                       "new data with no teacher), lcm-lora (LCD training only LoRA weights, Luo et al. "
                                       "2023b), and guided | progressive as in pixel space. Runs under `accelerate launch`, resumes from --work-dir.")
    else:
        p = sub.add_parser("train", help="train a consistency model from data alone (ct, ict, act)",
                           description="Train a consistency model without a teacher: the same as "
                                       "`fewstep distill --method ct|ict|act`.")
    methods = ["cd", "ct", "ict", "act"] if name == "distill" else ["ct", "ict", "act"]
    p.add_argument("--method", choices=methods + (["lcd", "lcf", "lcm-lora", "guided", "progressive"] if name == "distill" else []),
                   required=True, help="cd, guided, progressive, lcd, lcf and lcm-lora need --teacher; ct, ict and "
                                       "act need only --dataset")
    p.add_argument("--teacher", help="teacher model folder: cd/guided a fewstep model (models/digits-teacher); lcd/guided "
                                     "any local diffusers SD 1.x/2.x folder (models/emoji-sd); lcf an LCM folder; "
                                     "progressive a stage-1 student (models/digits-guided, models/emoji-guided)")
    p.add_argument("--dataset", help="'digits', 'emoji', an image folder (lcd/lcf: with metadata.jsonl captions), a "
                                     "saved HF dataset or webdataset .tar shards (default: the teacher's data set)")
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--image-size", type=_positive_int, default=None)
    p.add_argument("--channels", type=int, choices=[1, 3], default=1)
    g = p.add_argument_group("consistency objective")
    g.add_argument("--distance", choices=DISTANCES, default="l2",
                   help="d(x, y) of the loss: l2, l1, pseudo-huber (iCT), classifier (features of the shipped "
                        "classifier, a CPU stand-in for LPIPS), lpips (needs the lpips package and --lpips-weights)")
    g.add_argument("--solver", choices=["euler", "heun", "ddim", "dpm-solver", "dpm-solver++"], default=None,
                   help="the teacher's one-step ODE solver: cd euler | heun (default heun); lcd ddim | dpm-solver | "
                        "dpm-solver++ (2nd-order DPM-Solver-2 / DPM-Solver++(2S); default ddim)")
    g.add_argument("--guidance-scale", type=float, default=2.0,
                   help="cd: the classifier-free guidance scale of the teacher ODE the student learns (default 2.0)")
    g.add_argument("--label-dropout", type=float, default=0.1,
                   help="share of training labels replaced by the null label, so the model also works without a "
                        "label (unconditional generation and editing; default 0.1)")
    g.add_argument("--num-scales", type=_positive_int, help="N: cd's grid (default 18); ct/ict's final N (150 / 1280)")
    g.add_argument("--start-scales", type=_positive_int, help="ct/ict's first N (2 / 10)")
    g.add_argument("--target-ema", type=float, help="target EMA rate μ of cd, lcd, lcf and lcm-lora (default 0.95; 0 = the online student under stop-gradient)")
    g.add_argument("--width", type=_positive_int, default=32, help="ct/ict/act: UNet base width")
    g.add_argument("--classifier", help="classifier folder for --distance classifier (default: models/<data>-classifier)")
    g.add_argument("--lpips-weights", help="local LPIPS weights for --distance lpips")
    g = p.add_argument_group("adversarial consistency training (act)")
    g.add_argument("--gan-weight", type=float, default=0.3, help="λ in (1 − λ)·L_CT + λ·L_G (default 0.3)")
    g.add_argument("--gan-weighting", choices=["none", "edm"], default="none",
                   help="w(σ) of the adversarial term: none (ACT's default) or edm, (σ² + σd²)/(σ·σd)²")
    g.add_argument("--d-lr", type=float, default=1e-4, help="discriminator learning rate")
    g.add_argument("--r1-gamma", type=float, default=10.0, help="R1 penalty weight γ (0: off; default 10)")
    g.add_argument("--r1-interval", type=_positive_int, default=16, help="lazy R1: every k steps (default 16)")
    g.add_argument("--augment", type=float, default=0.0, help="probability of each differentiable augmentation")
    if name == "distill":
        from .guided_cli import add_arguments
        from .latent_cli import add_arguments as add_latent_arguments
        add_arguments(p)
        add_latent_arguments(p)
    _train_args(p, steps=3000, batch=64, lr=1e-4)
    p.set_defaults(func=cmd_distill)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        args.func(args)
    except FewstepError as e:
        print(f"fewstep: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fewstep: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
