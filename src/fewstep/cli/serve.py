"""``fewstep serve``: the real-time page (logic in :mod:`fewstep.serve`)."""

from __future__ import annotations

import argparse

from ..errors import FewstepError
from ..serve import BACKEND_CHOICES
from .args import add_lora_arg, load_options, positive_int, serve_batch, serve_queue


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="the real-time page: images as you type and as you draw, LoRA sliders",
                       description="Serve a model on a local web page: text-to-image as you type (a pixel model: a "
                                   "label picker), a sketch canvas or an uploaded image to image-to-image with a "
                                   "strength slider, a slider per LoRA (served from fused weights, re-fused in the "
                                   "background when a slider moves; answered unfused until then), "
                                   "latency and images/s shown. Concurrent requests share one network batch per "
                                   "step (stream batching); prompt embeddings are cached; each client's newest "
                                   "request wins. Models and LoRAs are chosen here, never by the page. Safe by "
                                   "default: it listens on 127.0.0.1, answers only requests addressed to a loopback "
                                   "name (127.0.0.1, localhost, [::1]: no DNS rebinding), takes WebSockets only from "
                                   "its own page's origin (so other web sites you visit cannot drive it; clients that "
                                   "send no Origin, such as scripts, are taken) and sends a strict "
                                   "Content-Security-Policy. Listening beyond loopback needs --token (or "
                                   "--insecure-open).")
    p.add_argument("--model", required=True, help="model folder (an LCM such as models/emoji-lcm, a pixel model, any "
                                                  "pipeline with an LCM-LoRA via --lora)")
    add_lora_arg(p, "plug in a LoRA with a live slider on the page (its weight the slider's start)")
    p.add_argument("--tiny-vae", metavar="DIR", help="decode with this AutoencoderTiny (fewstep train-tiny-vae), e.g. "
                                                     "models/emoji-tiny-vae")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only); any other address (0.0.0.0, a "
                        "LAN address) is refused unless --token is given (or --insecure-open)")
    p.add_argument("--token", metavar="TOKEN",
                   help="require TOKEN on every request and WebSocket: open http://HOST:PORT/?token=TOKEN once and the "
                        "page keeps it as a cookie; scripts send ?token=TOKEN or 'Authorization: Bearer TOKEN'. 8+ "
                        "characters of letters, digits and . _ ~ - (python -c 'import secrets; "
                        "print(secrets.token_urlsafe())')")
    p.add_argument("--insecure-open", action="store_true",
                   help="with a non-loopback --host and no --token: serve anyone who can reach the address (any "
                        "Host, no token; a warning is printed). Without it such a --host is refused")
    p.add_argument("--allow-origin", action="append", metavar="ORIGIN", default=[],
                   help="also take WebSockets from pages of ORIGIN (scheme://host[:port], e.g. http://localhost:3000); "
                        "repeatable. The page's own origin is always allowed; 'null' never is")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 picks a free one)")
    p.add_argument("--max-batch", type=serve_batch, default=64, help="most images in one network batch (default 64)")
    p.add_argument("--queue", type=serve_queue, default=64,
                   help="most requests in flight; beyond it a request is refused as busy (default 64)")
    p.add_argument("--threads", type=positive_int, help="torch threads (default: torch's choice)")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                   help="what runs the denoiser and decoder: a trace of each call replayed by ONNX Runtime (float32 "
                        "CPU; the fastest measured here: ~5x eager at batch 1 on a CPU), by TorchScript (any device "
                        "or dtype, ~3x), or 'eager' (diffusers' Python per call). Every trace is checked against "
                        "eager at start-up and falls back to the next (onnxruntime, torchscript, eager). Default "
                        "'auto': onnxruntime if installed, else torchscript. ONNX Runtime holds its own copy of the "
                        "weights (and one per fused slider state it binds, two at most): for a large base on a small "
                        "machine, torchscript. The unfused --no-fuse LoRA path is always eager")
    p.add_argument("--no-trace", action="store_const", const="eager", dest="backend", help="the same as --backend eager")
    p.add_argument("--no-fuse", action="store_true",
                   help="serve --lora sliders from the unfused peft adapters (each request's weights set as adapter "
                        "scales, eager) instead of fused weights θ + Σ λ·ΔW: slower, but no memory for the per-adapter "
                        "deltas and fused states (a large base on a small machine)")
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], default="warning")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    import warnings

    import torch
    from PIL import Image

    from ..models.folders import load_model
    from ..models.loras import apply_loras, parse_lora_spec
    from ..models.tiny_vae import with_tiny_vae
    from ..serve.app import bind, serve
    from ..serve.engine import Engine
    from ..serve.security import Policy, is_loopback

    if not 0 <= args.port <= 65535:
        raise FewstepError(f"--port must be in 0..65535 (0 picks a free one), got {args.port}")
    if not is_loopback(args.host) and not args.token and not args.insecure_open:
        raise FewstepError(f"--host {args.host} lets other machines reach this page: give --token TOKEN (every "
                           f"request must carry it), or --insecure-open to serve anyone who can reach it")
    Policy.for_server(args.host, args.port, args.allow_origin, args.token)    # bad --allow-origin/--token: fail now
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
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)   # uploads: refused from the header
    engine = Engine(model, max_batch=args.max_batch, queue_limit=args.queue, backend=args.backend,
                    fuse=not args.no_fuse)
    engine.warm_up()
    host, port = sock.getsockname()[:2]
    policy = Policy.for_server(args.host, port, args.allow_origin, args.token)
    address = f"http://{host if ':' not in host else f'[{host}]'}:{port}/"
    opened = f"; open {address}?token={args.token}" if args.token else ""
    print(f"fewstep serve: {args.model} on {address} (Ctrl-C stops{opened})", flush=True)
    if not is_loopback(args.host) and not args.token:
        print(f"fewstep: warning: listening on {args.host} with --insecure-open: anyone who can reach this address "
              f"can use the page and the WebSocket", flush=True)
    serve(engine, sock, policy, args.log_level)
