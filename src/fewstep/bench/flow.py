"""The flow-matching section of ``fewstep bench`` (issue 28): the tiny FLUX- and SD3-format emoji teachers
(``emoji-flux``, ``emoji-sd3``: rectified-flow transformers with CLIP + T5 text encoders on emoji-sd's VAE) and their
LCM-LoRAs (``emoji-flux-lcm-lora``, ``emoji-sd3-lcm-lora``) on the emoji ruler, beside the SD 1.x and SDXL ones of
the SDXL section, with the same prompts, sample count and seed.

Each teacher is measured over a grid — its Euler sampler (FlowMatchEulerDiscreteScheduler's) at 4, 8 and 28 steps,
each at guidance 1 (none), 2, 3 and 4.5 — and its best over that whole grid is the reference. Target (issue 28, the
LCM-LoRA paper's claim carried to FLUX): the FLUX LoRA's 4-step FID within 1.3× its teacher's best; and the
end-to-end speedup of those 4 steps (seconds per image, decoding included, measured in the same run) against the
teacher's best setting.
"""

from __future__ import annotations

from pathlib import Path

from . import sdxl
from .format import acc, fid, ratio_cell, target_verdict, verdict
from .results import load_report

PAIRS = (("emoji-flux", "emoji-flux-lcm-lora"), ("emoji-sd3", "emoji-sd3-lcm-lora"))
TEACHER_STEPS = {"euler": (4, 8, 28)}
GUIDANCE_SCALES = (1.0, 2.0, 3.0, 4.5)
TARGET = 1.3


def measure(models_dir: Path, settings, command: str = "") -> dict:
    """The section's numbers (empty when emoji-flux is not there); a pair whose weights the ``--reuse`` report
    measured keeps its rows."""
    previous = None
    if settings.reuse and Path(settings.reuse).is_file():
        previous = load_report(Path(settings.reuse), "give the bench.json of an earlier run to --reuse").flow
    return sdxl.measure(models_dir, settings, command, PAIRS, TEACHER_STEPS, GUIDANCE_SCALES, previous)


def _seconds(row: dict) -> str:
    s = row.get("seconds_per_image")
    return "" if s is None else f"{1000 * s:.1f}"


def section(report) -> list[str]:
    g = getattr(report, "flow", None) or {}
    if not g:
        return []
    lines = ["", "## Flow-matching pipelines: FLUX- and SD3-format teachers and their LCM-LoRAs", "",
             (f"Written by `{g['command']}`. " if g.get("command") else "") +
             "`emoji-flux` (`FluxPipeline`: FluxTransformer2DModel on 2×2-packed latents, CLIP pooled + T5 tokens) and "
             "`emoji-sd3` (`StableDiffusion3Pipeline`: SD3Transformer2DModel, CLIP-L + CLIP-G + T5) are rectified-flow "
             "teachers trained here on emoji-sd's VAE; each LCM-LoRA is LCD on the flow ODE training only LoRA weights "
             "(λ = 1, guidance 1, FlowMatchLCMScheduler's sampler). The teachers use classifier-free guidance "
             f"(FLUX's true CFG) over the grid s ∈ {{{', '.join(f'{x:g}' for x in GUIDANCE_SCALES)}}} × Euler "
             f"{'/'.join(str(n) for n in TEACHER_STEPS['euler'])} steps; the teacher's best is the lowest FID of that "
             f"grid. {g['num']} samples per point, the emoji ruler; ms/img is end to end (text encoders, sampling, VAE "
             f"decode), in this run. Target: the FLUX LoRA's 4-step FID ≤ {TARGET}× its teacher's best.", "",
             "| model | sampler | s | steps | NFE | FID | / teacher's best | acc. | ms/img |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    rows, pairs = sdxl.pair_rows(g["quality"], PAIRS, ("euler",), lambda name, sampler, r, ref: (
        f"| {name} | {sampler} | {r['guidance_scale']:g} | {r['steps']} | {r['nfe']} | {fid(r)} | {ratio_cell(r, ref)} "
        f"| {acc(r)} | {_seconds(r)} |"))
    verdicts = []
    for teacher_name, lora_name, where, ref, four in pairs:
        if four is None:
            continue
        speed = (f"; end to end {ref['seconds_per_image'] / four['seconds_per_image']:.1f}× faster than that best "
                 f"setting ({_seconds(ref)} against {_seconds(four)} ms/img)"
                 if ref.get("seconds_per_image") and four.get("seconds_per_image") else "")
        verdicts.append(f"`{lora_name}` at 4 steps: FID {fid(four)} = {ratio_cell(four, ref)} `{teacher_name}`'s best "
                        f"({fid(ref)}, {where}, s = {ref['guidance_scale']:g}): target ≤ {TARGET}× "
                        f"{target_verdict(four, ref, TARGET)}; against that best: {verdict(four, ref)}{speed}.")
    return lines + rows + [x for v in verdicts for x in ("", v)]
