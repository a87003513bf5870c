"""The backends under ``fewstep serve``, side by side (issue 29: "pick the fastest CPU backend you can measure side
by side — TorchScript, ``torch.compile``, ONNX Runtime or OpenVINO — and keep eager as the checked fallback").

The networks are the ones ``./run serve`` serves: ``emoji-sd``'s denoiser with its LoRA sliders fused at their
start-up weights (``emoji-lcm-lora`` × 1, ``emoji-style-lora`` × 0; the σ-space scalings included, as the engine
calls it) and ``emoji-tiny-vae``'s decoder. Each backend compiles the same call and is checked against eager (the
largest difference over batches 1, 4 and 16 is recorded); then every (backend, network, batch) is timed in
interleaved rounds, in this process, on the bench's torch threads: per-call milliseconds, median and range over
the rounds.

- ``eager``: the call itself (diffusers' Python every call).
- ``torchscript``, ``onnxruntime``: :mod:`fewstep.serve.traced`'s compilers, as ``fewstep serve`` runs them.
- ``openvino``: the ONNX Runtime export read by OpenVINO (``pip install openvino``, or ``.[bench]``), compiled for
  the CPU at float32 (``INFERENCE_PRECISION_HINT`` f32: on a CPU with AMX or AVX512-bf16 OpenVINO otherwise runs
  bf16, a different model), latency hint, one stream. Skipped, and said, when not installed.
- ``torch.compile``: Inductor, ``dynamic=True`` (one compile for every batch size).
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from ..models.loras import load_with_loras
from ..models.tiny_vae import with_tiny_vae
from ..serve.traced import onnxruntime, torchscript
from .measure import cpu

BATCHES = (1, 4, 16)
BACKENDS = ("eager", "torchscript", "onnxruntime", "openvino", "torch.compile")
SLIDERS = (("emoji-lcm-lora", 1.0), ("emoji-style-lora", 0.0))     # ./run serve's start-up weights


def measure(models_dir: Path, threads: int, rounds: int = 5, command: str = "") -> dict:
    """{"rows": [{backend, network, batch, ms: [per round], max_abs_diff}], "skipped": {backend: why}, ...}."""
    if not all((models_dir / n).is_dir() for n in ("emoji-sd", "emoji-lcm-lora", "emoji-style-lora", "emoji-tiny-vae")):
        return {}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _measure(models_dir, threads, rounds, command)
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def _measure(models_dir: Path, threads: int, rounds: int, command: str) -> dict:
    model = load_with_loras(models_dir / "emoji-sd", [f"{models_dir / name}:{w}" for name, w in SLIDERS])
    model = with_tiny_vae(model, models_dir / "emoji-tiny-vae")
    emb = model.conditioner(["a red apple"])["encoder_hidden_states"]

    def denoise(x: Tensor, sigma: Tensor, e: Tensor) -> Tensor:
        return model.denoiser(x, sigma, encoder_hidden_states=e)

    nets: dict[str, tuple[Callable[..., Tensor], Callable[[int], tuple[Tensor, ...]]]] = {
        "denoiser": (denoise, lambda b: (_randn(b, *model.shape, seed=b), torch.full((b,), 2.5),
                                          emb.expand(b, -1, -1).contiguous())),
        "decoder": (model.codec.decode, lambda b: (_randn(b, *model.shape, seed=100 + b),)),
    }
    calls: dict[tuple[str, str], Callable[..., Tensor]] = {}
    skipped: dict[str, str] = {}
    for net, (fn, inputs) in nets.items():
        example = inputs(2)
        batched = [True] * len(example)
        calls["eager", net] = fn
        calls["torchscript", net] = torchscript(fn, example, batched)
        exported = onnxruntime(fn, example, batched)
        calls["onnxruntime", net] = exported
        if importlib.util.find_spec("openvino") is None:
            skipped["openvino"] = "not installed (pip install openvino)"
        else:
            calls["openvino", net] = _openvino(exported.model, threads)
        calls["torch.compile", net] = _compiled(fn, inputs)
    probes = {(net, b): inputs(b) for net, (_, inputs) in nets.items() for b in BATCHES}
    want = {key: nets[key[0]][0](*args) for key, args in probes.items()}      # eager, once per network and batch
    diffs = {(backend, net): max((call(*probes[net, b]) - want[net, b]).abs().max().item() for b in BATCHES)
             for (backend, net), call in calls.items()}
    times: dict[tuple[str, str, int], list[float]] = {}
    for _ in range(rounds):
        for b in BATCHES:
            for (backend, net), call in calls.items():
                args = nets[net][1](b)
                call(*args)
                n = max(3, 48 // b)
                start = time.perf_counter()
                for _ in range(n):
                    call(*args)
                times.setdefault((backend, net, b), []).append(1e3 * (time.perf_counter() - start) / n)
    rows = [{"backend": backend, "network": net, "batch": b, "ms": ms, "max_abs_diff": diffs[backend, net]}
            for (backend, net, b), ms in times.items()]
    for r in rows:
        print(f"{r['backend']:<14} {r['network']:<9} batch {r['batch']:>2}: {statistics.median(r['ms']):7.3f} ms "
              f"(max |diff| vs eager {r['max_abs_diff']:.1e})", flush=True)
    return {"rows": rows, "skipped": skipped, "threads": threads, "rounds": rounds, "load": list(os.getloadavg()),
            "cpus": os.cpu_count(), "machine": cpu(), "command": command, "torch": torch.__version__, "versions": _versions()}


def _randn(*shape: int, seed: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _openvino(onnx_model: bytes, threads: int) -> Callable[..., Tensor]:
    import openvino as ov

    core = ov.Core()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "call.onnx"
        path.write_bytes(onnx_model)
        compiled = core.compile_model(core.read_model(str(path)), "CPU", {
            "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
            "INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    names = [p.get_any_name() for p in compiled.inputs]

    def run(*tensors: Tensor) -> Tensor:
        out = request.infer({name: t.contiguous().numpy() for name, t in zip(names, tensors)})
        return torch.from_numpy(out[compiled.outputs[0]].copy())
    return run


def _compiled(fn: Callable[..., Tensor], inputs: Callable[[int], tuple[Tensor, ...]]) -> Callable[..., Tensor]:
    compiled = torch.compile(fn, dynamic=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for b in BATCHES:           # compiled now, not in the first timed round
            compiled(*inputs(b))
    return compiled


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("onnxruntime", "openvino"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            pass
    return out


def section(g: dict) -> list[str]:
    """The BENCHMARKS.md subsection."""
    if not g or not g.get("rows"):
        return []
    ms = {(r["backend"], r["network"], r["batch"]): r["ms"] for r in g["rows"]}
    diff = {(r["backend"], r["network"]): r["max_abs_diff"] for r in g["rows"]}
    backends = [b for b in BACKENDS if (b, "denoiser", 1) in ms]
    load = g["load"]
    skipped = "".join(f" {b}: {why}." for b, why in g.get("skipped", {}).items())
    lines = ["", "### Backends: the served networks' calls side by side", "",
             f"Written by `{g['command']}`. The networks `./run serve` serves (`emoji-sd`'s denoiser with its sliders "
             f"fused at their start-up weights, σ-space scalings included; `emoji-tiny-vae`'s decoder), each compiled "
             f"by every backend and checked against eager, then timed call by call in this process on "
             f"{g['threads']} torch thread(s), {g['rounds']} interleaved rounds: median ms per call (range over the "
             f"rounds). OpenVINO at float32; `torch.compile` is Inductor with `dynamic=True`; torch {g['torch']}, "
             + ", ".join(f"{k} {v}" for k, v in g.get("versions", {}).items())
             + f". Load average when it ended {load[0]:.2f} / {load[1]:.2f} (1 / 5 min) on "
             f"{g.get('machine') or str(g['cpus']) + ' CPU(s)'}.{skipped}",
             "", "| backend | network | batch 1 ms | batch 4 ms | batch 16 ms | × eager at 1 | × eager at 16 | "
             "max abs diff vs eager |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for net in ("denoiser", "decoder"):
        for b in backends:
            cells = [f"{statistics.median(ms[b, net, n]):.2f} ({min(ms[b, net, n]):.2f}–{max(ms[b, net, n]):.2f})"
                     for n in BATCHES]
            x1, x16 = (statistics.median(ms["eager", net, n]) / statistics.median(ms[b, net, n]) for n in (1, 16))
            lines.append(f"| {b} | {net} | {' | '.join(cells)} | {x1:.2f}× | {x16:.2f}× | {diff[b, net]:.1e} |")
    best = {net: min(backends, key=lambda b: statistics.median(ms[b, net, 1])) for net in ("denoiser", "decoder")}
    ort = {net: statistics.median(ms["onnxruntime", net, 1]) for net in ("denoiser", "decoder")}
    lines += ["", "Fastest at batch 1: " + "; ".join(
        f"the {net} on {best[net]} ({statistics.median(ms[best[net], net, 1]):.2f} ms"
        + (f"; ONNX Runtime {ort[net]:.2f} ms)" if best[net] != "onnxruntime" else ")") for net in ("denoiser", "decoder")) + ". `fewstep serve` runs both on ONNX Runtime by "
        "default (OpenVINO is not a dependency); TorchScript where ONNX Runtime cannot (half precision, a GPU), "
        "eager where neither replays the call."]
    return lines
