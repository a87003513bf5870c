"""The real-time section of ``fewstep bench`` (``fewstep serve``; StreamDiffusion's levers, Kodaira et al. 2023:
stream batching, caching what does not change, a tiny decoder), measured side by side in one run:

- **serving**: ``fewstep serve`` on ``emoji-lcm`` (with its own VAE, with ``--tiny-vae``, and with ``--no-trace``
  to show what the traces buy) against diffusers' ``LatentConsistencyModelPipeline`` called once per request on
  the same folder (:mod:`fewstep.bench.serve_load`), each a separate process on the same number of torch threads, all four
  up at once and measured in turn at 1, 4 and 16 closed-loop WebSocket clients, twice (rounds interleaved, the
  mean reported): images/s and p50/p95 latency from send to receipt. Targets: ≥ 5× diffusers' throughput at
  16 clients; p95 ≤ 50 ms for one client.
- **the tiny decoder** (``emoji-tiny-vae``, TAESD-style): the LCM's 4-step FID with it against with the VAE
  (the bench's sample count and seed), decoder time, and end to end (text encoder, sampling, decoding) at
  the timing batch against the teacher's 25 DPM-Solver++ steps with CFG. Target: ≥ 10× the teacher end to
  end at a FID within noise (the spread of the difference) of the LCM's.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import ExitStack
from pathlib import Path

import torch

from ..eval.evaluate import ruler_for
from ..models.data import load_captioned
from ..models.folders import load_model
from ..models.tiny_vae import with_tiny_vae
from .format import acc, fid, verdict
from .measure import quality_rows, sample_run, side_by_side
from .serve_load import closed_loop, server_process

TEACHER, LCM, TINY = "emoji-sd", "emoji-lcm", "emoji-tiny-vae"
CLIENTS = (1, 4, 16)
BASELINE = "diffusers LatentConsistencyModelPipeline, per request"
EAGER, OURS, OURS_TINY = "fewstep serve --no-trace", "fewstep serve", "fewstep serve --tiny-vae"
SERVERS = (BASELINE, EAGER, OURS, OURS_TINY)


def measure(models_dir: Path, settings, command: str = "", teacher_rows: dict | None = None) -> dict:
    """The section's numbers (empty when the emoji models are not there)."""
    if not all((models_dir / name).is_dir() for name in (TEACHER, LCM, TINY)):
        return {}
    threads = max(1, (os.cpu_count() or 2) // 2)
    out = {"command": command, "threads": threads, "guidance_scale": 3.0, "steps": 4,
           "serving": serving(models_dir, threads, 4.0 if settings.quick else 10.0, 1 if settings.quick else 2),
           "tiny_vae": json.loads((models_dir / TINY / "fewstep.json").read_text())}
    out.update(end_to_end(models_dir, settings, teacher_rows or {}))
    return out


def serving(models_dir: Path, threads: int, seconds: float, rounds: int) -> list[dict]:
    """Images/s and latency of each server at each client count (module docstring)."""
    python = [sys.executable, "-m"]
    lcm = str(models_dir / LCM)
    ours = python + ["fewstep", "serve", "--model", lcm, "--port", "0", "--threads", str(threads)]
    argvs = {BASELINE: python + ["fewstep.bench.serve_load", "--model", lcm, "--threads", str(threads)],
             EAGER: ours + ["--no-trace"], OURS: ours, OURS_TINY: ours + ["--tiny-vae", str(models_dir / TINY)]}
    prompts = load_captioned("emoji", 32).captions
    request = {"steps": 4, "guidance_scale": 3.0, "num": 1}
    found: dict[tuple[str, int], list[dict]] = {}
    with ExitStack() as stack:
        urls = {name: stack.enter_context(server_process(argv)) for name, argv in argvs.items()}
        for name, url in urls.items():              # warm each: first calls allocate and load lazily
            closed_loop(url, 1, 1.0, prompts, warmup=1.0, request=request)
        for _ in range(rounds):
            for n in CLIENTS:
                for name, url in urls.items():
                    row = closed_loop(url, n, seconds, prompts, request=request)
                    found.setdefault((name, n), []).append(row)
                    print(f"{name:<55} {n:>2} clients  {row['images_per_second']:7.1f} images/s  p50 "
                          f"{row['p50_ms']:7.1f} ms  p95 {row['p95_ms']:7.1f} ms", flush=True)
    rows = []
    for (name, n), runs in found.items():
        mean = {k: sum(r[k] for r in runs) / len(runs) for k in ("images_per_second", "p50_ms", "p95_ms")}
        rows.append({"server": name, "clients": n, **mean, "requests": sum(r["requests"] for r in runs),
                     "errors": sum(r["errors"] for r in runs), "rounds": [r["images_per_second"] for r in runs]})
    return rows


@torch.no_grad()
def end_to_end(models_dir: Path, settings, teacher_rows: dict) -> dict:
    """The tiny decoder's FID cost and the end-to-end speedups it buys (module docstring)."""
    teacher, lcm = load_model(models_dir / TEACHER), load_model(models_dir / LCM)
    tiny = with_tiny_vae(lcm, models_dir / TINY)
    ruler = ruler_for(lcm, models_dir)
    s, num, seed = 3.0, settings.num, settings.seed
    quality = {"vae": quality_rows(lcm, ruler, [4], "consistency", s, num, seed)[0],
               "tiny": quality_rows(tiny, ruler, [4], "consistency", s, num, seed, name="emoji-lcm + tiny VAE")[0]}
    reused = [r for r in teacher_rows.get("dpmpp-2m", []) if r["steps"] == 25 and teacher_rows.get("num") == num]
    quality["teacher"] = reused[0] if reused else quality_rows(teacher, ruler, [25], "dpmpp-2m", s, num, seed)[0]
    batch, repeats = settings.timing_batch, settings.timing_repeats
    t_teacher, t_vae, t_tiny = side_by_side([sample_run(teacher, 25, "dpmpp-2m", s, batch),
                                             sample_run(lcm, 4, "consistency", s, batch),
                                             sample_run(tiny, 4, "consistency", s, batch)], batch, repeats)
    z = torch.randn(batch, *lcm.shape)
    d_vae, d_tiny = side_by_side([lambda: lcm.codec.decode(z), lambda: tiny.codec.decode(z)], batch, repeats)
    params = {"vae": sum(p.numel() for p in lcm.parts["vae"].decoder.parameters()),
              "tiny": sum(p.numel() for p in tiny.parts["tiny_vae"].decoder.parameters())}
    speed = {"batch": batch, "teacher_seconds": t_teacher, "vae_seconds": t_vae, "tiny_seconds": t_tiny,
             "decode_vae_seconds": d_vae, "decode_tiny_seconds": d_tiny, "decoder_parameters": params}
    print(f"end to end at batch {batch}: teacher 25 CFG steps {1e3 * t_teacher:.2f} ms/img, LCM 4 steps "
          f"{1e3 * t_vae:.2f} ({t_teacher / t_vae:.1f}x), with the tiny VAE {1e3 * t_tiny:.2f} ({t_teacher / t_tiny:.1f}x)",
          flush=True)
    return {"quality": quality, "speed": speed, "num": num}


def section(report) -> list[str]:
    """The BENCHMARKS.md section."""
    g = getattr(report, "serve", None) or {}
    if not g:
        return []
    rows = {(r["server"], r["clients"]): r for r in g["serving"]}
    base = {n: rows[(BASELINE, n)]["images_per_second"] for n in CLIENTS if (BASELINE, n) in rows}
    lines = ["", "## Real time: `fewstep serve` (stream batching, caches, a tiny decoder)", "",
             f"Written by `{g['command']}`. `{LCM}` at {g['steps']} steps, s = {g['guidance_scale']:g}, one image per "
             f"request, prompts cycling through the emoji captions and a new seed every request (so no answer comes "
             f"from the result cache; prompt embeddings are cached after their first use). Each server is its own "
             f"process on {g['threads']} torch thread(s); all {len({r['server'] for r in g['serving']})} were up at once and measured in turn, each client "
             f"count twice (interleaved rounds, mean shown); latency is from the client's send to its receipt of the "
             f"PNG over the WebSocket. `fewstep serve` runs its denoiser and decoder as checked TorchScript traces "
             f"(`--no-trace`: eagerly, as diffusers does).", "",
             "| server | clients | images/s | p50 ms | p95 ms | throughput × diffusers |", "|---|---:|---:|---:|---:|---:|"]
    for name in SERVERS:
        for n in CLIENTS:
            r = rows.get((name, n))
            if r:
                ratio = r["images_per_second"] / base[n] if base.get(n) else float("nan")
                lines.append(f"| {name} | {n} | {r['images_per_second']:.1f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | "
                             f"{ratio:.1f}× |")
    lines += _targets(rows, base) + _tiny_section(g)
    return lines


def _targets(rows: dict, base: dict) -> list[str]:
    out = []
    for name in (OURS, OURS_TINY):
        r16, r1 = rows.get((name, 16)), rows.get((name, 1))
        if r16 and base.get(16):
            x = r16["images_per_second"] / base[16]
            out.append(f"`{name}`: {x:.1f}× diffusers' throughput at 16 clients (target ≥ 5×: "
                       f"{'met' if x >= 5 else 'missed'}); p95 for one client {r1['p95_ms']:.1f} ms (target ≤ 50 ms: "
                       f"{'met' if r1['p95_ms'] <= 50 else 'missed'}).")
    return [""] + [" ".join(out)] if out else []


def _tiny_section(g: dict) -> list[str]:
    q, sp, info = g["quality"], g["speed"], g["tiny_vae"]
    t = info.get("training", {})
    params = sp["decoder_parameters"]
    speedup_tiny, speedup_vae = sp["teacher_seconds"] / sp["tiny_seconds"], sp["teacher_seconds"] / sp["vae_seconds"]
    same = verdict(q["tiny"], q["vae"]) == "within the spread"
    lines = ["", f"### The tiny decoder `{TINY}` (TAESD-style `AutoencoderTiny`)", "",
             f"Distilled against `{TEACHER}`'s VAE by `{t.get('command', '')}` ({t.get('wall_seconds', 0) / 60:.0f} min on "
             f"{t.get('threads', '?')} thread(s)): the decoder on latents drawn from the VAE's posterior of each emoji, "
             f"the encoder on the posterior means. FID at 4 steps on the bench's ruler ({g['num']} "
             f"samples, seed as every section); times per image at batch {sp['batch']}, measured side by side in this "
             f"process, end to end = text encoder + sampling + decoder.", "",
             "| | decoder parameters | decode ms / image | LCM 4-step FID | accuracy | end to end ms / image | "
             "× the teacher's 25 CFG steps |", "|---|---:|---:|---|---|---:|---:|",
             f"| `{TEACHER}`'s AutoencoderKL | {params['vae'] / 1e3:.0f}k | {1e3 * sp['decode_vae_seconds']:.3f} | "
             f"{fid(q['vae'])} | {acc(q['vae'])} | {1e3 * sp['vae_seconds']:.2f} | {speedup_vae:.1f}× |",
             f"| `{TINY}` | {params['tiny'] / 1e3:.0f}k | {1e3 * sp['decode_tiny_seconds']:.3f} | {fid(q['tiny'])} | "
             f"{acc(q['tiny'])} | {1e3 * sp['tiny_seconds']:.2f} | {speedup_tiny:.1f}× |",
             f"| teacher `{TEACHER}`, DPM-Solver++ 25 steps, CFG | {params['vae'] / 1e3:.0f}k | | {fid(q['teacher'])} | "
             f"{acc(q['teacher'])} | {1e3 * sp['teacher_seconds']:.2f} | 1.0× |", "",
             f"End to end with the tiny decoder: {speedup_tiny:.2f}× the teacher's 25 CFG steps (target ≥ 10×: "
             f"{'met' if speedup_tiny >= 10 else 'missed'}); its FID against the LCM's with the VAE: "
             f"{verdict(q['tiny'], q['vae'])} (target: within the spread, {'met' if same else 'missed'})."]
    return lines
