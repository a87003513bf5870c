"""``fewstep serve``: the real-time page (logic in :mod:`fewstep.serve`)."""

from __future__ import annotations

import argparse
import ipaddress

from ..errors import FewstepError
from .args import add_lora_arg, load_options, positive_int


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="the real-time page: images as you type and as you draw, LoRA sliders",
                       description="Serve a model on a local web page: text-to-image as you type (a pixel model: a "
                                   "label picker), a sketch canvas or an uploaded image to image-to-image with a "
                                   "strength slider, a slider per LoRA (applied as adapter weights, never re-fused), "
                                   "latency and images/s shown. Concurrent requests share one network batch per "
                                   "step (stream batching); prompt embeddings are cached; each client's newest "
                                   "request wins. Models and LoRAs are chosen here, never by the page.")
    p.add_argument("--model", required=True, help="model folder (an LCM such as models/emoji-lcm, a pixel model, any "
                                                  "pipeline with an LCM-LoRA via --lora)")
    add_lora_arg(p, "plug in a LoRA, kept unfused with a live slider on the page")
    p.add_argument("--tiny-vae", metavar="DIR", help="decode with this AutoencoderTiny (fewstep train-tiny-vae), e.g. "
                                                     "models/emoji-tiny-vae")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 picks a free one)")
    p.add_argument("--max-batch", type=positive_int, default=64, help="most images in one network batch (default 64)")
    p.add_argument("--queue", type=positive_int, default=64,
                   help="most requests in flight; beyond it a request is refused as busy (default 64)")
    p.add_argument("--threads", type=positive_int, help="torch threads (default: torch's choice)")
    p.add_argument("--no-trace", action="store_true",
                   help="run the denoiser and decoder eagerly instead of as TorchScript traces (traced, each checked "
                        "against eager at start-up, they skip diffusers' Python per call: ~2x faster at batch 1 on "
                        "a CPU; never traced under --lora sliders)")
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], default="warning")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    import warnings

    import torch

    from ..models.folders import load_model
    from ..models.loras import apply_loras, parse_lora_spec
    from ..models.tiny_vae import with_tiny_vae
    from ..serve.app import bind, serve
    from ..serve.engine import Engine

    if not 0 <= args.port <= 65535:
        raise FewstepError(f"--port must be in 0..65535 (0 picks a free one), got {args.port}")
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = [parse_lora_spec(s) for s in args.lora or []]
    sock = bind(args.host, args.port)          # a port in use fails before minutes of loading
    try:
        model = load_model(args.model, **load_options(args))
        if specs and model.config.serves_steps:
            raise FewstepError(f"{args.model} is a progressive folder (one student per step count); --lora applies to "
                               f"a single pipeline")
        model = with_tiny_vae(apply_loras(model, specs, fuse=False) if specs else model, args.tiny_vae)
    except BaseException:
        sock.close()
        raise
    warnings.filterwarnings("ignore", message=".*longer than the tokenizer.*")   # not one log line per long prompt typed
    engine = Engine(model, max_batch=args.max_batch, queue_limit=args.queue, trace=not args.no_trace)
    engine.warm_up()
    host, port = sock.getsockname()[:2]
    print(f"fewstep serve: {args.model} on http://{host if ':' not in host else f'[{host}]'}:{port}/ (Ctrl-C stops)",
          flush=True)
    if not _loopback(args.host):
        print(f"fewstep: warning: listening on {args.host}: other machines can reach this page", flush=True)
    serve(engine, sock, args.log_level)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
