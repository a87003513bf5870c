"""The SDXL section of ``fewstep bench`` (issue 15): the tiny SDXL-format emoji teacher (``emoji-sdxl``: two
text encoders, pooled embeddings, size/crop time ids; emoji-sd's VAE) and its LCM-LoRA
(``emoji-sdxl-lcm-lora``) on the emoji ruler, beside the SD 1.x-format ones (``emoji-sd`` +
``emoji-lcm-lora``) measured with the same prompts, sample count and seed.

Target (the LCM-LoRA paper's claim for SDXL): the LoRA's 4-step FID within 1.3× the SDXL teacher's best.
"""

from __future__ import annotations

from pathlib import Path

from ..eval.evaluate import dataset_ruler_name, ruler_for
from ..models.folders import load_model
from ..models.loras import apply_loras, lora_info
from .format import acc, fid, ratio_cell, teacher_best, verdict
from .measure import quality_rows
from .results import features_of, folder_digest

PAIRS = (("emoji-sdxl", "emoji-sdxl-lcm-lora"), ("emoji-sd", "emoji-lcm-lora"))
TEACHER_STEPS = {"dpmpp-2m": (4, 8, 25), "ddim": (25,)}
LORA_STEPS = (1, 2, 4, 8)


def measure(models_dir: Path, settings, command: str = "", pairs=PAIRS, teacher_steps=TEACHER_STEPS,
            guidance_scales: tuple[float, ...] = (), previous: dict | None = None) -> dict:
    """The section's numbers (empty when the first teacher is not there): each (teacher, LCM-LoRA) pair of
    ``pairs``, the teacher with each sampler of ``teacher_steps`` at its step counts and at each of
    ``guidance_scales`` (default: its own default scale only), the LoRA (λ = 1, guidance 1) at :data:`LORA_STEPS`.
    A pair whose teacher and LoRA have the weights ``previous`` (this section of the ``--reuse`` report, same sample
    count and seed) measured keeps its rows from there."""
    if not (models_dir / pairs[0][0]).is_dir():
        return {}
    features = dataset_ruler_name(models_dir, "emoji")
    out: dict = {"command": command, "num": settings.num, "seed": settings.seed, "features": features, "quality": {},
                 "loras": {}, "teachers": {}, "fingerprints": {}}
    same = bool(previous) and previous.get("num") == settings.num and previous.get("seed", 0) == settings.seed and \
        features_of(previous) == features
    for teacher_name, lora_name in pairs:
        if not (models_dir / teacher_name).is_dir():
            continue
        names = [n for n in (teacher_name, lora_name) if (models_dir / n).is_dir()]
        digests = {n: folder_digest(models_dir / n) for n in names}
        out["fingerprints"].update(digests)
        if same and all(previous.get("fingerprints", {}).get(n) == d for n, d in digests.items()):
            for key in ("quality", "loras", "teachers"):
                out[key].update({k: v for k, v in previous.get(key, {}).items() if k.split("/")[0] in names})
            print(f"{', '.join(names)}: rows of the --reuse report (same weights)", flush=True)
            continue
        teacher = load_model(models_dir / teacher_name)
        ruler = ruler_for(teacher, models_dir)
        s = teacher.config.default_guidance_scale
        out["teachers"][teacher_name] = {"guidance_scale": s, "guidance_scales": list(guidance_scales or (s,)),
                                         "training": teacher.config.training,
                                         "parameters": sum(p.numel() for p in teacher.backbone.parameters())}
        for sampler, steps in teacher_steps.items():
            out["quality"][f"{teacher_name}/{sampler}"] = [
                row for g in (guidance_scales or (s,))
                for row in quality_rows(teacher, ruler, steps, sampler, g, settings.num, settings.seed)]
        if (models_dir / lora_name).is_dir():
            accel = apply_loras(load_model(models_dir / teacher_name), [(models_dir / lora_name, 1.0)])
            out["loras"][lora_name] = {**lora_info(models_dir / lora_name), "teacher": teacher_name}
            out["quality"][f"{lora_name}/consistency"] = quality_rows(accel, ruler, LORA_STEPS, "consistency", 1.0,
                                                                      settings.num, settings.seed)
    return out


def section(report) -> list[str]:
    g = getattr(report, "sdxl", None) or {}
    if not g:
        return []
    lines = ["", "## SDXL-format pipelines: the tiny SDXL teacher and its LCM-LoRA", "",
             (f"Written by `{g['command']}`. " if g.get("command") else "") +
             f"`emoji-sdxl` is an SDXL-format pipeline trained here (`StableDiffusionXLPipeline`: two CLIP text "
             f"encoders, the second's pooled embedding and the size/crop time ids into the UNet's added conditioning; "
             f"emoji-sd's VAE), `emoji-sd` the SD 1.x-format one; each with its LCM-LoRA (λ = 1, guidance 1, LCM's "
             f"sampler), the teachers with CFG at their default scale. {g['num']} samples per point, the emoji ruler. "
             f"Target: the LoRA's 4-step FID within 1.3× its own teacher's best.", "",
             "| model | sampler | steps | NFE | FID | / teacher's best | acc. |", "|---|---|---:|---:|---:|---:|---:|"]
    q = g["quality"]
    rows, pairs = pair_rows(q, PAIRS, ("dpmpp-2m", "ddim"), lambda name, sampler, r, ref: (
        f"| {name} | {sampler} | {r['steps']} | {r['nfe']} | {fid(r)} | {ratio_cell(r, ref)} | {acc(r)} |"))
    verdicts = []
    for teacher_name, lora_name, where, ref, four in pairs:
        if four is not None:
            ok = four["fid"] <= 1.3 * ref["fid"]
            verdicts.append(f"`{lora_name}` at 4 steps: FID {fid(four)} = {ratio_cell(four, ref)} "
                            f"`{teacher_name}`'s best ({fid(ref)}, {where}): target ≤ 1.3× "
                            f"{'met' if ok else 'NOT met'}; against the teacher's 25 DPM-Solver++ steps: "
                            f"{verdict(four, next(r for r in q[f'{teacher_name}/dpmpp-2m'] if r['steps'] == 25))}.")
    return lines + rows + [x for v in verdicts for x in ("", v)]


def pair_rows(quality: dict, pairs, samplers: tuple[str, ...], cells) -> tuple[list[str], list[tuple]]:
    """The table rows of each measured (teacher, LoRA) pair — the teacher's ``samplers``' rows, then the LoRA's — as
    ``cells(name, sampler, row, teacher's best row)``, and per pair (teacher, LoRA, where its best is, that best
    row, the LoRA's 4-step row or None): the part of the SDXL and flow sections they share."""
    lines, found = [], []
    for teacher_name, lora_name in pairs:
        best = teacher_best(quality, teacher_name)
        if best is None:
            continue
        where, ref = best
        for key in (*(f"{teacher_name}/{s}" for s in samplers), f"{lora_name}/consistency"):
            for r in quality.get(key, []):
                lines.append(cells(*key.split("/"), r, ref))
        four = next((r for r in quality.get(f"{lora_name}/consistency", []) if r["steps"] == 4), None)
        found.append((teacher_name, lora_name, where, ref, four))
    return lines, found
