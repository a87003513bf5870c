"""``fewstep distill --method guided | progressive``: the options and the glue (Meng et al. 2023).

Kept out of :mod:`fewstep.cli` so that file only routes to it."""

from __future__ import annotations

import argparse

from .errors import FewstepError


def _step_set(text: str) -> list[int]:
    """Distinct step counts, largest first (``fewstep.cli``'s step-list parsing and its errors)."""
    from .cli import _step_list

    return sorted(set(_step_list(text)), reverse=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("guided distillation (guided: stage 1; progressive: stage 2; Meng et al. 2023)")
    g.add_argument("--min-guidance-scale", type=float, default=1.0,
                   help="guided, lcd, lcm-lora: lowest guidance scale s the student learns (w = s - 1 ~ U[w_min, w_max]; "
                        "default 1)")
    g.add_argument("--max-guidance-scale", type=float, default=4.0,
                   help="guided, lcd, lcm-lora: highest guidance scale (default 4; lcm-lora has no w input, so give "
                        "min = max to distil one scale)")
    g.add_argument("--start-steps", type=int, default=16,
                   help="progressive: step count of the first student; its teacher (--teacher, the stage-1 student) "
                        "takes twice as many steps (default 16); --steps is the optimizer steps of each round")
    g.add_argument("--final-steps", type=int, default=1, help="progressive: halve down to this step count (default 1)")
    g.add_argument("--first-solver", choices=["ddim", "heun"], default="ddim",
                   help="progressive: the first round's teacher step, ddim (Salimans & Ho) or heun (2nd order, twice "
                        "the evaluations; the stage-1 student's ODE is solved better); later rounds always use ddim")
    g.add_argument("--keep-steps", type=_step_set, default=[4, 2, 1],
                   help="progressive: the students saved in the model folder (default 4,2,1; the largest is the default)")


def run(args: argparse.Namespace, train_config, command: str) -> None:
    from .data import load_dataset
    from .models import load_model
    from .sd import is_pipeline_folder

    if not args.teacher:
        raise FewstepError(f"--method {args.method} needs --teacher DIR "
                           + ("(e.g. models/digits-teacher, or a Stable-Diffusion-style folder such as models/emoji-sd)"
                              if args.method == "guided"
                              else "(a stage-1 student made with --method guided, e.g. models/digits-guided)"))
    from .guided import GuidedSettings, check_latent_teacher, distill_guided, distill_guided_latent
    from .progressive import ProgressiveSettings, check_latent_stage1, distill_progressive, distill_progressive_latent

    latent = is_pipeline_folder(args.teacher)
    if latent:  # text-to-image in latent space: prompts instead of labels
        from .data import load_captioned
        from .sd import load_latent_model

        teacher = load_latent_model(args.teacher)
        (check_latent_teacher if args.method == "guided" else check_latent_stage1)(teacher)
        data = load_captioned(args.dataset or teacher.info.get("dataset") or "emoji", teacher.vae.config.sample_size)
    else:
        teacher = load_model(args.teacher)
        data = load_dataset(args.dataset or teacher.config.dataset or "digits", args.image_size, args.channels)
    if args.method == "guided":
        settings = GuidedSettings(min_guidance_scale=args.min_guidance_scale, max_guidance_scale=args.max_guidance_scale,
                                  label_dropout=args.label_dropout)
        if latent:
            folder = distill_guided_latent(teacher, data, args.out, train_config, settings, command=command)
        else:
            folder = distill_guided(data, args.out, train_config, settings, teacher, command=command)
    else:
        settings = ProgressiveSettings(start_steps=args.start_steps, final_steps=args.final_steps,
                                       keep_steps=args.keep_steps, label_dropout=args.label_dropout,
                                       first_solver=args.first_solver)
        if latent:
            folder = distill_progressive_latent(teacher, data, args.out, train_config, settings, command=command)
        else:
            folder = distill_progressive(data, args.out, train_config, settings, teacher, command=command)
    if folder is not None:
        print(f"saved {args.method} model to {folder}")
