"""The "Full size on 24 GB" section: LCD and LCM-LoRA on random-weight SD-1.5- and SDXL-architecture pipelines
(``bench/full_size.py`` → full_size.json), peak memory, seconds per step and checkpoint size, side by side."""

from __future__ import annotations

import json
from pathlib import Path

ARCH = {"sd15": "SD 1.5", "sdxl": "SDXL"}


def section(results: Path) -> list[str]:
    path = results / "full_size.json"
    if not path.exists():
        return []
    f = json.loads(path.read_text())
    params = f.get("parameters") or {"sd15": f["unet_parameters"]}
    archs = " and ".join(f"the {ARCH[a]} architecture (UNet {n / 1e6:.1f}M parameters)" for a, n in params.items() if n)
    lines = ["", "## Full size on 24 GB", "",
             f"Written by `{f['command']}` on {f['date']}. Random-weight pipelines of "
             f"{archs}, built offline: memory, speed and plumbing only, never quality. Each run "
             "is a real `fewstep distill` at 256² (32² latents), batch 1, on four captioned emoji, in its own process; "
             "peak = the largest resident set of its process tree, and a run that passes the limit is killed there "
             "(it does not fit).", "",
             "| architecture | run | peak memory | fits in 24 GB | s / step | torch threads | checkpoint | note |",
             "|---|---|---:|---|---:|---:|---:|---|"]
    for r in f["runs"]:
        peak = f"> {r['killed_at_gb']:g} GiB (killed)" if r.get("killed_at_gb") else f"{r['peak_gb']:.1f} GiB"
        fits = "yes" if r["fits"] else "no"
        step = f"{r['seconds_per_step']:.0f}" if r.get("seconds_per_step") else "–"
        ckpt = f"{r['checkpoint_mb'] / 1024:.2f} GB" if r.get("checkpoint_mb", 0) >= 1024 else (
            f"{r['checkpoint_mb']:.0f} MB" if r.get("checkpoint_mb") else "–")
        note = r.get("note") or (_refusal(r.get("log_tail", "")) if not r["fits"] else "")
        threads = r.get("threads", f.get("threads", "–"))   # files from before rows had their own: the file's
        lines.append(f"| {ARCH[r.get('arch', 'sd15')]} | `{r['name']}` | {peak} | {fits} | {step} | {threads} | {ckpt} | {note} |")
    lines += ["", conclusion(f)]
    return lines + ["", "Commands: `" + "`; `".join(r["command"] for r in f["runs"]) + "`."] + flow_section(results)


def conclusion(f: dict) -> str:
    """What the rows say, per architecture: which runs fit (peak, s/step), which do not (killed where, or refused
    at start), and which runs ``bench/full_size.py`` plans that have no row (not measured here)."""
    parts = []
    for arch in dict.fromkeys(r.get("arch", "sd15") for r in f["runs"]):
        rows = [r for r in f["runs"] if r.get("arch", "sd15") == arch]
        fit = [f"`{r['name']}` (peak {r['peak_gb']:.1f} GiB" + (f", {r['seconds_per_step']:.0f} s/step)"
                                                                 if r.get("seconds_per_step") else ")")
               for r in rows if r["fits"]]
        unfit = [f"`{r['name']}` (" + (f"killed past {r['killed_at_gb']:g} GiB)" if r.get("killed_at_gb") else
                                       "refused at start)" if r.get("returncode") == 2 else f"exit {r.get('returncode')})")
                 for r in rows if not r["fits"]]
        parts.append(f"{ARCH[arch]}: fits — {', '.join(fit) or 'none'}; does not fit in this machine's memory — "
                     f"{', '.join(unfit) or 'none'}.")
    missing = [n for n in f.get("planned", []) if n not in {r["name"] for r in f["runs"]}]
    if missing:
        parts.append("Not measured here (planned by `bench/full_size.py`, no row yet; the bf16 runs need a GPU: this "
                     "CPU has no native bf16 convolutions): " + ", ".join(f"`{n}`" for n in missing) + ".")
    return "Computed from the rows above. " + " ".join(parts)


def _refusal(log: str) -> str:
    """A refused run's one line, as the user saw it."""
    line = next((x for x in log.splitlines() if x.startswith("fewstep: error:")), "")
    return f"refused at start in {len(line) and 1} line: “{line.removeprefix('fewstep: error: ')}”" if line else ""


def flow_section(results: Path) -> list[str]:
    """FLUX.1-dev and SD3.5-medium: each run's weights per process, unsharded and under FSDP, from parameter counts
    (``bench/flow_memory.py`` → flow_memory.json), and what fewstep's memory check says to it here."""
    path = results / "flow_memory.json"
    if not path.exists():
        return []
    f = json.loads(path.read_text())
    p = f["parameters"]
    names = {"flux": "FLUX.1-dev", "sd3.5-medium": "SD3.5-medium"}
    lines = ["", "### FLUX.1-dev and SD3.5-medium: what one machine holds, what FSDP would need", "",
             f"Written by `{f['command']}` on {f['date']}, from the parameter counts of the published architectures "
             "built on the meta device (no weights: a FLUX.1 transformer alone is "
             f"{4 * p['flux']['transformer'] / 2 ** 30:.0f} GiB in fp32): "
             + "; ".join(f"{names[k]} transformer {v['transformer'] / 1e9:.2f}B parameters (largest block "
                         f"{v['unit'] / 1e6:.0f}M, rank-{f['rank']} LoRA {v['lora'] / 1e6:.0f}M), text encoders "
                         f"{v['text_encoders'] / 1e9:.2f}B" for k, v in p.items())
             + ". GiB per process of weights, gradients, Adam moments, EMA and target (fp32), the frozen teacher or base "
             "(bf16, sharded with the student) and the text encoders and VAE (bf16, whole on every process); "
             "activations come on top. This machine had "
             f"{f['available_bytes'] / 2 ** 30:.1f} GiB free.", "",
             "| model | run | " + " | ".join(f"{n} process{'es' if n > 1 else ''}" for n in f["processes"])
             + " | here (fewstep's memory check) |",
             "|---|---|" + "---:|" * len(f["processes"]) + "---|"]
    for r in f["runs"]:
        cells = " | ".join(f"{r['bytes'][str(n)] / 2 ** 30:.1f}" for n in f["processes"])
        lines.append(f"| {names[r['family']]} | {r['run']} | {cells} | {r['refusal'] or 'fits'} |")
    return lines
