"""What every bench section measures with: quality rows on a ruler, and wall-clock side by side.

Timings are taken in this process, the compared runs interleaved (A, B, A, B, …) so that whatever else
the machine does weighs on all of them alike; the median of each is reported. The floor of a sampler
is (network evaluations) × (time of one guided network evaluation at that batch); wall-clock / floor is
its overhead (DESIGN.md §5).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from ..core.solvers import get_sampler
from ..eval.evaluate import evaluate
from ..models.handle import Model
from ..sampling.generate import (
    condition_batch,
    conditions,
    generate,
    nfe,
    sampler_options,
)
from ..sampling.grids import sampling_grid


def quality_rows(model: Model, ruler, steps, sampler: str | None, guidance: float | None, num: int, seed: int,
                 confidence: bool = False, name: str | None = None, **sampling) -> list[dict]:
    """:func:`fewstep.eval.evaluate.evaluate` rows as dicts, printed as they come; with ``confidence`` also
    the classifier's mean probability of the asked label, which keeps moving with s after accuracy
    saturates at 1. ``sampling``: more of ``generate``'s options (TCD's ``eta``)."""
    rows, samples = evaluate(model, ruler, list(steps), sampler, guidance, num, seed, progress=False, **sampling)
    out = []
    for r in rows:
        row = asdict(r)
        if confidence:
            probs = ruler.classifier.predict(samples[r.steps].clamp(-1, 1))
            labels = torch.arange(num) % model.config.num_classes
            row["confidence"] = float(probs.gather(1, labels[:, None]).mean())
        out.append(row)
        print(f"{name or model.path.name:<22} {r.sampler:<15} s={r.guidance_scale:g} steps {r.steps:>3} NFE {r.nfe:>3}  "
              f"FID {r.fid:7.3f}  acc {float('nan') if r.cond_accuracy is None else r.cond_accuracy:.3f}"
              + (f"  conf {row['confidence']:.4f}" if confidence else ""), flush=True)
    return out


def timing_cond(model: Model, batch: int):
    """What the speed runs sample: one prompt for a text model, the classes in turn for a labelled one."""
    if model.conditioner.text:
        return ["grinning face"] * batch
    return torch.arange(batch) % model.config.num_classes if model.conditioner.conditional else None


def sample_run(model: Model, steps: int, sampler: str | None, guidance: float, batch: int,
               loop_only: bool = False) -> Callable[[], object]:
    """A callable that makes ``batch`` images: end to end (conditioning, sampling, decoding), or the
    sampling loop alone."""
    cond = timing_cond(model, batch)
    if not loop_only:
        return lambda: generate(model, cond, num=batch if cond is None else None, steps=steps, sampler=sampler,
                                guidance_scale=guidance, batch_size=batch)
    sampler = sampler or model.config.default_sampler
    kwargs, _ = condition_batch(model, conditions(model, cond, batch)[0], 0, batch)
    den, extra = model.guided(kwargs, guidance)
    sigmas, fn = sampling_grid(model, steps, sampler), get_sampler(sampler).fn
    return lambda: fn(den, torch.randn(batch, *model.shape) * sigmas[0], sigmas, extra_args=extra, disable=True,
                      generator=torch.Generator().manual_seed(0), **sampler_options(model, sampler))


def network_run(model: Model, guidance: float, batch: int) -> Callable[[], object]:
    """One guided network evaluation at ``batch`` images (the floor's unit)."""
    kwargs, _ = condition_batch(model, conditions(model, timing_cond(model, batch), batch)[0], 0, batch)
    den, extra = model.guided(kwargs, guidance)
    x, sigma = torch.randn(batch, *model.shape), torch.full((batch,), 1.0)
    return lambda: den(x, sigma, **extra)


@torch.no_grad()
def side_by_side(runs: list[Callable[[], object]], batch: int, repeats: int) -> list[float]:
    """Median seconds per image of each run, the runs interleaved; one warm-up each first."""
    for run in runs:
        run()
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, t in zip(runs, times):
            start = time.perf_counter()
            run()
            t.append(time.perf_counter() - start)
    return [statistics.median(t) / batch for t in times]


def speed_rows(model: Model, step_sets: dict[str, tuple[int, ...]], batch: int, repeats: int,
               guidance: float | None = None) -> list[dict]:
    """Wall-clock per image of each (sampler, steps), interleaved with one network evaluation at the same
    batch, and the overhead over the floor NFE × that evaluation."""
    guidance = model.config.default_guidance_scale if guidance is None else guidance
    points = [(sampler, n) for sampler, steps in step_sets.items() for n in steps]
    runs = [sample_run(model, n, sampler, guidance, batch) for sampler, n in points]
    net, *times = side_by_side([network_run(model, guidance, batch), *runs], batch, max(repeats, 3))
    rows = []
    for (sampler, n), per_image in zip(points, times):
        floor = get_sampler(sampler).nfe(n) * net      # guided calls × time of one guided call (per image)
        rows.append({"model": model.path.name, "sampler": sampler, "steps": n, "nfe": nfe(model, sampler, n, guidance),
                     "seconds_per_image": per_image, "images_per_second": 1 / per_image,
                     "floor_seconds_per_image": floor, "overhead": per_image / floor})
    return rows


def cpu() -> str:
    """The CPU's model name and core count."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def machine() -> str:
    """The CPU (:func:`cpu`), torch's version and its threads now."""
    return f"{cpu()}, torch {torch.__version__} ({torch.get_num_threads()} threads)"
