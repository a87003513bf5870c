"""The LCM-LoRA section of ``fewstep bench`` (Luo et al. 2023b on the emoji pipeline).

Measures, with the emoji ruler, the bench's sample count and seed:
- acceleration: ``emoji-sd`` + ``emoji-lcm-lora`` (fused, λ = 1) at 1, 2, 4, 8 steps, beside the teacher's
  25-step DPM-Solver++ and the full LCD model ``emoji-lcm`` at the same guidance scale; target: 4-step FID
  within 1.3× the teacher's 25-step figure;
- style + acceleration with no training: ``emoji-style-lora`` (fine-tuned on one Unicode group) merged with
  the LCM-LoRA, at 4 and 2 steps, against the style LoRA alone at 25, 4 and 2 DPM-Solver++ steps; style
  measure = FID to that group (prompts = the group's captions) and the share classified into the group;
  target: the merge within 1.3× of the 25-step style model, the few-step style model far worse;
- cost: trainable parameters as a share of the UNet, and time and memory per iteration of LCM-LoRA
  against full LCD, each measured in a fresh subprocess side by side (:func:`iteration_cost`);
- the target-network ablation, rendered from ``bench/results/lcm_lora_ablation.json`` when
  ``bench/lcm_lora_ablation.py`` has written it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ..eval.evaluate import ruler_for
from ..models.folders import load_model
from ..models.loras import apply_loras, lora_info
from .format import acc, fid, ratio_cell, target_met, teacher_best
from .measure import quality_rows

TEACHER, LCM, LCM_LORA, STYLE = "emoji-sd", "emoji-lcm", "emoji-lcm-lora", "emoji-style-lora"
ABLATION = "lcm_lora_ablation.json"   # written by bench/lcm_lora_ablation.py beside bench.json


def measure(models_dir: Path, settings, command: str = "", teacher_rows: dict | None = None) -> dict:
    """The section's numbers (empty when the LoRAs are not there)."""
    if not all((models_dir / n).is_dir() for n in (TEACHER, LCM_LORA, STYLE)):
        return {}
    num, seed = settings.num, settings.seed
    base = load_model(models_dir / TEACHER)
    ruler = ruler_for(base, models_dir)
    s = 1.0                                          # LCM-LoRA is used at guidance 1–2; its teacher at its default
    s_teacher = base.config.default_guidance_scale
    out: dict = {"command": command, "features": ruler.name, "num": num, "quality": {}, "style": {}, "guidance_scale": s,
                 "teacher_guidance_scale": s_teacher, "lcm_lora": lora_info(models_dir / LCM_LORA),
                 "style_lora": lora_info(models_dir / STYLE)}

    def rows(model, steps, sampler, guidance, r=ruler, n=num):
        return quality_rows(model, r, steps, sampler, guidance, n, seed)

    accel = apply_loras(load_model(models_dir / TEACHER), [(models_dir / LCM_LORA, 1.0)])
    out["quality"][f"{LCM_LORA}/consistency"] = rows(accel, (1, 2, 4, 8), "consistency", s)
    out["quality"][f"{TEACHER}/dpmpp-2m"] = (teacher_rows or {}).get("dpmpp-2m") or rows(base, (25,), "dpmpp-2m", s_teacher)
    if (models_dir / LCM).is_dir():
        lcm = load_model(models_dir / LCM)
        out["quality"][f"{LCM}/consistency"] = rows(lcm, (4,), "consistency", lcm.config.default_guidance_scale)

    group = out["style_lora"]["dataset"].split(":", 1)[1]
    sub = ruler.data.of_class(group)     # the ruler holds the whole emoji set already
    style_ruler = ruler.on(sub)
    style = apply_loras(load_model(models_dir / TEACHER), [(models_dir / STYLE, 1.0)])
    merged = apply_loras(load_model(models_dir / TEACHER), [(models_dir / STYLE, 1.0), (models_dir / LCM_LORA, 1.0)])
    half = max(num // 2, 10)
    out["style"] = {"group": group, "size": len(sub), "num": half,
                    "style_25": rows(style, (25,), "dpmpp-2m", s_teacher, style_ruler, half)[0],
                    "style_4": rows(style, (4,), "dpmpp-2m", s_teacher, style_ruler, half)[0],
                    "style_2": rows(style, (2,), "dpmpp-2m", s_teacher, style_ruler, half)[0],
                    "merged_4": rows(merged, (4,), "consistency", s, style_ruler, half)[0],
                    "merged_2": rows(merged, (2,), "consistency", s, style_ruler, half)[0],
                    "base_25": rows(base, (25,), "dpmpp-2m", s_teacher, style_ruler, half)[0]}
    for k, v in out["style"].items():
        if isinstance(v, dict):
            print(f"style {k}: FID {v['fid']:.3f} acc {v['cond_accuracy']:.3f}", flush=True)
    out["cost"] = iteration_cost(models_dir / TEACHER, out["lcm_lora"].get("rank", 8))
    return out


def iteration_cost(teacher: Path, rank: int, steps: int = 12, batch: int = 64) -> dict:
    """Seconds per iteration (median of the last steps) and peak resident memory of LCD and LCM-LoRA,
    each in a fresh subprocess (so the peaks are their own), one after the other in this run."""
    out = {}
    for method in ("lcd", "lcm-lora"):
        code = (f"import json; from fewstep.bench.lora import cost_run; "
                f"print(json.dumps(cost_run({str(teacher)!r}, {method!r}, {rank}, {steps}, {batch})))")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        out[method] = json.loads(result.stdout.strip().splitlines()[-1])
        print(f"cost {method}: {out[method]}", flush=True)
    return out


def cost_run(teacher: str, method: str, rank: int, steps: int, batch: int, images: int = 512) -> dict:
    """One short LCD / LCM-LoRA run on the first ``images`` emoji (in a temporary folder, single-threaded):
    the median wall-clock of its iterations after the first two, its trainable parameters, its peak RSS."""
    import resource
    import statistics
    import tempfile

    import torch

    from ..methods.lcm import LCMSettings, distill_lcm
    from ..models.data import load_emoji
    from ..training import TrainConfig

    torch.set_num_threads(1)
    data = load_emoji()
    data = data.subset(torch.arange(min(images, len(data))))
    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(out_dir=f"{tmp}/work", max_steps=steps, batch_size=batch, log_every=1,
                             checkpoint_every=10**9, progress=False)
        folder = distill_lcm(load_model(teacher), data, f"{tmp}/out", config, LCMSettings(method=method, lora_rank=rank))
        times = [json.loads(line)["time"] for line in (Path(tmp) / "work" / "metrics.jsonl").read_text().splitlines()]
        if method == "lcm-lora":
            trainable = json.loads((folder / "fewstep.json").read_text())["trainable_parameters"]
        else:
            trainable = sum(p.numel() for p in load_model(folder).unet.parameters())
    return {"trainable": trainable, "seconds_per_iteration": statistics.median(b - a for a, b in zip(times[2:], times[3:])),
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "images": len(data)}


def section(report, results: Path) -> list[str]:
    g = getattr(report, "lora", None) or {}
    if not g:
        return []
    q, st = g["quality"], g["style"]
    where, ref = teacher_best({**(getattr(report, "latent", None) or {}).get("quality", {}), **q}, TEACHER)
    accel = {r["steps"]: r for r in q[f"{LCM_LORA}/consistency"]}
    info = g["lcm_lora"]
    frac = info["trainable_parameters"] / info["base_parameters"]
    lines = ["", "## LCM-LoRA (Luo et al. 2023b) on the emoji pipeline", "",
             (f"Written by `{g['command']}`. " if g.get("command") else "") +
             f"`{LCM_LORA}`: rank {info['rank']}, {info['trainable_parameters']:,} trainable parameters = "
             f"{100 * frac:.1f}% of the UNet (target ≤ 10%), `{info['training']['command']}`. Fused into `{TEACHER}` "
             f"(λ = 1) and sampled with LCM's multistep sampler at guidance scale {g['guidance_scale']:g}; the teacher "
             f"at its own s = {g['teacher_guidance_scale']:g}. {g['num']} samples per point. The teacher's best: FID "
             f"{fid(ref)} ({where}), its lowest over every sampler and step count measured. Target: 4-step FID within "
             f"1.3× the teacher's best (≤ {1.3 * ref['fid']:.3f}).", "",
             "| model | steps | NFE | FID | / teacher's best | acc. |", "|---|---:|---:|---:|---:|---:|",
             f"| {TEACHER} ({where}) | {ref['steps']} | {ref['nfe']} | {fid(ref)} | 1.00 | {acc(ref)} |"]
    for n, r in sorted(accel.items()):
        lines.append(f"| {TEACHER} + {LCM_LORA} | {n} | {r['nfe']} | {fid(r)} | {ratio_cell(r, ref)} | "
                     f"{acc(r)} |")
    for r in q.get(f"{LCM}/consistency", []):
        lines.append(f"| {LCM} (full LCD) | {r['steps']} | {r['nfe']} | {fid(r)} | {ratio_cell(r, ref)} | "
                     f"{acc(r)} |")
    if 4 in accel:
        lines += ["", f"4 steps: {ratio_cell(accel[4], ref)} the teacher's best "
                  f"(≤ 1.3×: {target_met(accel[4], ref, 1.3)})."]
    s25, s4, m4, b25 = st["style_25"], st["style_4"], st["merged_4"], st["base_25"]
    sinfo = g["style_lora"]
    lines += ["", f"Style + acceleration with no training: `{STYLE}` (rank {sinfo['rank']}, fine-tuned on the "
              f"{st['size']} emoji of \"{st['group']}\", `{sinfo['training']['command']}`) merged with `{LCM_LORA}`. "
              f"Style measure: FID to those {st['size']} emoji and the share of samples classified into the group, "
              f"{st['num']} samples with the group's captions as prompts. Target: the merge at 4 steps within 1.3× the "
              f"style model's 25-step FID ({target_met(m4, s25, 1.3)}: "
              f"{ratio_cell(m4, s25)}).", "",
              "| model | sampler, steps | style FID | in the group |", "|---|---|---:|---:|",
              f"| {TEACHER} (no style) | DPM-Solver++, 25 | {fid(b25)} | {acc(b25)} |",
              f"| {TEACHER} + {STYLE} | DPM-Solver++, 25 | {fid(s25)} | {acc(s25)} |",
              f"| {TEACHER} + {STYLE} | DPM-Solver++, 4 | {fid(s4)} | {acc(s4)} |",
              f"| {TEACHER} + {STYLE} + {LCM_LORA} | LCM, 4 | {fid(m4)} | {acc(m4)} |"]
    if "merged_2" in st:
        s2, m2 = st["style_2"], st["merged_2"]
        lines += [f"| {TEACHER} + {STYLE} | DPM-Solver++, 2 | {fid(s2)} | {acc(s2)} |",
                  f"| {TEACHER} + {STYLE} + {LCM_LORA} | LCM, 2 | {fid(m2)} | {acc(m2)} |",
                  "", f"The style model alone at 4 DPM-Solver++ steps is {ratio_cell(s4, s25)} its 25-step FID "
                  f"(this tiny teacher's 8×8 latent ODE is nearly solved in 4 steps); at 2 steps it is "
                  f"{ratio_cell(s2, s25)}, the merge {ratio_cell(m2, s25)}."]
    c = g.get("cost")
    if c:
        lines += ["", "Training cost per iteration (batch 64, one thread, each in a fresh process, measured one after "
                  f"the other in this run, on the first {c['lcd'].get('images', 3655)} emoji). Peak = the process's "
                  "maximum resident memory; training state = what training keeps beyond the frozen teacher UNet, "
                  "counted from the trainable parameters: their weights, gradients, two Adam moments, weight EMA and "
                  "target EMA, 6 × 4 bytes each (LCD's student is a second UNet; LCM-LoRA's teacher is its own UNet "
                  "with the adapters off and its target a second adapter).", "",
                  "| method | trainable parameters | s / iteration | peak memory (MB) | training state (MB) |",
                  "|---|---:|---:|---:|---:|"]
        for m in ("lcd", "lcm-lora"):
            r = c[m]
            lines.append(f"| {m} | {r['trainable']:,} | {r['seconds_per_iteration']:.3f} | {r['peak_mb']:.0f} | "
                         f"{6 * 4 * r['trainable'] / 2 ** 20:.1f} |")
        lines += ["", "At this size the process peaks are set by the libraries, the pipeline and data loading, not by "
                  f"training, so they do not separate the methods; the training state does "
                  f"({c['lcd']['trainable'] / c['lcm-lora']['trainable']:.0f}× smaller for LCM-LoRA), and it is what grows with the UNet (Adam state for 860M SD-1.5 weights alone is 6.9 GB "
                  "in fp32). LoRA's extra matmuls cost more time than the backward pass they save on a "
                  "1.5M-parameter UNet; the time advantage is a large-UNet effect too."]
    lines += ablation_section(json.loads((results / ABLATION).read_text()) if (results / ABLATION).exists() else None)
    return lines


def ablation_section(ab: dict | None) -> list[str]:
    """``bench/lcm_lora_ablation.py``'s table: FID along training for the online and the EMA target."""
    if not ab:
        return []
    steps = sorted({p["step"] for r in ab["runs"] for p in r["points"]})
    lines = ["", f"### LCM-LoRA's target network ({ab['budget']})", "",
             f"Written by `{ab['command']}`. FID at 4 / 2 LCM steps (guidance 1), {ab['num']} samples, per checkpoint "
             "of the EMA adapter. μ = 0 is diffusers' LoRA script (the online student under stop-gradient), μ = 0.95 "
             "its full-LCD script and fewstep's default.", "",
             "| target μ | " + " | ".join(f"step {n}" for n in steps) + " |", "|---|" + "---:|" * len(steps)]
    for r in ab["runs"]:
        at = {p["step"]: p for p in r["points"]}
        lines.append(f"| {r['target_ema']:g} | " + " | ".join(
            f"{at[n]['fid_4']:.3f} / {at[n]['fid_2']:.3f}" if n in at else "–" for n in steps) + " |")
    return lines
