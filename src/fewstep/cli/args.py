"""What every subcommand's parser shares: argparse types, the training flags and the command record.
A leaf: it imports nothing of fewstep's but the training config."""

from __future__ import annotations

import argparse
import math
import shlex
from pathlib import Path


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (and exit 2), like every other fewstep error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def command_line(args: argparse.Namespace) -> str:
    """The command as typed, recorded in everything a command writes."""
    return "fewstep " + " ".join(shlex.quote(a) for a in args.argv)


def positive_int(text: str) -> int:
    return at_least(1)(text)


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False):
    """An argparse type: a finite float within [lo, hi] (open ends where said), with a message naming the
    range; NaN and ±inf are never accepted."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        too_low = lo is not None and (value <= lo if lo_open else value < lo)
        too_high = hi is not None and (value >= hi if hi_open else value > hi)
        if not math.isfinite(value) or too_low or too_high:
            left = "(" if lo_open else "["
            right = ")" if hi_open else "]"
            raise argparse.ArgumentTypeError(f"must be a finite number in {left}{'-inf' if lo is None else f'{lo:g}'}, "
                                             f"{'inf' if hi is None else f'{hi:g}'}{right}, got {text!r}")
        return value
    return parse


probability = number(0.0, 1.0)
positive = number(0.0, lo_open=True)
non_negative = number(0.0)
guidance_scale = number(0.0, 100.0)


def seed(text: str) -> int:
    """A random seed: an integer in [0, 2^63)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"a seed must be in [0, 2^63), got {text}")
    return value


def at_least(n: int):
    """An argparse type: an integer ≥ ``n``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < n:
            raise argparse.ArgumentTypeError(f"must be at least {n}, got {value}")
        return value
    return parse


def int_range(lo: int, hi: int, why: str = ""):
    """An argparse type: an integer in [lo, hi]; above ``hi`` the message says why that is the bound."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo:,}, got {value:,}")
        if value > hi:
            raise argparse.ArgumentTypeError(f"must be at most {hi:,}{f' ({why})' if why else ''}, got {value:,}")
        return value
    return parse


# the bounds of the numeric flags, with why (one place: every subcommand's parser takes its types from here)
label = int_range(0, 2**31 - 1, "a class index; the model's classes are listed by fewstep sample --help")
lora_rank = int_range(1, 1024, "the LCM-LoRA paper uses 64 on SD-size UNets; a rank above a layer's width adds "
                               "nothing but memory")
num_scales = int_range(1, 10_000, "the papers use N = 18 (CD) to 1280 (iCT); far finer grids make neighbouring "
                                  "noise levels equal in float32")
eval_samples = int_range(4, 50_000, "FID's standard sample count; more takes hours and changes no figure")
per_class = int_range(1, 1_000, "1,000 per digit is 10,000 samples per model, far past where the figures settle")
grad_accum = int_range(1, 1_024, "a larger batch than memory holds: a larger --grad-accum runs that many micro-batches "
                                 "per step")
serve_queue = int_range(1, 4_096, "each request in flight holds its prompt, upload and images; past a few thousand the "
                        "server only queues work it cannot finish before clients time out")
serve_batch = int_range(1, 1_024, "a network batch larger than this only adds latency on one machine")
unet_width = int_range(1, 2_048, "the widest level of Stable Diffusion's UNet is 1280 channels")
MAX_STEPS = 1000     # a diffusion model's training timesteps: no sampler runs more steps than the model has


def step_list(text: str) -> list[int]:
    """Comma-separated step counts, e.g. ``1,2,4``, each in [1, :data:`MAX_STEPS`]."""
    try:
        steps = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2,4, got {text!r}") from None
    if not steps or min(steps) < 1:
        raise argparse.ArgumentTypeError(f"step counts must be at least 1, got {text!r}")
    if max(steps) > MAX_STEPS:
        raise argparse.ArgumentTypeError(f"step counts must be at most {MAX_STEPS:,} (a diffusion model's training "
                                         f"timesteps), got {max(steps):,}")
    return steps


def step_set(text: str) -> list[int]:
    """Distinct step counts, largest first."""
    return sorted(set(step_list(text)), reverse=True)


