"""The real-time section of ``fewstep bench`` (``fewstep serve``; StreamDiffusion's levers, Kodaira et al. 2023:
stream batching, caching what does not change, a tiny decoder), measured side by side in one run:

- **serving**: ``fewstep serve`` on ``emoji-lcm`` on each backend (ONNX Runtime, the default; ``--backend
  torchscript``; ``--backend eager``) and with ``--tiny-vae``, against diffusers' ``LatentConsistencyModelPipeline``
  called once per request on the same folder (:mod:`fewstep.bench.serve_load`), each a separate process on the same
  number of torch threads, all up at once and measured in turn at 1, 4 and 16 closed-loop WebSocket clients, twice
  (rounds interleaved, the mean reported): images/s and p50/p95 latency from send to receipt. Targets: ≥ 5×
  diffusers' throughput at 16 clients; p95 ≤ 25 ms for one client (issue 29).
- **LoRA sliders** (the set ``./run serve`` starts: ``emoji-sd`` + ``emoji-lcm-lora`` 1.0 + ``emoji-style-lora`` 0.0 as
  sliders, the tiny decoder; 4 steps, guidance 1, the page's defaults): ``fewstep serve`` as before fused sliders
  (``--no-fuse --backend eager``: the unfused peft adapters), fused on each backend, against diffusers'
  ``StableDiffusionPipeline`` with the same LoRAs fused (``set_adapters`` + ``fuse_lora``), ``LCMScheduler`` and
  ``AutoencoderTiny`` (:func:`fewstep.bench.serve_load.diffusers_with_loras`), measured the same way. Targets
  (issue 29): ≥ 2× diffusers' images/s at 1 client, ≥ 10× at 16.
  ``fewstep bench --only serve-sliders`` measures this part alone into the ``--reuse`` report.
- **backends** (:mod:`fewstep.bench.serve_backends`, ``fewstep bench --only serve-backends``): the served networks'
  calls alone, in this process, on every backend side by side.

Every measurement records the load average when it ends (and the section the load before any server started):
the servers are measured in turn, so their ratios hold on a busy machine; absolute figures need an idle one.
- **the tiny decoder** (``emoji-tiny-vae``, TAESD-style): the LCM's 4-step FID with it against with the VAE
  (the bench's sample count and seed), decoder time, and end to end (text encoder, sampling, decoding) at
  the timing batch against the teacher's 25 DPM-Solver++ steps with CFG. Target: ≥ 10× the teacher end to
  end at a FID within noise (the spread of the difference) of the LCM's.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from contextlib import ExitStack
from pathlib import Path

import torch

from ..eval.evaluate import dataset_ruler_name, ruler_for
from ..models.data import load_captioned
from ..models.folders import load_model
from ..models.tiny_vae import with_tiny_vae
from ..serve.engine import compiled
from . import serve_backends
from .format import acc, fid, verdict
from .measure import cpu, quality_rows, sample_run, side_by_side
from .serve_load import closed_loop, server_process

TEACHER, LCM, TINY = "emoji-sd", "emoji-lcm", "emoji-tiny-vae"
LCM_LORA, STYLE_LORA = "emoji-lcm-lora", "emoji-style-lora"
CLIENTS = (1, 4, 16)
BASELINE = "diffusers LatentConsistencyModelPipeline, per request"
EAGER, SCRIPTED = "fewstep serve --backend eager", "fewstep serve --backend torchscript"
OURS, OURS_TINY = "fewstep serve (ONNX Runtime)", "fewstep serve --tiny-vae (ONNX Runtime)"
SERVERS = (BASELINE, EAGER, SCRIPTED, OURS, OURS_TINY)
REQUEST = {"steps": 4, "guidance_scale": 3.0, "num": 1}
# the LoRA sliders' part: ./run serve's default set
SLIDER_WEIGHTS = (1.0, 0.0)
SLIDER_BASELINE = "diffusers StableDiffusionPipeline, LoRAs fused, LCMScheduler, AutoencoderTiny, per request"
UNFUSED = "fewstep serve --no-fuse --backend eager (sliders unfused, as before)"
FUSED_EAGER, FUSED_SCRIPTED = "fewstep serve --backend eager (sliders fused)", "fewstep serve --backend torchscript (sliders fused)"
FUSED = "fewstep serve (sliders fused, ONNX Runtime)"
SLIDER_SERVERS = (SLIDER_BASELINE, UNFUSED, FUSED_EAGER, FUSED_SCRIPTED, FUSED)
SLIDER_REQUEST = {"steps": 4, "guidance_scale": 1.0, "num": 1, "loras": list(SLIDER_WEIGHTS)}


def measure(models_dir: Path, settings, command: str = "", teacher_rows: dict | None = None) -> dict:
    """The section's numbers (empty when the emoji models are not there)."""
    if not all((models_dir / name).is_dir() for name in (TEACHER, LCM, TINY)):
        return {}
    threads = _threads()
    out = {"command": command, "features": dataset_ruler_name(models_dir, "emoji"), "threads": threads,
           "guidance_scale": 3.0, "steps": 4,
           "tiny_vae": json.loads((models_dir / TINY / "fewstep.json").read_text())}
    sliders = all((models_dir / name).is_dir() for name in (LCM_LORA, STYLE_LORA))
    out.update(serving(models_dir, threads, *_duration(settings), ("serving",) + (("sliders",) if sliders else ()),
                       command))
    out["backends"] = serve_backends.measure(models_dir, threads, command=command)
    out.update(end_to_end(models_dir, settings, teacher_rows or {}))
    return out


