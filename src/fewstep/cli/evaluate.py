"""``fewstep eval``: score a model at its step counts on the ruler of its data set (JSON out)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import FewstepError
from .args import add_grid_args, add_lora_arg, eval_samples, guidance_scale, load_options, probability, seed, step_list
from .checks import check_sample_request


def add_parser(sub) -> None:
    from ..core.solvers import SAMPLERS

    p = sub.add_parser("eval", help="FID, KID, precision/recall and conditional accuracy per step count",
                       description="Sample a model with fixed seeds at each step count and score the samples "
                                   "against the whole data set: FID, KID (± std) and precision/recall (k=3) on the "
                                   "data set's feature network, conditional accuracy with its classifier, NFE and "
                                   "seconds/image.")
    p.add_argument("--model", help="model folder (or --images)")
    p.add_argument("--images", metavar="DIR",
                   help="instead of a model: score a folder of images made anywhere (diffusers, ComfyUI, …) on "
                        "--dataset's ruler; what each was meant to show comes from a metadata.jsonl (file_name + label, "
                        "class_name or text) or the PNG's fewstep record")
    p.add_argument("--dataset", help="with --images: the data set whose ruler scores them (digits, emoji)")
    p.add_argument("--steps", type=step_list, default=None, help="comma-separated step counts (default 1,2,4)")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default=None, help="default: the model's")
    p.add_argument("--eta", "--gamma", dest="eta", type=probability, default=None, metavar="G",
                   help="--sampler tcd: TCD's γ in [0, 1] (default 0.3; see fewstep sample --help)")
    p.add_argument("--guidance-scale", type=guidance_scale, default=None, help="1.0 = none (default: the model's)")
    p.add_argument("--num", type=eval_samples, default=None,
                   help="samples per step count (default 1000; at least 4: precision/recall take each sample's 3 "
                        "nearest neighbours); with --images: score the first N images (default all)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--classifier", help="the group classifier of conditional accuracy (default: "
                                        "models/<dataset>-classifier)")
    p.add_argument("--features", help="the feature network of FID/KID/precision/recall (default: models/<dataset>-features "
                                      "where there is one, else the classifier's features)")
    p.add_argument("--models", help="folder of shipped models (default: the repository's models/)")
    p.add_argument("--json", help="write the results as one JSON object here")
    p.add_argument("--grid", help="write a PNG of samples per step count here")
    p.add_argument("--tune-sigmas", action="store_true",
                   help="first ternary-search the intermediate noise levels of each multi-step count for the "
                        "lowest FID (Song et al. 2023; for consistency models), then evaluate with them")
    p.add_argument("--save-sigmas", action="store_true", help="with --tune-sigmas: store the grids in the model folder")
    add_lora_arg(p, "fuse a LoRA first")
    p.add_argument("--tiny-vae", metavar="DIR", help="pipelines: decode with this AutoencoderTiny (fewstep train-tiny-vae)")
    add_grid_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    import json

    from ..eval.evaluate import eval_report, evaluate, ruler_for
    from ..io.atomic import check_writable, write_text, writing_into
    from ..io.images import labeled_rows, make_grid, save_png
    from ..models.config import CONFIG_NAME
    from ..models.folders import shipped_models_dir
    from ..models.loras import load_with_loras
    from ..models.tiny_vae import with_tiny_vae

    if (args.model is None) == (args.images is None):
        raise FewstepError("give --model DIR (sample it and score the samples) or --images DIR --dataset NAME (score "
                           "a folder of images)")
    if args.images is not None:
        return _score_images(args)
    if args.dataset is not None:
        raise FewstepError("--dataset names the ruler of --images; a model is scored on its own data set's ruler")
    args.steps, args.num = args.steps or [1, 2, 4], args.num or 1000
    if args.save_sigmas and not args.tune_sigmas:
        raise FewstepError("--save-sigmas stores the grids --tune-sigmas finds: give both")
    for path, suffix in ((args.json, None), (args.grid, ".png")):
        if path:
            check_writable(path, suffix)  # fail before any work
    if args.save_sigmas:
        if not Path(args.model).is_dir():
            raise FewstepError(f"--save-sigmas stores the grids in the model folder's {CONFIG_NAME}; {args.model} is "
                               f"not a folder")
        with writing_into(Path(args.model) / CONFIG_NAME):
            check_writable(Path(args.model) / CONFIG_NAME, what="--save-sigmas")
    model = with_tiny_vae(load_with_loras(args.model, args.lora, **load_options(args)), args.tiny_vae)
    check_sample_request(args, model, args.num)   # --rho/--clamp-x0 apply, the samples fit: before any sampling
    ruler = ruler_for(model, Path(args.models or shipped_models_dir()), args.classifier, args.features)
    if args.tune_sigmas:
        _tune_sigmas(model, ruler, args)
    rows, samples = evaluate(model, ruler, args.steps, args.sampler, args.guidance_scale, args.num, args.seed,
                             rho=args.rho, clamp_x0=args.clamp_x0, eta=args.eta)
    report = eval_report(model, rows, args.num, args.seed, ruler)
    if (args.sampler or model.config.default_sampler) == "tcd":   # TCD's γ beside its rows (a key added, none renamed)
        from ..core.solvers import TCD_GAMMA

        report["eta"] = TCD_GAMMA if args.eta is None else args.eta
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
    """``--tune-sigmas``: ternary-search each multi-step count's intermediate levels and use them for the
    evaluation that follows; ``--save-sigmas`` also stores them in the model's fewstep.json."""
    from ..eval.evaluate import tune_sigmas
    from ..io.atomic import write_text, writing_into
    from ..models.config import CONFIG_NAME

    if model.config.is_lcm:
        raise FewstepError("--tune-sigmas is for pixel-space consistency models; an LCM samples on its skipped grid")
    sampler = args.sampler or model.config.default_sampler
    for n in (n for n in args.steps if n >= 2):
        grid, fid = tune_sigmas(model, ruler, n, num=min(args.num, 500), seed=args.seed, sampler=sampler,
                                guidance_scale=args.guidance_scale)
        model.config.sampling_sigmas[str(n)] = [round(s, 4) for s in grid]
        print(f"{n} steps: best σ grid {', '.join(f'{s:.4g}' for s in grid)} (FID {fid:.3f} on {min(args.num, 500)} samples)")
    if args.save_sigmas:                                  # the one write into an input this command is for
        with writing_into(model.path / CONFIG_NAME):
            write_text(model.path / CONFIG_NAME, model.config.to_json())
        print(f"saved the tuned grids to {model.path / CONFIG_NAME}")


