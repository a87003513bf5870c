"""``fewstep bench``: the benchmark tables behind BENCHMARKS.md (logic in :mod:`fewstep.bench`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .args import at_least, command_line, eval_samples, seed


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="quality-vs-steps and speed tables for the teacher's solvers and distilled models",
                       description="In one process: the teacher with DDIM, Euler, Heun and DPM-Solver++(2M) at 1-50 "
                                   "steps and every distilled model, scored the same way; wall-clock per image at a "
                                   "fixed batch with each sampler's overhead over its NFE x network-time floor; and "
                                   "the speedup at matched FID. Writes JSON, PNG plots and BENCHMARKS.md.")
    p.add_argument("--out", default="bench/results", help="folder for bench.json and the plots")
    p.add_argument("--markdown", default="BENCHMARKS.md", help="the markdown table to (re)write")
    p.add_argument("--no-markdown", action="store_true", help="do not write the markdown table")
    p.add_argument("--quick", action="store_true", help="small sample counts and step sets (a smoke test)")
    p.add_argument("--num", type=eval_samples, help="samples per quality point (default 1000; quick: 100; at least 4 for "
                                                   "precision/recall's 3 nearest neighbours)")
    p.add_argument("--edit-num", type=at_least(2),
                   help="real images per zero-shot editing measurement (default 200; quick: 50)")
    p.add_argument("--reuse", help="a previous bench.json whose teacher quality rows are reused when its sample "
                                   "count and seed match (timings are always re-measured side by side)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--models", help="folder of shipped models (default: the repository's models/)")
    p.add_argument("--render-only", action="store_true",
                   help="measure nothing: rewrite the markdown from --reuse's bench.json (picks up "
                        "bench/results/lcm_ablation.json after bench/lcm_ablation.py)")
    p.add_argument("--only", choices=["digits", "guided", "guided-latent", "latent", "lora", "tcd", "ruler", "quality-check", "emoji-pixel",
                                      "sdxl", "flow", "serve", "serve-sliders", "serve-backends"],
                   help="run one section and merge it into the --reuse report: digits (the digits teacher's "
                        "solvers and the consistency models, quality and editing; the timings are kept), guided (guided and progressive "
                        "distillation on digits), guided-latent (stages 1 and 2 on the emoji pipeline, beside the LCM), latent (the emoji "
                        "LCM beside its teacher), lora (LCM-LoRA and style arithmetic), tcd (TCD-LoRA against LCM-LoRA at 2/4/8 steps "
                        "and over TCD's γ), ruler (the emoji ruler checked on itself: real, blurred, noisy images and 3 "
                        "groups dropped, on the feature network and the group classifier's features), quality-check (every "
                        "shipped generator's FID at 200 samples: the reference tests/test_quality_check.py holds CI "
                        "to), emoji-pixel (the emoji pixel "
                        "testbed: CD, CT, iCT, ACT, guided and progressive students of models/emoji-pixel-teacher; a stopped "
                        "run resumes from OUT/emoji_pixel.progress.json), flow (the FLUX- and SD3-format teachers over "
                        "a guidance × steps grid and their LCM-LoRAs), serve (fewstep "
                        "serve against diffusers' LCM pipeline at 1/4/16 clients, the LoRA sliders of ./run serve "
                        "fused and unfused against diffusers with the LoRAs fused, every backend side by side, and the tiny "
                        "VAE end to end), serve-sliders (only the LoRA sliders' servers, into the serve section), "
                        "serve-backends (only the served networks' calls on eager, TorchScript, ONNX Runtime, "
                        "OpenVINO and torch.compile, into the serve section)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..bench.results import BenchSettings
    from ..bench.run import render_report, run_bench, run_section_only
    from ..io.atomic import check_writable
    from ..models.folders import shipped_models_dir

    settings = BenchSettings.quick_settings() if args.quick else BenchSettings()
    if args.num:
        settings.num = args.num
    if args.edit_num:
        settings.edit_num = args.edit_num
    settings.seed = args.seed
    settings.reuse = args.reuse
    markdown = None if args.no_markdown else check_writable(args.markdown, ".md", "--markdown")
    models = Path(args.models or shipped_models_dir())
    if args.render_only:  # no measuring: BENCHMARKS.md again from --reuse's bench.json (e.g. after an ablation)
        render_report(Path(args.reuse or Path(args.out) / "bench.json"), Path(args.markdown), Path(args.out))
        print(f"wrote {args.markdown}")
    elif args.only:  # one section, merged into --reuse's report
        run_section_only(args.only, models, Path(args.out), settings, command_line(args), markdown)
        print(f"wrote the {args.only} section into {args.out}/bench.json" + (f" and {markdown}" if markdown else ""))
    else:
        run_bench(models, Path(args.out), settings, command_line(args), markdown)
        print(f"wrote {args.out}/bench.json and plots" + (f", and {markdown}" if markdown else ""))
