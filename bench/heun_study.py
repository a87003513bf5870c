"""Why Heun collapses at 2–4 steps on the digits teacher (issue 17), and what fixes it.

Heun's step is Euler's plus a corrector, and in σ space the corrector is exactly
    x' = Euler(x; σ → σ') + (r − 1)/2 · (D(x_euler; σ') − D(x; σ)),   r = σ/σ'
(tests/test_parity.py checks the identity): the change between two successive x0-estimates, scaled by
(r − 1)/2. EDM's ρ = 7 grid at 4 steps (80 → 17.5 → 2.5 → 0.17 → 0) has r = 4.6, 7, 14.7, so the
corrector multiplies that change by 1.8, 3.0 and 6.9; at 2 steps (80 → 2.2 → 0) by 17.7. This script
measures it per step with the trained teacher and with the exact denoiser of the digits (the oracle,
whose x0-estimates are convex combinations of data points), with and without classifier-free guidance,
and tries the two remedies an x0 clamp and a gentler grid (ρ = 3, smaller ratios at the low end):

    python bench/heun_study.py            # writes bench/results/heun.json; `fewstep bench --render-only` shows it
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from fewstep.core.oracle import ExactDenoiser
from fewstep.core.solvers import ddim_step, sample_euler, sample_heun
from fewstep.eval.evaluate import ruler_for
from fewstep.models.folders import load_model
from fewstep.sampling.generate import condition_batch, conditions

ROOT = Path(__file__).resolve().parents[1]
MODELS, OUT = ROOT / "models", ROOT / "bench" / "results" / "heun.json"
NUM, SEED = 500, 0


def denoisers(teacher):
    """(name, model): the trained teacher, and the same model with the exact oracle of its data as denoiser."""
    oracle = load_model(MODELS / "digits-teacher")
    data = ruler_for(teacher, MODELS).data
    oracle.denoiser = ExactDenoiser(data.images, data.labels)
    return [("teacher", teacher), ("oracle", oracle)]


def guided(model, guidance: float, n: int):
    labels = torch.arange(n) % model.config.num_classes
    kwargs, _ = condition_batch(model, conditions(model, labels, n)[0], 0, n)
    den, extra = model.guided(kwargs, guidance)
    return den, extra, labels


@torch.no_grad()
def per_step(model, guidance: float, steps: int, rho: float = 7.0) -> list[dict]:
    """Heun's corrector at each step of the grid: r, the mean |D' − D|, the largest |correction|, and the range
    of the x0-estimates D(x; σ) and of x after the step."""
    den, extra, _ = guided(model, guidance, NUM)
    sigmas = model.schedule.grid(steps, rho)
    x = torch.randn(NUM, *model.shape, generator=torch.Generator().manual_seed(SEED)) * sigmas[0]
    rows = []
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        s = torch.full((NUM,), float(sigma))
        d = den(x, s, **extra)
        euler = ddim_step(x, d, sigma, sigma_next)
        if sigma_next == 0:
            x, corr, change = euler, torch.zeros(()), torch.zeros(())
        else:
            d_next = den(euler, torch.full((NUM,), float(sigma_next)), **extra)
            change = d_next - d
            corr = (sigma / sigma_next - 1) / 2 * change
            x = euler + corr
        rows.append({"sigma": float(sigma), "sigma_next": float(sigma_next),
                     "ratio": float(sigma / sigma_next) if sigma_next > 0 else None,
                     "x0_min": float(d.min()), "x0_max": float(d.max()),
                     "x0_outside": float(((d < -1) | (d > 1)).float().mean()),
                     "mean_change": float(change.abs().mean()), "max_correction": float(corr.abs().max()),
                     "x_min": float(x.min()), "x_max": float(x.max())})
    return rows


@torch.no_grad()
def sample(model, ruler, sampler: str, steps: int, guidance: float, rho: float, clamp: bool) -> dict:
    den, extra, labels = guided(model, guidance, NUM)
    if clamp:
        base = den
        den = lambda x, s, **c: base(x, s, **c).clamp(-1, 1)  # noqa: E731
    sigmas = model.schedule.grid(steps, rho)
    x = torch.randn(NUM, *model.shape, generator=torch.Generator().manual_seed(SEED)) * sigmas[0]
    out = (sample_heun if sampler == "heun" else sample_euler)(den, x, sigmas, extra_args=extra)
    score = ruler.score(out.clamp(-1, 1), labels, seed=SEED)
    return {"sampler": sampler, "steps": steps, "guidance_scale": guidance, "rho": rho, "clamp_x0": clamp,
            "raw_min": float(out.min()), "raw_max": float(out.max()),
            **{k: score[k] for k in ("fid", "fid_std", "cond_accuracy", "cond_accuracy_std")}}


def main() -> None:
    torch.set_num_threads(1)
    teacher = load_model(MODELS / "digits-teacher")
    ruler = ruler_for(teacher, MODELS)
    result = {"command": "python bench/heun_study.py", "num": NUM, "seed": SEED, "per_step": {}, "runs": []}
    for name, model in denoisers(teacher):
        for guidance in (1.0, 2.0):
            for steps in (2, 4):
                result["per_step"][f"{name}/s={guidance:g}/{steps}"] = per_step(model, guidance, steps)
        if name != "teacher":
            continue
        for steps in (2, 4, 8):
            for sampler, rho, clamp in (("euler", 7.0, False), ("heun", 7.0, False), ("heun", 7.0, True),
                                        ("heun", 3.0, False), ("heun", 3.0, True), ("euler", 3.0, False)):
                result["runs"].append({"model": name, **sample(model, ruler, sampler, steps, 2.0, rho, clamp)})
                print(result["runs"][-1], flush=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