def _score_images(args: argparse.Namespace) -> None:
    """``--images DIR --dataset NAME``: one row of ``eval --json``'s shape for the folder (:mod:`fewstep.eval.images`)."""
    import json

    from ..eval.evaluate import dataset_ruler
    from ..eval.images import score_folder
    from ..io.atomic import check_writable, write_text
    from ..models.folders import shipped_models_dir

    sampling = {"--steps": args.steps, "--sampler": args.sampler, "--guidance-scale": args.guidance_scale,
                "--grid": args.grid, "--tune-sigmas": args.tune_sigmas or None, "--save-sigmas": args.save_sigmas or None,
                "--lora": args.lora, "--tiny-vae": args.tiny_vae, "--dtype": args.dtype, "--variant": args.variant,
                "--config": args.config, "--rho": args.rho, "--clamp-x0": args.clamp_x0 or None}
    given = [flag for flag, value in sampling.items() if value]
    if given:
        raise FewstepError(f"{', '.join(given)} sample a model; --images scores images that exist: leave "
                           f"{'it' if len(given) == 1 else 'them'} out")
    if not args.dataset:
        raise FewstepError("--images needs --dataset NAME: the data set whose ruler scores them (digits, emoji)")
    if args.json:
        check_writable(args.json)
    ruler = dataset_ruler(args.dataset, Path(args.models or shipped_models_dir()), args.classifier, args.features)
    report = score_folder(args.images, ruler, seed=args.seed, limit=args.num)
    r = report["results"][0]
    acc = "-" if r["cond_accuracy"] is None else f"{r['cond_accuracy']:.3f}"
    print(f"{report['num_samples']} images of {args.images} on the {ruler.data.name} ruler ({report['labelled']} "
          f"labelled): FID {r['fid']:.3f} ± {r['fid_std']:.3f}, KID {r['kid']:.5f}, precision {r['precision']:.3f}, "
          f"recall {r['recall']:.3f}, accuracy {acc}")
    if args.json:
        write_text(args.json, json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
