"""``fewstep distill`` (and ``fewstep train``, its teacher-free methods): every method, one parser whose
option groups are the method families, and the dispatch to the recipes in :mod:`fewstep.methods`."""

from __future__ import annotations

import argparse

from ..errors import FewstepError
from .args import (
    DTYPES,
    add_data_args,
    add_train_args,
    augment,
    command_line,
    guidance_scale,
    non_negative,
    positive,
    positive_int,
    probability,
    step_set,
    stream,
    train_config,
)

CONSISTENCY, GUIDED, LATENT = ("cd", "ct", "ict", "act"), ("guided", "progressive"), ("lcd", "lcf", "lcm-lora")
TEACHER_FREE = ("ct", "ict", "act")


def add_parsers(sub) -> None:
    from ..objectives.distances import DISTANCES

    distill = sub.add_parser(
        "distill", help="make a few-step model: cd, ct, ict, act, lcd, lcf, lcm-lora, guided, progressive",
        description="Distill a diffusion teacher into a few-step model, or train one from data. Pixel space (fewstep "
                    "model folders): --method cd (consistency distillation, Song et al. 2023: the student maps every "
                    "point of the teacher's guided PF-ODE to its origin, so 1-2 steps suffice), ct | ict | act "
                    "(consistency training from data alone; improved CT of Song & Dhariwal 2023; adversarial CT of "
                    "Kong et al. 2024). Latent space (any diffusers SD 1.x/2.x pipeline folder): --method lcd (latent "
                    "consistency distillation, Luo et al. 2023), lcf (fine-tune an LCM on new data with no teacher), "
                    "lcm-lora (LCD training only LoRA weights, Luo et al. 2023b). Either: guided | progressive (Meng et "
                    "al. 2023: a w-conditioned student, then halving its DDIM steps). Runs under `accelerate launch`, "
                    "resumes from --work-dir.")
    train = sub.add_parser("train", help="train a consistency model from data alone (ct, ict, act)",
                           description="Train a consistency model without a teacher: the same as "
                                       "`fewstep distill --method ct|ict|act`.")
    for p, methods in ((distill, CONSISTENCY + LATENT + GUIDED), (train, TEACHER_FREE)):
        p.add_argument("--method", choices=methods, required=True,
                       help="cd, guided, progressive, lcd, lcf and lcm-lora need --teacher; ct, ict and act need only "
                            "--dataset")
        p.add_argument("--teacher", help="teacher model folder: cd a fewstep pixel model (models/digits-teacher); "
                                         "lcd/lcm-lora any local diffusers SD 1.x/2.x folder (models/emoji-sd); lcf an "
                                         "LCM folder; guided either; progressive a stage-1 student (models/digits-guided, "
                                         "models/emoji-guided)")
        p.add_argument("--dataset", help="'digits', 'emoji', an image folder (text-to-image: with metadata.jsonl "
                                         "captions), a saved HF dataset or webdataset .tar shards (default: the "
                                         "teacher's data set)")
        p.add_argument("--out", required=True, help="model folder to write")
        p.add_argument("--image-size", type=positive_int, default=None, help="ct/ict/act: resize the images")
        p.add_argument("--channels", type=int, choices=[1, 3], default=1, help="ct/ict/act on an image folder: L or RGB")
        _consistency_args(p, DISTANCES)
        if p is distill:
            _guided_args(p)
            _latent_args(p)
        add_data_args(p, stream=p is distill)
        add_train_args(p, steps=3000, batch=64, lr=1e-4)
        p.set_defaults(func=run)