def measure_sliders(models_dir: Path, settings, command: str, previous: dict) -> dict:
    """``fewstep bench --only serve-sliders``: the LoRA sliders' servers alone, merged into the ``previous``
    section (the rest of it kept as it was measured)."""
    if not all((models_dir / name).is_dir() for name in (TEACHER, TINY, LCM_LORA, STYLE_LORA)):
        return previous
    threads = _threads()
    return {**previous, **serving(models_dir, threads, *_duration(settings), parts=("sliders",), command=command)}


def measure_backends(models_dir: Path, command: str, previous: dict) -> dict:
    """``fewstep bench --only serve-backends``: the backends' side-by-side calls alone, into the ``previous`` section."""
    threads = _threads()
    return {**previous, "backends": serve_backends.measure(models_dir, threads, command=command) or previous.get("backends")}


def _threads() -> int:
    """Torch threads per server (and for the backends' calls): half the CPUs, so clients and servers share them."""
    return max(1, (os.cpu_count() or 2) // 2)


def _duration(settings) -> tuple[float, int]:
    """Seconds per measurement and rounds."""
    return (4.0, 1) if settings.quick else (10.0, 2)


def server_argvs(models_dir: Path, threads: int) -> dict[str, tuple[dict, dict[str, list[str]]]]:
    """Each part's request and servers' command lines: ``emoji-lcm``'s, and the LoRA sliders' (module docstring)."""
    python = [sys.executable, "-m"]
    lcm, tiny = str(models_dir / LCM), str(models_dir / TINY)
    baseline = python + ["fewstep.bench.serve_load", "--threads", str(threads)]
    ours = python + ["fewstep", "serve", "--port", "0", "--threads", str(threads)]
    default_set = ["--model", str(models_dir / TEACHER), "--tiny-vae", tiny,
                   *(a for name, w in zip((LCM_LORA, STYLE_LORA), SLIDER_WEIGHTS)
                     for a in ("--lora", f"{models_dir / name}:{w}"))]
    lcm_servers = {BASELINE: baseline + ["--model", lcm], EAGER: ours + ["--model", lcm, "--backend", "eager"],
                   SCRIPTED: ours + ["--model", lcm, "--backend", "torchscript"], OURS: ours + ["--model", lcm],
                   OURS_TINY: ours + ["--model", lcm, "--tiny-vae", tiny]}
    slider_servers = {SLIDER_BASELINE: baseline + default_set,
                      UNFUSED: ours + default_set + ["--no-fuse", "--backend", "eager"],
                      FUSED_EAGER: ours + default_set + ["--backend", "eager"],
                      FUSED_SCRIPTED: ours + default_set + ["--backend", "torchscript"], FUSED: ours + default_set}
    return {"serving": (REQUEST, lcm_servers), "sliders": (SLIDER_REQUEST, slider_servers)}


def serving(models_dir: Path, threads: int, seconds: float, rounds: int, parts=("serving", "sliders"),
            command: str = "") -> dict:
    """Images/s and latency of each server of ``parts`` at each client count, all up at once and measured in turn
    (module docstring): {part: rows, part + "_load": the load average before any server started, ...}."""
    prompts = load_captioned("emoji", 32).captions
    plan = {part: spec for part, spec in server_argvs(models_dir, threads).items() if part in parts}
    before = list(os.getloadavg())
    found: dict[tuple[str, str, int], list[dict]] = {}
    with ExitStack() as stack:
        urls = {(part, name): stack.enter_context(server_process(argv))
                for part, (_, servers) in plan.items() for name, argv in servers.items()}
        for (part, _), url in urls.items():         # warm each: first calls allocate and load lazily
            closed_loop(url, 1, 1.0, prompts, warmup=1.0, request=plan[part][0])
        for _ in range(rounds):
            for n in CLIENTS:
                for (part, name), url in urls.items():
                    row = closed_loop(url, n, seconds, prompts, request=plan[part][0])
                    found.setdefault((part, name, n), []).append(row)
                    print(f"{name:<70} {n:>2} clients  {row['images_per_second']:7.1f} images/s  p50 "
                          f"{row['p50_ms']:7.1f} ms  p95 {row['p95_ms']:7.1f} ms  load {row['load'][0]:.2f}", flush=True)
    out: dict = {}
    for part in plan:
        out[part], out[f"{part}_load"], out[f"{part}_command"] = [], {"before": before, "cpus": os.cpu_count(),
                                                                    "machine": cpu()}, command
        for (p, name, n), runs in found.items():
            if p == part:
                mean = {k: sum(r[k] for r in runs) / len(runs) for k in ("images_per_second", "p50_ms", "p95_ms")}
                out[part].append({"server": name, "clients": n, **mean, "requests": sum(r["requests"] for r in runs),
                                  "errors": sum(r["errors"] for r in runs),
                                  "rounds": [r["images_per_second"] for r in runs], "load": [r["load"] for r in runs]})
    return out


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
    t_teacher, t_vae, t_tiny, t_teacher_ort, t_tiny_ort = side_by_side(
        [sample_run(teacher, 25, "dpmpp-2m", s, batch), sample_run(lcm, 4, "consistency", s, batch),
         sample_run(tiny, 4, "consistency", s, batch),     # and both with their networks as fewstep serve runs them:
         sample_run(compiled(teacher, "onnxruntime"), 25, "dpmpp-2m", s, batch),
         sample_run(compiled(tiny, "onnxruntime"), 4, "consistency", s, batch)], batch, repeats)
    z = torch.randn(batch, *lcm.shape)
    d_vae, d_tiny = side_by_side([lambda: lcm.codec.decode(z), lambda: tiny.codec.decode(z)], batch, repeats)
    params = {"vae": sum(p.numel() for p in lcm.parts["vae"].decoder.parameters()),
              "tiny": sum(p.numel() for p in tiny.parts["tiny_vae"].decoder.parameters())}
    speed = {"batch": batch, "teacher_seconds": t_teacher, "vae_seconds": t_vae, "tiny_seconds": t_tiny,
             "teacher_onnxruntime_seconds": t_teacher_ort, "tiny_onnxruntime_seconds": t_tiny_ort,
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
             f"PNG over the WebSocket. `fewstep serve` runs its denoiser and decoder as checked traces replayed by "
             f"ONNX Runtime (its default backend; `--backend torchscript`: by TorchScript; `--backend eager`: eagerly, "
             f"as diffusers does). {_load_note(g.get('serving_load'), g['serving'])}", "",
             "| server | clients | images/s | p50 ms | p95 ms | throughput × diffusers |", "|---|---:|---:|---:|---:|---:|"]
    for name in SERVERS:
        for n in CLIENTS:
            r = rows.get((name, n))
            if r:
                ratio = r["images_per_second"] / base[n] if base.get(n) else float("nan")
                lines.append(f"| {name} | {n} | {r['images_per_second']:.1f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | "
                             f"{ratio:.1f}× |")
    lines += _targets(rows, base) + _sliders_section(g) + serve_backends.section(g.get("backends") or {}) + _tiny_section(g)
    return lines


def _load(x: list[float]) -> str:
    return f"{x[0]:.2f}"


def _load_note(load: dict | None, rows: list[dict]) -> str:
    """The load average before the servers started and while they were measured (the servers count in it)."""
    during = [lo[0] for r in rows for lo in r.get("load", [])]
    if not load or not during:
        return ""
    before = load["before"]
    return (f"Load average (1 min) before any server started {before[0]:.2f} / {before[1]:.2f} (1 / 5 min) on "
            f"{_where(load)}, {min(during):.2f}–{max(during):.2f} as the measurements ended.")


def _where(load: dict) -> str:
    return load.get("machine") or f"{load['cpus']} CPU(s)"


def _sliders_section(g: dict) -> list[str]:
    """The LoRA sliders' table (module docstring), when measured."""
    if not g.get("sliders"):
        return []
    rows = {(r["server"], r["clients"]): r for r in g["sliders"]}
    load = g["sliders_load"]["before"]
    loads = [lo[0] for r in g["sliders"] for lo in r.get("load", [])]
    idle = load[0] < 0.5 and load[1] < 0.5
    lines = ["", "### LoRA sliders: the set `./run serve` starts", "",
             f"Written by `{g.get('sliders_command') or g['command']}`. `{TEACHER}` with `{LCM_LORA}` × "
             f"{SLIDER_WEIGHTS[0]:g} and `{STYLE_LORA}` × {SLIDER_WEIGHTS[1]:g} as sliders, decoded by `{TINY}`, at "
             f"{SLIDER_REQUEST['steps']} steps and guidance {SLIDER_REQUEST['guidance_scale']:g} (the page's defaults), "
             f"measured as above: each server its own process on {g['threads']} torch thread(s), all up at once and "
             f"measured in turn, each client count {len(g['sliders'][0]['rounds'])} time(s) (interleaved rounds, mean "
             f"shown). `--no-fuse --backend eager` is how the sliders were served before fused weights (the peft adapters "
             f"unfused, their scales set per batch, nothing traced). Load average (1 min) when each measurement "
             f"ended in the last column (the servers under test count in it); before any server started: "
             f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min) on {_where(g['sliders_load'])}.", "",
             "| server | clients | images/s | p50 ms | p95 ms | × diffusers | × unfused | load |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in SLIDER_SERVERS:
        for n in CLIENTS:
            r = rows.get((name, n))
            if r:
                base, before = rows.get((SLIDER_BASELINE, n)), rows.get((UNFUSED, n))
                x = r["images_per_second"] / base["images_per_second"] if base else float("nan")
                y = r["images_per_second"] / before["images_per_second"] if before else float("nan")
                lines.append(f"| {name} | {n} | {r['images_per_second']:.1f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | "
                             f"{x:.2f}× | {y:.2f}× | {' / '.join(_load(lo) for lo in r.get('load', []))} |")
    r1, r16 = rows.get((FUSED, 1)), rows.get((FUSED, 16))
    b1, b16 = rows.get((SLIDER_BASELINE, 1)), rows.get((SLIDER_BASELINE, 16))
    if r1 and r16 and b1 and b16:
        x1, x16 = r1["images_per_second"] / b1["images_per_second"], r16["images_per_second"] / b16["images_per_second"]
        quiet = "an idle machine" if idle else "a machine that was not idle"
        verdict = (f"(target ≥ 2×: {'met' if x1 >= 2 else 'missed'}) and {x16:.1f}× at 16 (target ≥ 10×: "
                   f"{'met' if x16 >= 10 else 'missed'}), ratios of servers measured side by side in one run on {quiet} "
                   f"(load {load[0]:.2f} / {load[1]:.2f} before the servers started, {min(loads):.2f}–{max(loads):.2f} "
                   f"during; the absolute images/s need an idle machine, the ratios less so)")
        lines += ["", f"`{FUSED}`: {x1:.2f}× diffusers' images/s at 1 client {verdict}.{_ceiling(g, b16)}"]
    return lines


def _ceiling(g: dict, baseline16: dict) -> str:
    """What the served networks' own time allows at 16 clients: every step one full batch of 16 on ONNX Runtime
    (the backends table), no other cost."""
    rows = {(r["backend"], r["network"], r["batch"]): r["ms"] for r in (g.get("backends") or {}).get("rows", [])}
    den, dec = rows.get(("onnxruntime", "denoiser", 16)), rows.get(("onnxruntime", "decoder", 16))
    if not den or not dec:
        return ""
    per_image = (SLIDER_REQUEST["steps"] * statistics.median(den) + statistics.median(dec)) / 16
    ceiling = 1e3 / per_image
    return (f" The networks alone bound it: {SLIDER_REQUEST['steps']} denoiser calls and one decoder call per batch of "
            f"16 on ONNX Runtime (the backends table below) take {per_image:.2f} ms per image, at most "
            f"{ceiling:.0f} images/s = {ceiling / baseline16['images_per_second']:.1f}× diffusers' here, with every "
            f"batch full and nothing else costing time (the PNGs, the WebSocket, the 16 clients themselves on the "
            f"same CPUs).")


def _targets(rows: dict, base: dict) -> list[str]:
    out = []
    for name in (OURS, OURS_TINY):
        r16, r1 = rows.get((name, 16)), rows.get((name, 1))
        if r16 and r1 and base.get(16):
            x, p95 = r16["images_per_second"] / base[16], r1["p95_ms"]
            out.append(f"`{name}`: {x:.1f}× diffusers' throughput at 16 clients (target ≥ 5×: "
                       f"{'met' if x >= 5 else 'missed'}); p95 for one client {p95:.1f} ms (target ≤ 25 ms: "
                       f"{'met' if p95 <= 25 else f'missed by {p95 - 25:.1f} ms'}).")
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
             f"{acc(q['teacher'])} | {1e3 * sp['teacher_seconds']:.2f} | 1.0× |"]
    if "tiny_onnxruntime_seconds" in sp:
        t_ort, teacher_ort = sp["tiny_onnxruntime_seconds"], sp["teacher_onnxruntime_seconds"]
        lines += [f"| `{TINY}`, networks on ONNX Runtime (as `fewstep serve` runs them) | | | | | {1e3 * t_ort:.2f} | "
                  f"{sp['teacher_seconds'] / t_ort:.1f}× ({teacher_ort / t_ort:.1f}× the teacher on ONNX Runtime) |",
                  f"| teacher, networks on ONNX Runtime | | | | | {1e3 * teacher_ort:.2f} | "
                  f"{sp['teacher_seconds'] / teacher_ort:.1f}× |"]
    lines += ["", f"End to end with the tiny decoder: {speedup_tiny:.2f}× the teacher's 25 CFG steps, both eager (target ≥ "
              f"10×: {'met' if speedup_tiny >= 10 else 'missed'}){_served(sp)}; its FID against the LCM's with the "
              f"VAE: {verdict(q['tiny'], q['vae'])} (target: within the spread, {'met' if same else 'missed'})."]
    return lines


def _served(sp: dict) -> str:
    """The end-to-end speedups with the networks on ONNX Runtime: against the same teacher, and the eager one."""
    if "tiny_onnxruntime_seconds" not in sp:
        return ""
    same = sp["teacher_onnxruntime_seconds"] / sp["tiny_onnxruntime_seconds"]
    return (f"; with both on ONNX Runtime {same:.2f}× (target ≥ 10×: {'met' if same >= 10 else 'missed'}), and as served "
            f"against the eager teacher {sp['teacher_seconds'] / sp['tiny_onnxruntime_seconds']:.1f}×")
