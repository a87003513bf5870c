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
    lora_rank,
    non_negative,
    num_scales,
    positive,
    positive_int,
    probability,
    step_set,
    stream,
    train_config,
    unet_width,
)

OPTION_GROUPS: dict = {}   # name -> add(parser, distances): the flags a registered method's settings read


def _methods():
    from ..methods.registry import METHODS

    return METHODS


def _method_list(methods) -> str:
    """The registered methods for --help, by family: "name (summary)"."""
    families: dict[str, list[str]] = {}
    for m in methods:
        families.setdefault(m.family, []).append(f"{m.name} ({m.summary})")
    return "; ".join(f"{family.capitalize()}: {', '.join(items)}" for family, items in families.items())


def add_parsers(sub) -> None:
    from ..methods.registry import teacher_free
    from ..objectives.distances import DISTANCES

    methods = _methods()
    free = teacher_free()
    distill = sub.add_parser(
        "distill", help=f"make a few-step model: {', '.join(methods)}",
        description="Distill a diffusion teacher into a few-step model, or train one from data. The registered "
                    f"methods — {_method_list(methods.values())}. Runs under `accelerate launch`, resumes from "
                    "--work-dir.")
    train = sub.add_parser("train", help=f"train a consistency model from data alone ({', '.join(free)})",
                           description="Train a consistency model without a teacher: the same as "
                                       f"`fewstep distill --method {'|'.join(free)}`.")
    for p, names in ((distill, list(methods)), (train, free)):
        needing = [n for n in names if methods[n].needs_teacher]
        p.add_argument("--method", choices=names, required=True,
                       help=(f"{', '.join(needing)} need --teacher; " if needing else "")
                       + f"{', '.join(n for n in names if n in free)} need only --dataset")
        p.add_argument("--teacher", help="teacher model folder: "
                       + "; ".join(f"{n} {methods[n].teacher}" for n in needing) if needing else argparse.SUPPRESS)
        p.add_argument("--dataset", help="'digits', 'emoji', an image folder (text-to-image: with metadata.jsonl "
                                         "captions), a saved HF dataset or webdataset .tar shards (default: the "
                                         "teacher's data set)")
        p.add_argument("--out", required=True, help="model folder to write")
        p.add_argument("--image-size", type=positive_int, default=None, help="ct/ict/act: resize the images")
        p.add_argument("--channels", type=int, choices=[1, 3], default=1, help="ct/ict/act on an image folder: L or RGB")
        groups = dict.fromkeys(g for n in names for g in methods[n].options)
        before = len(p._actions)
        for group in groups:
            OPTION_GROUPS[group](p, DISTANCES)
        p.set_defaults(method_flags={a.dest: (a.option_strings[0], a.default) for a in p._actions[before:]})
        add_data_args(p, stream=p is distill)
        add_train_args(p, steps=3000, batch=64, lr=1e-4)
        p.set_defaults(func=run)


def _consistency_args(p: argparse.ArgumentParser, distances) -> None:
    g = p.add_argument_group("consistency objective (cd, ct, ict, act; lcd, lcf, lcm-lora: --distance, --solver, "
                             "--target-ema)")
    g.add_argument("--distance", choices=distances, default=None,
                   help="d(x, y) of the loss: l2, l1, pseudo-huber, classifier (pooled features of the shipped "
                        "classifier), features (LPIPS's formula on the data set's feature network, the stand-in for "
                        "LPIPS), lpips (needs the lpips package and --lpips-weights); default pseudo-huber for ict "
                        "(the iCT paper's, c = 0.00054·√d), features for act (LPIPS in kong13661/ACT), l2 otherwise")
    g.add_argument("--solver", choices=["euler", "heun", "ddim", "dpm-solver", "dpm-solver++"], default=None,
                   help="the teacher's one-step ODE solver: cd euler | heun (default heun); lcd ddim | dpm-solver | "
                        "dpm-solver++ (2nd-order DPM-Solver-2 / DPM-Solver++(2S); default ddim)")
    g.add_argument("--guidance-scale", type=guidance_scale, default=2.0,
                   help="cd, scd: the classifier-free guidance scale of the teacher ODE the student learns (default 2.0)")
    g.add_argument("--label-dropout", type=probability, default=0.1,
                   help="share of training conditions replaced by the unconditional one, so the model also works "
                        "without a label (unconditional generation and editing; default 0.1)")
    g.add_argument("--num-scales", type=num_scales, help="N: cd's grid (default 18); ct/ict's final N (150 / 1280)")
    g.add_argument("--start-scales", type=num_scales, help="ct/ict's first N (2 / 10)")
    g.add_argument("--target-ema", type=probability, help="target EMA rate μ of cd, lcd, lcf and lcm-lora (default 0.95; "
                                                    "0 = the online student under stop-gradient)")
    g.add_argument("--ct-curriculum", choices=["paper", "fitted"], default="paper",
                   help="ct/act: the target EMA μ(k) of Song et al. 2023 (paper: μ0 = 0.9, tuned for 800k iterations) "
                        "or fitted to this run's --steps (the target's EMA horizon the same share of the run)")
    g.add_argument("--width", type=unet_width, default=32, help="ct/ict/act: UNet base width")
    g.add_argument("--classifier", help="the network of --distance classifier (default: models/<data>-classifier) or "
                                        "--distance features (default: models/<data>-features)")
    g.add_argument("--lpips-weights", help="local LPIPS weights for --distance lpips")
    g.add_argument("--p-mean", type=float, default=None,
                   help="scd, sct, ect: training noise levels ln σ ~ N(P_mean, P_std²) (σ = σ_d·tan t in TrigFlow); "
                        "default scd/sct −1.0 (Lu & Song 2025), ect −1.1 (locuslab/ect)")
    g.add_argument("--p-std", type=positive, default=None, help="scd, sct, ect: P_std (default scd 1.4, sct 1.8, ect 2.0)")
    g.add_argument("--two-step-sigma", type=positive, default=None,
                   help="scd, sct, ect: the intermediate σ of the saved 2-step grid [σ_max, σ, 0] (default 0.821: "
                        "locuslab/ect's --mid_t, FastGen's sCM grid; eval --tune-sigmas --save-sigmas retunes it)")