def _consistency_args(p: argparse.ArgumentParser, distances) -> None:
    g = p.add_argument_group("consistency objective (cd, ct, ict, act; lcd, lcf, lcm-lora: --distance, --solver, "
                             "--target-ema)")
    g.add_argument("--distance", choices=distances, default="l2",
                   help="d(x, y) of the loss: l2, l1, pseudo-huber (iCT), classifier (features of the shipped "
                        "classifier, a CPU stand-in for LPIPS), lpips (needs the lpips package and --lpips-weights)")
    g.add_argument("--solver", choices=["euler", "heun", "ddim", "dpm-solver", "dpm-solver++"], default=None,
                   help="the teacher's one-step ODE solver: cd euler | heun (default heun); lcd ddim | dpm-solver | "
                        "dpm-solver++ (2nd-order DPM-Solver-2 / DPM-Solver++(2S); default ddim)")
    g.add_argument("--guidance-scale", type=guidance_scale, default=2.0,
                   help="cd: the classifier-free guidance scale of the teacher ODE the student learns (default 2.0)")
    g.add_argument("--label-dropout", type=probability, default=0.1,
                   help="share of training conditions replaced by the unconditional one, so the model also works "
                        "without a label (unconditional generation and editing; default 0.1)")
    g.add_argument("--num-scales", type=positive_int, help="N: cd's grid (default 18); ct/ict's final N (150 / 1280)")
    g.add_argument("--start-scales", type=positive_int, help="ct/ict's first N (2 / 10)")
    g.add_argument("--target-ema", type=probability, help="target EMA rate μ of cd, lcd, lcf and lcm-lora (default 0.95; "
                                                    "0 = the online student under stop-gradient)")
    g.add_argument("--ct-curriculum", choices=["paper", "fitted"], default="paper",
                   help="ct/act: the target EMA μ(k) of Song et al. 2023 (paper: μ0 = 0.9, tuned for 800k iterations) "
                        "or fitted to this run's --steps (the target's EMA horizon the same share of the run)")
    g.add_argument("--width", type=positive_int, default=32, help="ct/ict/act: UNet base width")
    g.add_argument("--classifier", help="classifier folder for --distance classifier (default: models/<data>-classifier)")
    g.add_argument("--lpips-weights", help="local LPIPS weights for --distance lpips")
    g = p.add_argument_group("adversarial consistency training (act)")
    g.add_argument("--gan-weight", type=probability, default=0.3, help="λ in (1 − λ)·L_CT + λ·L_G (default 0.3)")
    g.add_argument("--gan-weighting", choices=["none", "edm"], default="none",
                   help="w(σ) of the adversarial term: none (ACT's default) or edm, (σ² + σd²)/(σ·σd)²")
    g.add_argument("--d-lr", type=positive, default=1e-4, help="discriminator learning rate")
    g.add_argument("--r1-gamma", type=non_negative, default=10.0, help="R1 penalty weight γ (0: off; default 10)")
    g.add_argument("--r1-interval", type=positive_int, default=16, help="lazy R1: every k steps (default 16)")
    g.add_argument("--augment", type=probability, default=0.0, help="probability of each differentiable augmentation")


def _guided_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("guided distillation (guided: stage 1; progressive: stage 2; Meng et al. 2023)")
    g.add_argument("--min-guidance-scale", type=guidance_scale, default=None,
                   help="guided, lcd, lcm-lora: lowest guidance scale s the student learns (w = s - 1 ~ U[w_min, w_max]; "
                        "default 1)")
    g.add_argument("--max-guidance-scale", type=guidance_scale, default=None,
                   help="guided, lcd, lcm-lora: highest guidance scale (default 4; lcm-lora has no w input, so give "
                        "min = max to distil one scale)")
    g.add_argument("--start-steps", type=positive_int, default=16,
                   help="progressive: step count of the first student; its teacher (--teacher, the stage-1 student) "
                        "takes twice as many steps (default 16); --steps is the optimizer steps of each round")
    g.add_argument("--final-steps", type=positive_int, default=1, help="progressive: halve down to this step count (default 1)")
    g.add_argument("--first-solver", choices=["ddim", "heun"], default="ddim",
                   help="progressive: the first round's teacher step, ddim (Salimans & Ho) or heun (2nd order, twice "
                        "the evaluations; the stage-1 student's ODE is solved better); later rounds always use ddim")
    g.add_argument("--keep-steps", type=step_set, default=[4, 2, 1],
                   help="progressive: the students saved in the model folder (default 4,2,1; the largest is the default)")


def _latent_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("latent consistency (lcd: distil an SD-format teacher; lcf: fine-tune an LCM; lcm-lora; "
                             "Luo et al. 2023). The guidance range is --min/--max-guidance-scale")
    g.add_argument("--skip", type=positive_int, default=20,
                   help="lcd/lcf: skipping step k, the teacher steps from t+k to t on the 1000-step grid (default 20; "
                        "the LCM samples on the grid of 1000/k timesteps)")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute UNet activations in the backward pass (less memory on big UNets)")
    g.add_argument("--teacher-dtype", choices=sorted(DTYPES), default="fp32",
                   help="lcd, lcm-lora, lcf: hold the frozen teacher UNet in this precision (default fp32; the VAE "
                        "and text encoders, used once to encode the data, stay fp32). bf16 halves its memory, as "
                        "diffusers' LCD scripts do; the student, its target and the optimizer stay fp32 (LoRA adapters "
                        "too, on the bf16 base). For full-size UNets on 24 GB, with --ema 0 (no separate weight EMA) "
                        "and --gradient-checkpointing. On a CPU without native bf16 it is much slower")
    g.add_argument("--lora-rank", type=positive_int, default=8,
                   help="lcm-lora: rank of the LoRA adapters (default 8; the paper uses 64 on SD-size UNets)")