def sigma_list(text: str) -> list[float]:
    """Comma-separated, positive, strictly decreasing noise levels, e.g. ``80,20,5``."""
    try:
        sigmas = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated noise levels like 80,20,5, got {text!r}") from None
    if not sigmas or not all(map(math.isfinite, sigmas)) or min(sigmas) <= 0 \
            or any(a <= b for a, b in zip(sigmas, sigmas[1:])):
        raise argparse.ArgumentTypeError(f"noise levels must be positive and strictly decreasing, got {text!r}")
    return sigmas


# what one command may ask for before it must say --allow-large (sampling steps, images, grid upscaling, frames):
# beyond these a typo costs hours or the machine's memory
# --dtype / --teacher-dtype: a pipeline's weights in this precision (torch dtype names, as diffusers' torch_dtype)
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

LIMITS = {"steps": 1000, "num": 2000, "scale": 16, "frames": 256, "height": 2048, "width": 2048}


def add_limits(p: argparse.ArgumentParser, *names: str) -> None:
    """``--allow-large`` and the :data:`LIMITS` of ``names`` for this subcommand (checked by :func:`check_limits`)."""
    p.add_argument("--allow-large", action="store_true",
                   help="lift the limits on " + ", ".join(f"--{n} (≤ {LIMITS[n]:,})" for n in names))
    p.set_defaults(limits=names)


def check_limits(args: argparse.Namespace) -> None:
    """Refuse values above :data:`LIMITS` unless --allow-large; with it, say what is about to start."""
    big = [(n, getattr(args, n)) for n in getattr(args, "limits", ()) if (getattr(args, n, None) or 0) > LIMITS[n]]
    if not big:
        return
    what = ", ".join(f"--{n} {v:,} (limit {LIMITS[n]:,})" for n, v in big)
    if not args.allow_large:
        raise argparse.ArgumentTypeError(f"{what}: a request this large can take hours or all the memory; pass "
                                         f"--allow-large if you mean it")
    import sys

    print(f"fewstep: large request: {what}; this may take long and need much memory", file=sys.stderr)


def add_grid_args(p: argparse.ArgumentParser) -> None:
    """The few-step remedies of BENCHMARKS.md "Heun at 2–4 steps": the Karras grid's ρ and an x0 clamp."""
    p.add_argument("--rho", type=number(0.5, 20.0), default=None,
                   help="EDM σ-space models: ρ of the Karras step grid (default the schedule's 7; 3 keeps Heun from "
                        "overshooting at 2–4 steps)")
    p.add_argument("--clamp-x0", action="store_true",
                   help="pixel models: clip every x0-estimate to [-1, 1] before the solver uses it")


def add_train_args(p: argparse.ArgumentParser, steps: int, batch: int, lr: float) -> None:
    g = p.add_argument_group("training (shared by every trainer)")
    g.add_argument("--steps", type=positive_int, default=steps, help=f"optimizer steps (default {steps})")
    g.add_argument("--batch", type=positive_int, default=batch, help=f"global batch size (default {batch})")
    g.add_argument("--grad-accum", type=grad_accum, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=positive, default=lr, help=f"peak learning rate (default {lr})")
    g.add_argument("--warmup", type=at_least(0), default=200, help="linear LR warm-up steps")
    g.add_argument("--grad-clip", type=non_negative, default=1.0, help="max gradient norm (0: off)")
    g.add_argument("--ema", type=number(0.0, 1.0, hi_open=True), default=0.999,
                   help="EMA decay of the saved weights (default 0.999); 0: no EMA copy, the online weights are saved "
                        "(a full-size UNet's worth of memory less)")
    g.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    g.add_argument("--optimizer", choices=["adamw", "adamw-fused", "adamw-8bit", "radam"], default=None,
                   help="adamw (the default, but radam for --method act, as kong13661/ACT); adamw-fused: the same "
                        "update as one fused kernel per step; adamw-8bit: bitsandbytes' 8-bit AdamW, 2 bytes of moments "
                        "per trained parameter instead of 8 (diffusers' --use_8bit_adam; needs pip install "
                        "bitsandbytes); radam: RAdam (Liu et al. 2020)")
    g.add_argument("--checkpoint-every", type=positive_int, default=500)
    g.add_argument("--keep-checkpoints", type=positive_int, default=2)
    g.add_argument("--work-dir", help="checkpoints and metrics.jsonl (default: runs/<name of --out>); "
                                      "an existing run there is resumed")
    g.add_argument("--seed", type=seed, default=0)
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--overwrite", action="store_true",
                   help="write --out even if it is an existing folder that fewstep did not write: fewstep's files "
                        "are put in (replacing those of the same names), everything else there stays")
    g.add_argument("--force-resume", action="store_true",
                   help="resume the work folder's checkpoint even though settings that define the run differ")
    g.add_argument("--no-memory-check", action="store_true",
                   help="start even if the weights, gradients and optimizer state alone need more memory than is free")
    p.set_defaults(folder_outputs=("out",))              # checked before any work (fewstep.cli.check_outputs)