def _adversarial_args(p: argparse.ArgumentParser, distances=None) -> None:
    g = p.add_argument_group("adversarial consistency training (act)")
    g.add_argument("--gan-weight", type=probability, default=0.3, help="λ in (1 − λ)·L_CT + λ·L_G (default 0.3)")
    g.add_argument("--gan-weighting", choices=["none", "edm"], default="none",
                   help="w(σ) of the adversarial term: none (ACT's default) or edm, (σ² + σd²)/(σ·σd)²")
    g.add_argument("--d-lr", type=positive, default=1e-4, help="discriminator learning rate")
    g.add_argument("--r1-gamma", type=non_negative, default=10.0, help="R1 penalty weight γ (0: off; default 10)")
    g.add_argument("--r1-interval", type=positive_int, default=16, help="lazy R1: every k steps (default 16)")
    g.add_argument("--augment", type=probability, default=0.0,
                   help="the augmentation probability p at the start (default 0); it adapts as kong13661/ACT's: up while "
                        "the EMA of R1 exceeds --ada-target, down otherwise")
    g.add_argument("--ada-target", type=positive, default=10000.0, help="ACT's r1_threshold (default 10000)")
    g.add_argument("--ada-length", type=positive, default=500000.0,
                   help="images for p to move by 1 (ACT's ada_length, default 500000)")


def _guided_args(p: argparse.ArgumentParser, distances=None) -> None:
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


def _latent_args(p: argparse.ArgumentParser, distances=None) -> None:
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
    g.add_argument("--lora-rank", type=lora_rank, default=8,
                   help="lcm-lora: rank of the LoRA adapters (default 8; the paper uses 64 on SD-size UNets)")


def _continuous_args(p: argparse.ArgumentParser, distances=None) -> None:
    g = p.add_argument_group("continuous-time consistency (scd, sct; Lu & Song 2025). scd learns the teacher's PF-ODE "
                             "at --guidance-scale; both take --label-dropout")
    g.add_argument("--tangent-warmup", type=positive_int, default=None,
                   help="steps H over which the tangent's second term ramps in, r = min(1, k/H) (default 2%% of --steps)")
    g.add_argument("--tangent-const", type=positive, default=None,
                   help="c of the tangent normalisation g/(‖g‖ + c) (default 0.1)")
    g.add_argument("--adaptive-weighting", action=argparse.BooleanOptionalAction, default=None,
                   help="learn the weighting w_φ(t) (default on)")
    g.add_argument("--prior-weighting", action=argparse.BooleanOptionalAction, default=None,
                   help="weight each time by 1/(σ_d·tan t) (default on)")
    g.add_argument("--jvp", choices=["auto", "exact", "finite-difference"], default=None,
                   help="how dF/dt is computed: forward-mode AD (exact), a central finite difference, or auto (exact, "
                        "else the finite difference with a warning; default)")