def run(args: argparse.Namespace) -> None:
    from ..models.data import data_for, load_dataset
    from ..models.folders import load_model

    if args.method in TEACHER_FREE:
        if stream(args):
            raise FewstepError(f"--stream reads captioned webdataset shards for the latent methods; --method "
                               f"{args.method} trains on images held in memory: leave --stream out")
        teacher, data = None, load_dataset(args.dataset or "digits", args.image_size, args.channels, augment(args))
    elif not args.teacher:
        raise FewstepError(f"--method {args.method} needs a teacher: --teacher DIR (e.g. "
                           + {"lcf": "models/emoji-lcm", "progressive": "models/digits-guided or models/emoji-guided",
                              "guided": "models/digits-teacher or models/emoji-sd", "cd": "models/digits-teacher"}
                           .get(args.method, "models/emoji-sd") + ")")
    else:
        if args.teacher_dtype != "fp32" and args.method not in LATENT:
            raise FewstepError(f"--teacher-dtype {args.teacher_dtype} applies to lcd, lcm-lora and lcf; --method "
                               f"{args.method} holds its teacher in fp32")
        teacher = _checked_teacher(args.method, load_model(args.teacher, dtype=DTYPES[args.teacher_dtype]))
        if args.image_size and args.image_size != teacher.config.image_size:
            raise FewstepError(f"--image-size {args.image_size}: {args.teacher} takes {teacher.config.image_size}² images "
                               f"(the data is resized to the teacher's size); leave --image-size out")
        data = data_for(teacher, args.dataset, augment(args), stream(args))
    folder = _distill(args, teacher, data, train_config(args), command_line(args))
    if folder is not None:
        print(f"saved {args.method} model to {folder}")


def _checked_teacher(method: str, teacher):
    """The teacher, refused before any data loads if the method cannot start from it."""
    if method in GUIDED:
        from ..methods.guided import check_cfg_teacher
        from ..methods.progressive import check_stage1

        return check_cfg_teacher(teacher, method) if method == "guided" else check_stage1(teacher)
    if method in LATENT:
        from ..methods.lcm import check_teacher

        return check_teacher(teacher, method)
    return teacher


def _distill(args: argparse.Namespace, teacher, data, config, command: str):
    """The recipe of ``args.method`` with its settings from the flags."""
    method = args.method
    if method in CONSISTENCY:
        from ..methods.consistency import ConsistencySettings, distill_consistency
        from ..models.folders import shipped_models_dir

        classifier = args.classifier or (str(shipped_models_dir() / f"{data.name.split(':')[0]}-classifier")
                                         if args.distance == "classifier" else None)
        settings = ConsistencySettings(
            method=method, distance=args.distance, solver=args.solver or "heun", guidance_scale=args.guidance_scale,
            label_dropout=args.label_dropout, num_scales=args.num_scales, start_scales=args.start_scales,
            target_ema=args.target_ema, ct_curriculum=args.ct_curriculum, width=args.width, classifier=classifier,
            lpips_weights=args.lpips_weights,
            gan_weight=args.gan_weight, d_lr=args.d_lr, r1_gamma=args.r1_gamma, r1_interval=args.r1_interval,
            augment=args.augment, gan_weighting=args.gan_weighting)
        return distill_consistency(data, args.out, config, settings, teacher, command=command)
    scales = {k: v for k, v in (("min", args.min_guidance_scale), ("max", args.max_guidance_scale)) if v is not None}
    if method == "guided":
        from ..methods.guided import GuidedSettings, distill_guided

        settings = GuidedSettings(label_dropout=args.label_dropout,
                                  **{f"{k}_guidance_scale": v for k, v in scales.items()})
        return distill_guided(data, args.out, config, settings, teacher, command=command)
    if method == "progressive":
        from ..methods.progressive import ProgressiveSettings, distill_progressive

        settings = ProgressiveSettings(start_steps=args.start_steps, final_steps=args.final_steps,
                                       keep_steps=args.keep_steps, label_dropout=args.label_dropout,
                                       first_solver=args.first_solver)
        return distill_progressive(data, args.out, config, settings, teacher, command=command)
    from ..methods.lcm import LCMSettings, distill_lcm

    settings = LCMSettings(method=method, skip=args.skip, solver=args.solver or "ddim", distance=args.distance,
                           target_ema=LCMSettings.target_ema if args.target_ema is None else args.target_ema,
                           gradient_checkpointing=args.gradient_checkpointing, lora_rank=args.lora_rank,
                           **{f"guidance_{k}": v for k, v in scales.items()})
    folder = distill_lcm(teacher, data, args.out, config, settings, command=command)
    if folder is not None and method == "lcm-lora":
        print(f"(a diffusers LoRA: {folder}/pytorch_lora_weights.safetensors)")
    return folder
