"""The guided-distillation section of ``fewstep bench`` on the emoji pipeline (Meng et al. 2023 in latent
space, text prompts): stage 1 beside the teacher's CFG, the progressive students beside the LCM at the
same step counts, guidance after distillation, and wall-clock side by side.

``fewstep bench --only guided-latent --reuse OLD/bench.json`` runs just this section.
"""

from __future__ import annotations

from pathlib import Path

from ..eval.evaluate import ruler_for
from ..models.folders import load_model
from .format import acc, fid, ratio_cell, target_met, teacher_best
from .measure import quality_rows, sample_run, side_by_side

EMOJI_TEACHER, EMOJI_GUIDED, EMOJI_PROGRESSIVE, EMOJI_LCM = "emoji-sd", "emoji-guided", "emoji-progressive", "emoji-lcm"
LATENT_STEPS, FEW_STEPS, LATENT_SWEEP = (8, 25), (4, 2, 1), (1.0, 2.0, 3.0, 4.0, 6.0)


def measure(models_dir: Path, settings, command: str = "", teacher_rows: dict | None = None) -> dict:
    """Guided distillation on ``emoji-sd`` (``fewstep bench --only guided-latent``): the stage-1 student at 8
    and 25 DPM-Solver++ steps beside the teacher's CFG at its default s (target: 25-step FID within 5% at half
    the UNet passes); the progressive students (DDIM and the stochastic sampler) beside the LCM at 4, 2, 1
    steps; FID and accuracy over s at half the sample count (stage 1 at 8 steps, the 4-step progressive
    student, the teacher at 8); wall-clock per image side by side (end to end and the sampling loop alone).
    ``teacher_rows``: the latent section's teacher rows by sampler, reused when they hold these step counts."""
    if not (models_dir / EMOJI_TEACHER).is_dir() or not (models_dir / EMOJI_GUIDED).is_dir():
        return {}
    teacher, guided = load_model(models_dir / EMOJI_TEACHER), load_model(models_dir / EMOJI_GUIDED)
    optional = {n: load_model(models_dir / n) for n in (EMOJI_PROGRESSIVE, EMOJI_LCM) if (models_dir / n).is_dir()}
    ruler = ruler_for(teacher, models_dir)
    s, num, seed = teacher.config.default_guidance_scale, settings.num, settings.seed
    out: dict = {"command": command, "features": ruler.name, "guidance_scale": s, "num": num, "quality": {}, "sweep": {},
                 "training": guided.config.training}
    reused = [r for r in (teacher_rows or {}).get("dpmpp-2m", []) if r["steps"] in LATENT_STEPS]
    out["quality"][f"{EMOJI_TEACHER}/dpmpp-2m"] = (reused if len(reused) == len(LATENT_STEPS) and
                                                   (teacher_rows or {}).get("num") == num else
                                                   quality_rows(teacher, ruler, LATENT_STEPS, "dpmpp-2m", s, num, seed))
    out["quality"][f"{EMOJI_GUIDED}/dpmpp-2m"] = quality_rows(guided, ruler, LATENT_STEPS, "dpmpp-2m", s, num, seed)
    runs = [(EMOJI_TEACHER, teacher, 25, "dpmpp-2m"), (EMOJI_GUIDED, guided, 25, "dpmpp-2m")]   # timed
    sweep = [(EMOJI_TEACHER, teacher, 8, "dpmpp-2m"), (EMOJI_GUIDED, guided, 8, "dpmpp-2m")]  # over s
    if EMOJI_PROGRESSIVE in optional:
        progressive = optional[EMOJI_PROGRESSIVE]
        serves = [n for n in FEW_STEPS if n in progressive.config.serves_steps]
        for sampler in ("ddim", "ddim-stochastic"):
            out["quality"][f"{EMOJI_PROGRESSIVE}/{sampler}"] = quality_rows(progressive, ruler, serves, sampler, s, num, seed)
        out["progressive_training"] = progressive.config.training
        runs.append((EMOJI_PROGRESSIVE, progressive, progressive.config.default_steps, "ddim"))
        sweep.append((EMOJI_PROGRESSIVE, progressive, progressive.config.default_steps, "ddim"))
    if EMOJI_LCM in optional:
        out["quality"][f"{EMOJI_LCM}/consistency"] = quality_rows(optional[EMOJI_LCM], ruler, FEW_STEPS, "consistency", s, num, seed)
        runs.append((EMOJI_LCM, optional[EMOJI_LCM], 4, "consistency"))
    lo, hi = guided.config.guidance_range
    out["sweep_scales"] = scales = [v for v in LATENT_SWEEP if lo <= v <= hi]
    half = max(num // 2, 10)
    for name, model, steps, sampler in sweep:
        out["sweep"][name] = {"steps": steps, "sampler": sampler,
                              "rows": [quality_rows(model, ruler, (steps,), sampler, v, half, seed)[0] for v in scales]}
    batch = settings.timing_batch
    out["speed"] = [{"model": name, "steps": steps, "sampler": sampler, "batch": batch} for name, _, steps, sampler in runs]
    for key, unet_only in (("seconds", False), ("loop_seconds", True)):
        times = side_by_side([sample_run(m, steps, sampler, s, batch, unet_only) for _, m, steps, sampler in runs],
                             batch, settings.timing_repeats)
        for row, t in zip(out["speed"], times):
            row[key] = t
    for row in out["speed"]:
        print(f"speed {row['model']} {row['steps']} steps: {1e3 * row['seconds']:.2f} ms/img end to end, "
              f"{1e3 * row['loop_seconds']:.2f} sampling loop", flush=True)
    return out


def section(report) -> list[str]:
    """The BENCHMARKS.md subsection of :func:`measure_latent`."""
    g = getattr(report, "guided_latent", None) or {}
    if not g:
        return []
    q, s, tr = g["quality"], g["guidance_scale"], g.get("training", {})
    teacher = {r["steps"]: r for r in q[f"{EMOJI_TEACHER}/dpmpp-2m"]}
    student = {r["steps"]: r for r in q[f"{EMOJI_GUIDED}/dpmpp-2m"]}
    lines = ["", "### On the emoji pipeline (latent space, text prompts)", "",
             (f"Written by `{g['command']}`. " if g.get("command") else "") +
             f"Stage 1 `{EMOJI_GUIDED}`: `{tr.get('command', '')}` ({tr.get('wall_seconds', 0) / 60:.0f} min on "
             f"{tr.get('threads', '?')} thread(s)); the teacher's UNet with diffusers' `time_cond_proj_dim` w-input, "
             f"saved as a `StableDiffusionPipeline` (which then feeds ψ(s − 1) and skips CFG). s = {s:g}, {g['num']} "
             f"samples per point, prompts = the emoji's own captions; FID on the emoji classifier's features. "
             f"Target: 25-step FID within 5% of the teacher's at half the UNet passes.", "",
             "| model | sampler | steps | UNet passes | FID | FID / teacher same steps | acc. | target |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for name, rows in ((f"{EMOJI_TEACHER} (CFG)", teacher), (EMOJI_GUIDED, student)):
        for n, r in sorted(rows.items()):
            ratio = ratio_cell(r, teacher[n]) if n in teacher else "–"
            ok = (f"≤ 1.05×: {target_met(r, teacher[n], 1.05)}"
                  if rows is student and n == 25 and n in teacher else "")
            lines.append(f"| {name} | dpmpp-2m | {n} | {r['nfe']} | {fid(r)} | {ratio} | "
                         f"{acc(r)} | {ok} |")
    few = [k for k in q if k.startswith((f"{EMOJI_PROGRESSIVE}/", f"{EMOJI_LCM}/"))]
    if few:
        pt = g.get("progressive_training", {})
        where, best = teacher_best({**(getattr(report, "latent", None) or {}).get("quality", {}), **q}, EMOJI_TEACHER)
        lines += ["", f"Progressive distillation of `{EMOJI_GUIDED}` (`{EMOJI_PROGRESSIVE}`: `{pt.get('command', '')}`, "
                  f"{pt.get('wall_seconds', 0) / 60:.0f} min) beside latent consistency distillation (`{EMOJI_LCM}`) at "
                  f"the same step counts, s = {s:g}; the teacher's best FID (its lowest over every sampler and step "
                  f"count measured, CFG) is {fid(best)} ({where}).", "",
                  "| model | sampler | steps | UNet passes | FID | FID / teacher's best | acc. |", "|---|---|---:|---:|---:|---:|---:|"]
        for key in few:
            name, sampler = key.split("/")
            for r in q[key]:
                lines.append(f"| {name} | {sampler} | {r['steps']} | {r['nfe']} | {fid(r)} | {ratio_cell(r, best)} | "
                             f"{acc(r)} |")
    lines += ["", f"Guidance after distillation ({max(g['num'] // 2, 10)} samples per point): FID / caption-group "
              "accuracy against s.", "",
              "| model | " + " | ".join(f"s = {v:g}" for v in g["sweep_scales"]) + " |",
              "|---|" + "---|" * len(g["sweep_scales"])]
    for name, sw in g["sweep"].items():
        lines.append(f"| {name} ({sw['sampler']}, {sw['steps']} steps) | "
                     + " | ".join(f"{fid(r)} / {r['cond_accuracy']:.3f}" for r in sw["rows"]) + " |")
    base = g["speed"][0]
    lines += ["", f"Wall-clock per image, side by side in this process (batch {base['batch']}; the models' runs "
              "interleaved, median of each); speedup against the teacher's 25 CFG steps:", "",
              "| model | sampler | steps | end to end ms / image | speedup | sampling loop ms / image | speedup |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for r in g["speed"]:
        lines.append(f"| {r['model']} | {r['sampler']} | {r['steps']} | {1e3 * r['seconds']:.2f} | "
                     f"{base['seconds'] / r['seconds']:.2f}× | {1e3 * r['loop_seconds']:.2f} | "
                     f"{base['loop_seconds'] / r['loop_seconds']:.2f}× |")
    return lines