def _ect_args(p: argparse.ArgumentParser, distances=None) -> None:
    g = p.add_argument_group(
        "easy consistency tuning (ect; Geng et al. 2024): --teacher is an EDM pixel teacher whose weights start the "
        "student; its ODE is never run (consistency training pairs x + t·z, x + r·z). Defaults: locuslab/ect "
        "run_ecm.sh; --label-dropout applies; --distance does not (ECT's own, see --huber-c)")
    g.add_argument("--ect-q", type=positive, default=None,
                   help="Δt = t − r shrinks by q each stage: r = t·(1 − q^−(stage+1)·(1 + k·sigmoid(−b·t))) (default 2; "
                        "the reference's 1-hour recipe: 256 with --ect-stages 1)")
    g.add_argument("--ect-stages", type=positive_int, default=None,
                   help="stages over the run, each --steps/stages long (default 8: run_ecm.sh's 25.6 Mimg at one "
                        "stage per 3.2 Mimg, scaled to this run's length; 1: Δt never shrinks)")
    g.add_argument("--ect-k", type=float, default=None, help="k of the mapping n(t) = 1 + k·sigmoid(−b·t) (default 8)")
    g.add_argument("--ect-b", type=float, default=None, help="b of the mapping (default 1)")
    g.add_argument("--huber-c", type=non_negative, default=None,
                   help="c of the distance √(‖x − y‖² + c²) − c (default 0, as run_ecm.sh: the l2 norm)")


def _reads(method) -> set[str]:
    """The option dests a method reads: its settings' fields (under their flag names), --teacher-dtype where it
    holds a frozen teacher it may shrink."""
    from dataclasses import fields

    return {method.flags.get(f.name, f.name) for f in fields(method.settings)} | (
        {"teacher_dtype"} if method.frozen_teacher_dtype else set())


def check_method_flags(args: argparse.Namespace, method) -> None:
    """A method-group flag given to a method that does not read it is an error naming the methods it is for (not
    silently ignored); a LoRA method, whose adapters take no guidance-scale input, learns one scale, not a range."""
    reads = _reads(method)
    for dest, (flag, default) in getattr(args, "method_flags", {}).items():
        if dest == "teacher_dtype":
            continue                      # run() says where --teacher-dtype applies, in its own words
        if dest not in reads and getattr(args, dest, default) != default:
            users = [m.name for m in _methods().values() if dest in _reads(m)]
            raise FewstepError(f"{flag} does not apply to --method {method.name} (it sets {', '.join(users)}); "
                               f"leave it out")
    lo, hi = getattr(args, "min_guidance_scale", None), getattr(args, "max_guidance_scale", None)
    if method.name.endswith("-lora") and (lo is not None or hi is not None) and lo != hi:
        raise FewstepError(f"--method {method.name} trains adapters with no guidance-scale input: it learns one scale, "
                           f"not a range ({lo if lo is not None else 'default'} to {hi if hi is not None else 'default'}); "
                           f"give the one scale as both, e.g. --min-guidance-scale 3 --max-guidance-scale 3")


OPTION_GROUPS.update(consistency=_consistency_args, adversarial=_adversarial_args, guided=_guided_args,
                     latent=_latent_args, continuous=_continuous_args, ect=_ect_args)


def run(args: argparse.Namespace) -> None:
    """Load the teacher (checked by the method before any data loads) or the data set, build the method's
    settings from the flags, and run its recipe."""
    from ..models.data import data_for, load_dataset
    from ..models.folders import load_model

    method = _methods()[args.method]
    check_method_flags(args, method)      # a flag of another method is an error, before anything loads
    if not method.needs_teacher:
        if stream(args):
            raise FewstepError(f"--stream reads captioned webdataset shards for the latent methods; --method "
                               f"{args.method} trains on images held in memory: leave --stream out")
        teacher, data = None, load_dataset(args.dataset or "digits", args.image_size, args.channels, augment(args))
    elif not args.teacher:
        raise FewstepError(f"--method {args.method} needs a teacher: --teacher DIR (e.g. {method.teacher})")
    else:
        teacher_dtype = getattr(args, "teacher_dtype", "fp32")
        if teacher_dtype != "fp32" and not method.frozen_teacher_dtype:
            frozen = [m.name for m in _methods().values() if m.frozen_teacher_dtype]
            raise FewstepError(f"--teacher-dtype {teacher_dtype} applies to {', '.join(frozen[:-1])} and {frozen[-1]}; --method "
                               f"{args.method} holds its teacher in fp32")
        teacher = load_model(args.teacher, dtype=DTYPES[teacher_dtype])
        if method.check is not None:
            teacher = method.check(teacher, args.method)
        if args.image_size and args.image_size != teacher.config.image_size:
            raise FewstepError(f"--image-size {args.image_size}: {args.teacher} takes {teacher.config.image_size}² images "
                               f"(the data is resized to the teacher's size); leave --image-size out")
        data = data_for(teacher, args.dataset, augment(args), stream(args))
    settings = method.make_settings(vars(args))
    folder = method.recipe(teacher, data, args.out, train_config(args, method.optimizer, method.betas), settings,
                           command_line(args))
    if folder is not None:
        print(f"saved {args.method} model to {folder}")
        if method.note is not None:
            print(method.note(folder))
