"""What the serving benchmark drives and compares against (``fewstep bench --only serve``):

- :func:`closed_loop`: N concurrent WebSocket clients, each sending its next request the moment the last one
  is answered (prompts cycling through the emoji captions, a new seed every request, so no result is ever
  served from a cache), timed from send to receipt: images/s and latency percentiles.
- the baseline, ``python -m fewstep.bench.serve_load --model DIR``: diffusers' ``LatentConsistencyModelPipeline``
  called once per request, one request at a time (one pipeline, as a server holds one model), behind the
  ``websockets`` library's own threaded server, answering the same messages as ``fewstep serve``. With
  ``--lora PATH:WEIGHT`` (repeatable) the base's own pipeline (``StableDiffusionPipeline``) with each LoRA loaded
  by diffusers (``load_lora_weights``), weighted by ``set_adapters`` and folded in by ``fuse_lora``, and
  ``LCMScheduler`` when one of them is an LCM-LoRA (diffusers' LCM-LoRA recipe); with ``--tiny-vae DIR``,
  ``pipe.vae = AutoencoderTiny.from_pretrained(DIR)``.

:func:`closed_loop` records the load average (``os.getloadavg()``) when each measurement ends, beside its timings:
a ratio measured side by side holds on a busy machine, an absolute figure does not.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from ..io.data_urls import png_data_urls


def closed_loop(url: str, clients: int, seconds: float, prompts: list[str], warmup: float = 2.0,
                request: dict | None = None) -> dict:
    """Run ``clients`` closed-loop clients against the WebSocket at ``url`` for ``warmup`` + ``seconds``;
    throughput and latency are of the requests answered after the warm-up."""
    from websockets.sync.client import connect

    start = time.perf_counter()
    begin, end = start + warmup, start + warmup + seconds
    done: list[tuple[float, float, int]] = []      # (answered at, latency s, images)
    errors: list[str] = []

    def client(k: int) -> None:
        with connect(url, max_size=None, open_timeout=60) as ws:
            seed = 0
            while time.perf_counter() < end:
                seed += 1
                msg = {"type": "generate", "id": seed, "prompt": prompts[(k * 7919 + seed) % len(prompts)],
                       "seed": k * 1_000_000 + seed, **(request or {})}
                sent = time.perf_counter()
                ws.send(json.dumps(msg))
                while (reply := json.loads(ws.recv(timeout=120))).get("id") != seed:
                    pass
                now = time.perf_counter()
                if reply.get("type") != "result":
                    errors.append(reply.get("error", "?"))
                elif begin <= sent and now <= end:
                    done.append((now, now - sent, len(reply["images"])))
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    latencies = sorted(1e3 * lat for _, lat, _ in done)
    q = statistics.quantiles(latencies, n=20, method="inclusive") if len(latencies) > 1 else latencies * 19
    return {"clients": clients, "seconds": seconds, "requests": len(done), "errors": len(errors),
            "images_per_second": sum(n for *_, n in done) / seconds, "p50_ms": q[9] if q else None,
            "p95_ms": q[18] if q else None, "load": list(os.getloadavg())}


@contextmanager
def server_process(argv: list[str], pattern: str = r"on (http://\S+/)", timeout: float = 300.0):
    """A server started as ``argv``, yielding its WebSocket URL once it prints one; stopped after."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    found: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if not found and (m := re.search(pattern, line)):
                found.append(m.group(1))
                ready.set()
    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(timeout):
        proc.kill()
        raise RuntimeError(f"{argv[:4]} did not start:\n" + "".join(lines[-20:]))
    try:
        yield found[0].replace("http://", "ws://", 1) + "ws"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def baseline_main(argv: list[str] | None = None) -> None:
    """The baseline server (module docstring)."""
    p = argparse.ArgumentParser(description="diffusers' LatentConsistencyModelPipeline (or, with --lora, the base's "
                                            "pipeline with the LoRAs fused), called once per request")
    p.add_argument("--model", required=True)
    p.add_argument("--lora", action="append", default=[], metavar="PATH:WEIGHT",
                   help="a LoRA folder and its weight, fused by diffusers (repeatable)")
    p.add_argument("--tiny-vae", metavar="DIR", help="decode with this AutoencoderTiny")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    import torch
    from diffusers import AutoencoderTiny, LatentConsistencyModelPipeline
    from websockets.sync.server import serve

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.lora:
        pipe = diffusers_with_loras(Path(args.model), [spec.rsplit(":", 1) for spec in args.lora])
    else:
        pipe = LatentConsistencyModelPipeline.from_pretrained(Path(args.model), safety_checker=None,
                                                              requires_safety_checker=False)
    if args.tiny_vae:
        pipe.vae = AutoencoderTiny.from_pretrained(Path(args.tiny_vae))
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    lock = threading.Lock()                           # one model, one request at a time

    def handler(ws) -> None:
        for text in ws:
            msg = json.loads(text)
            started = time.perf_counter()
            with lock, torch.no_grad():
                images = pipe(msg.get("prompt", ""), num_inference_steps=msg.get("steps", 4), height=size, width=size,
                              guidance_scale=msg.get("guidance_scale", 3.0), output_type="pt",
                              num_images_per_prompt=msg.get("num", 1),
                              generator=torch.Generator().manual_seed(msg.get("seed", 0))).images
            ws.send(json.dumps({"type": "result", "id": msg.get("id"), "images": png_data_urls(images * 2 - 1),
                                "latency_ms": 1e3 * (time.perf_counter() - started)}))

    with serve(handler, "127.0.0.1", args.port, max_size=None) as server:
        print(f"baseline on http://127.0.0.1:{server.socket.getsockname()[1]}/", flush=True)
        server.serve_forever()


def diffusers_with_loras(model: Path, loras: list[list[str]]):
    """``model``'s own diffusers pipeline with ``loras`` ([path, weight] pairs) as diffusers' docs combine them:
    ``load_lora_weights`` each, ``set_adapters`` with the weights, ``fuse_lora``, ``unload_lora_weights``; an
    LCM-LoRA among them (its fewstep.json says so) switches the scheduler to ``LCMScheduler`` on its grid."""
    from diffusers import DiffusionPipeline, LCMScheduler

    pipe = DiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    names = [f"lora{i}" for i in range(len(loras))]
    for name, (path, _) in zip(names, loras):
        pipe.load_lora_weights(path, adapter_name=name)
    pipe.set_adapters(names, adapter_weights=[float(w) for _, w in loras])
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()
    for path, _ in loras:
        info = Path(path) / "fewstep.json"
        kind = json.loads(info.read_text()) if info.is_file() else {}
        if kind.get("kind") == "lcm-lora":
            pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps=int(
                kind.get("original_inference_steps", 50)))
    return pipe


if __name__ == "__main__":
    baseline_main(sys.argv[1:])
