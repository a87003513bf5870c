"""The CLI glue of the latent (Stable-Diffusion-format) family: ``fewstep distill --method lcd | lcf``,
``fewstep sample --prompt`` and ``fewstep edit --task img2img`` on a diffusers pipeline folder.

Kept out of :mod:`fewstep.cli` so that file only routes to it."""

from __future__ import annotations

import argparse

from .errors import FewstepError


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("latent consistency (lcd: distil an SD-format teacher; lcf: fine-tune an LCM; "
                             "Luo et al. 2023). The guidance range is --min/--max-guidance-scale")
    g.add_argument("--skip", type=int, default=20,
                   help="lcd/lcf: skipping step k, the teacher steps from t+k to t on the 1000-step grid (default 20; "
                        "the LCM samples on the grid of 1000/k timesteps)")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute UNet activations in the backward pass (less memory on big UNets)")
    g.add_argument("--lora-rank", type=int, default=8,
                   help="lcm-lora: rank of the LoRA adapters (default 8; the paper uses 64 on SD-size UNets)")


def run_distill(args: argparse.Namespace, train_config, command: str) -> None:
    from .data import load_captioned
    from .lcm import LCMSettings, distill_lcm
    from .sd import load_latent_model

    if not args.teacher:
        raise FewstepError(f"--method {args.method} needs --teacher DIR: a diffusers Stable-Diffusion-style folder "
                           + ("holding an LCM (e.g. models/emoji-lcm)" if args.method == "lcf" else "(e.g. models/emoji-sd)"))
    teacher = load_latent_model(args.teacher)
    data = load_captioned(args.dataset or teacher.info.get("dataset") or "emoji", teacher.vae.config.sample_size)
    settings = LCMSettings(method=args.method, skip=args.skip, solver=args.solver or "ddim",
                           guidance_min=args.min_guidance_scale, guidance_max=args.max_guidance_scale,
                           distance=args.distance,
                           target_ema=LCMSettings.target_ema if args.target_ema is None else args.target_ema,
                           gradient_checkpointing=args.gradient_checkpointing, lora_rank=args.lora_rank)
    folder = distill_lcm(teacher, data, args.out, train_config, settings, command=command)
    if folder is not None:
        what = ("LoRA (diffusers pytorch_lora_weights.safetensors)" if args.method == "lcm-lora"
                else "model (diffusers LatentConsistencyModelPipeline folder)")
        print(f"saved {args.method} {what} to {folder}")


def load_with_loras(path: str, loras: list[str] | None):
    """A pipeline folder with ``--lora PATH[:WEIGHT]`` adapters fused in (each checked first)."""
    from .lora import apply_loras, parse_lora_spec
    from .sd import load_latent_model

    specs = [parse_lora_spec(s) for s in loras or []]   # bad specs fail before any loading
    model = load_latent_model(path)
    return apply_loras(model, specs) if specs else model


def run_sample(args: argparse.Namespace) -> None:
    from .atomic import check_writable
    from .images import make_grid, save_png
    from .latent_sampling import generate_latent

    out = check_writable(args.out, ".png")
    if args.label:
        raise FewstepError(f"{args.model} is a text-to-image pipeline: give --prompt TEXT, not --label")
    model = load_with_loras(args.model, args.lora)
    prompts = [p for p in (args.prompt or ["grinning face"]) for _ in range(args.num)]
    images = generate_latent(model, prompts, steps=args.steps, sampler=args.sampler, guidance_scale=args.guidance_scale,
                             seed=args.seed, progress=True)
    save_png(make_grid(images, nrow=args.num, scale=args.scale), out)
    print(f"wrote {len(images)} samples to {out}")


def run_img2img(args: argparse.Namespace) -> None:
    """``fewstep edit --task img2img --model PIPELINE [--lora L[:λ]] --input PNG... --prompt TEXT``: one row
    per input, the input first, then one result per prompt (SDEdit in --steps steps at --strength)."""
    import torch

    from .atomic import check_writable
    from .images import make_grid, read_png, save_png
    from .latent_sampling import generate_latent

    out = check_writable(args.out, ".png")
    if args.task != "img2img":
        raise FewstepError(f"{args.model} is a text-to-image pipeline; its editing task is img2img (--task img2img)")
    if not args.input:
        raise FewstepError("img2img needs --input PNG (the picture to transform) and --prompt TEXT")
    model = load_with_loras(args.model, args.lora)
    size = model.vae.config.sample_size
    images = torch.cat([read_png(f, 3, sizes=[size]) for f in args.input])
    prompts = list(args.prompt or [""])
    inputs = images.repeat_interleave(len(prompts), dim=0)
    results = generate_latent(model, prompts * len(images), steps=args.steps, guidance_scale=args.guidance_scale,
                              seed=args.seed, init_images=inputs, strength=args.strength)
    rows = torch.cat([torch.cat([images[i:i + 1], results[i * len(prompts):(i + 1) * len(prompts)]])
                      for i in range(len(images))])
    save_png(make_grid(rows, nrow=len(prompts) + 1, scale=args.scale), out)
    print(f"wrote {len(images)} input(s) and their img2img results (strength {args.strength}) to {out}")


def run_lora_merge(args: argparse.Namespace, command: str) -> None:
    """``fewstep lora merge --base DIR --lora A:λ1 --lora B:λ2 --out DIR``: θ_pre + Σ λ_i·τ_i fused into a
    new pipeline folder (a LatentConsistencyModelPipeline-compatible one when an LCM-LoRA is among them),
    or with ``--no-fuse`` the adapters and their weights as a set that ``--lora`` takes."""
    from .lora import expand_lora_sets, parse_lora_spec, save_lora_set
    from .sd import save_pipeline

    model = load_with_loras(args.base, args.lora)    # every adapter checked against the base, fused or not
    if args.no_fuse:
        specs = expand_lora_sets([parse_lora_spec(s) for s in args.lora])
        folder = save_lora_set(args.out, specs, args.base, command)
        print(f"wrote the set of {len(specs)} adapters with their weights to {folder} "
              f"(use it as: --model {args.base} --lora {folder})")
        return
    lcm = model.is_lcm
    scheduler_config = model.scheduler_config
    readme = (f"# {args.out}\n\n`{args.base}` with LoRAs fused in: "
              + ", ".join(f"`{d['path']}` × {d['weight']:g}" for d in model.info["loras"]) + ".\n")
    info = {**model.info, "training": {**model.info.get("training", {}), "merge_command": command}}
    folder = save_pipeline(args.out, model.unet, model.vae, model.text_encoder, model.tokenizer, info,
                           scheduler="LCMScheduler" if lcm else "DDIMScheduler", scheduler_config=scheduler_config,
                           readme=readme)
    print(f"wrote the merged pipeline to {folder}" + (" (an LCM: sample it in 2–8 steps)" if lcm else ""))


def run_train_lora(args: argparse.Namespace, train_config, command: str) -> None:
    from .data import load_captioned
    from .lora import train_style_lora
    from .sd import load_latent_model

    base = load_latent_model(args.base)
    data = load_captioned(args.dataset, base.vae.config.sample_size)
    if args.group:
        data = data.of_class(args.group)
    folder = train_style_lora(base, data, args.out, train_config, rank=args.rank, command=command)
    if folder is not None:
        print(f"saved the style LoRA to {folder}")