def add_data_args(p: argparse.ArgumentParser, stream: bool = False) -> None:
    """--crop and --flip: how training images are cut (:mod:`fewstep.models.transforms`, diffusers' scripts'
    --center_crop/--random_crop/--random_flip); with ``stream``, --stream/--no-stream for webdataset shards."""
    g = p.add_argument_group("training data (images from files: short side resized to the training size, aspect "
                             "ratio kept, then cut to a square)")
    g.add_argument("--crop", choices=["center", "random"], default="center",
                   help="center: the middle square of each image (default; diffusers' CenterCrop). random: a new "
                        "square at a random place each time an image is used (RandomCrop), seeded by --seed and the "
                        "step, so a resumed run cuts the same crops. Only images that are not square have anything "
                        "to crop (the embedded digits and emoji are square)")
    g.add_argument("--flip", action="store_true",
                   help="flip each training image left-right with probability 0.5 (RandomHorizontalFlip), seeded "
                        "likewise; off by default, since a flip changes text, digits and arrows. With --crop random "
                        "or --flip the VAE latents and prompt embeddings are computed per batch instead of once")
    if stream:
        g.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                       help="webdataset .tar shards: read them batch by batch instead of into memory (only the "
                            "shards' index and the captions are held; each batch's images are read, decoded and cut, "
                            "and their latents and prompt embeddings computed, as it is made). Default: streamed "
                            "when the decoded images would take more than 4 GiB; --no-stream: never")


def augment(args: argparse.Namespace):
    """The :class:`fewstep.models.transforms.Augment` of --crop/--flip."""
    from ..models.transforms import Augment

    return Augment(crop=getattr(args, "crop", "center"), flip=getattr(args, "flip", False))


def stream(args: argparse.Namespace) -> bool | None:
    """--stream (True), --no-stream (False) or neither (None: by size)."""
    return getattr(args, "stream", False)


def train_config(args: argparse.Namespace, optimizer: str = "adamw", betas: tuple[float, float] | None = None):
    """The run's TrainConfig, with --out and the work folder checked before any training; ``optimizer`` when
    --optimizer is not given and ``betas`` (where not None): the method's own (:class:`fewstep.methods.registry.Method`)."""
    from ..errors import FewstepError
    from ..io.atomic import allow_replacing, check_creatable, check_replaceable
    from ..training import TrainConfig

    check_training_request(args)          # fp16 without a GPU, a batch that cannot fit: before any work
    with allow_replacing(*([args.out] if args.overwrite else [])):
        check_replaceable(args.out)
    work = args.work_dir or str(Path("runs") / Path(args.out).name)
    check_creatable(work, "--work-dir")
    out, resolved_work = Path(args.out).resolve(), Path(work).resolve()
    if resolved_work == out or out in resolved_work.parents or resolved_work / "checkpoints" in (out, *out.parents):
        flag = "--work-dir" if args.work_dir else "the default work folder (runs/<name of --out>)"
        raise FewstepError(f"--out {args.out} and {flag} {work} overlap: the finished model would be written over "
                           f"the run's checkpoints; give --work-dir a folder of its own (or --out another name)")
    return TrainConfig(out_dir=work, max_steps=args.steps, force_resume=args.force_resume,
                       batch_size=args.batch, grad_accum=args.grad_accum, lr=args.lr, warmup_steps=args.warmup,
                       grad_clip=args.grad_clip, ema_decay=args.ema, mixed_precision=args.mixed_precision,
                       optimizer=args.optimizer or optimizer, **({"adam_betas": betas} if betas else {}),
                       checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
                       seed=args.seed, progress=not args.no_progress, memory_check=not args.no_memory_check)


BUILT_IN = {"digits": (1, 16), "emoji": (3, 32)}     # channels and side of the embedded data sets


def check_training_request(args: argparse.Namespace) -> None:
    """What a training command asks for, checked before any data or model is loaded: ``--mixed-precision fp16``
    needs a CUDA GPU (it is fp16 autocast with a gradient scaler; accelerate ignores it elsewhere), and one
    micro-batch of the smallest images the run can have must fit in memory (a lower bound: the batch's images and
    their noise in float32; the network's activations come on top)."""
    import torch

    from ..errors import FewstepError
    from ..io.budget import check_memory, images_bytes

    if getattr(args, "mixed_precision", "no") == "fp16" and not torch.cuda.is_available():
        raise FewstepError("--mixed-precision fp16 needs a CUDA GPU (fp16 autocast with a gradient scaler); on this "
                           "machine, which has none, accelerate would silently train in fp32: use --mixed-precision "
                           "bf16 or no")
    channels, side = 1, 8                 # the smallest a run trains on (a teacher's latents can be this small)
    if not getattr(args, "teacher", None):
        channels, side = BUILT_IN.get(getattr(args, "dataset", None) or "digits", (getattr(args, "channels", 1), 8))
    side = getattr(args, "image_size", None) or side
    micro = -(-args.batch // args.grad_accum)
    check_memory(images_bytes(micro, channels, side, copies=2),
                 f"--batch {args.batch:,}{f' / --grad-accum {args.grad_accum}' if args.grad_accum > 1 else ''}: one "
                 f"micro-batch of {micro:,} images of {channels}×{side}×{side}",
                 "lower --batch, or raise --grad-accum to split each batch into micro-batches")


def add_lora_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--lora", action="append", metavar="PATH[:WEIGHT][:lcm]",
                   help=f"text-to-image pipelines: {what} (a diffusers, peft or kohya file, or a fewstep LoRA folder or "
                        f"set) with weight λ (default 1); repeat to combine, e.g. a style LoRA and an LCM-LoRA (then "
                        f"2–8 steps). What a LoRA is comes from its folder's fewstep.json or its file's metadata; "
                        f"a file that says nothing counts as a style LoRA (with a warning): add :lcm to declare an "
                        f"LCM-LoRA (sampled with LCM's sampler on the 50-step grid), e.g. lcm-lora.safetensors:1:lcm, or :tcd a "
                        f"TCD-LoRA (sampled with TCD's γ sampler, --sampler tcd)")

    add_dtype_args(p)


def load_options(args: argparse.Namespace) -> dict[str, str | None]:
    """``dtype``, ``variant`` and ``config`` from --dtype/--variant/--config, as keyword arguments of
    :func:`fewstep.models.folders.load_model`."""
    dtype = getattr(args, "dtype", None)
    variant = getattr(args, "variant", None)
    path = next((getattr(args, a) for a in ("model", "base") if isinstance(getattr(args, a, None), str)), None)
    if (dtype or variant) and path and Path(path).is_dir() and not (Path(path) / "model_index.json").exists():
        from ..errors import FewstepError

        flag = f"--dtype {dtype}" if dtype else f"--variant {variant}"
        raise FewstepError(f"{flag} applies to pipelines (diffusers folders, single-file checkpoints); {path} is a "
                           f"pixel model folder, whose one UNet runs in float32 from its one weights file: leave "
                           f"{flag.split()[0]} out")
    return {"dtype": DTYPES[dtype] if dtype else None, "variant": variant, "config": getattr(args, "config", None)}


def add_dtype_args(p: argparse.ArgumentParser) -> None:
    """--dtype and --variant: the precision a pipeline's weights are held in and which files they come from."""
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="pipelines: hold the weights in this precision (default fp32, whatever the files hold; fp16 "
                        "VAEs that need it run in fp32, as in diffusers). bf16/fp16 halve the memory; on a CPU they "
                        "are slower")
    p.add_argument("--variant", default=None, metavar="NAME",
                   help="pipelines: load the NAME-variant weight files (diffusion_pytorch_model.NAME.safetensors, e.g. "
                        "fp16); default the plain files, or the fp16 ones where only those exist")
    p.add_argument("--config", default=None, metavar="DIR",
                   help="a single-file checkpoint (.safetensors of SD 1.x/2.x/SDXL, as A1111/ComfyUI use): the local "
                        "diffusers folder (or shipped config: sd-v1-5, sd-v2-1, sd-v2-base, sdxl-base) whose "
                        "architecture it has (default: inferred from the file's weights). A FLUX / SD3 transformer "
                        "file (flux1-dev.safetensors, sd3.5_medium.safetensors) needs one: a local FluxPipeline / "
                        "StableDiffusion3Pipeline folder, whose VAE, text encoders and scheduler it is used with")