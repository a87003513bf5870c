"""What a sampling run writes beside its pixels: prompts read from a file, and each image's record as PNG
text chunks, so an image says how it was made.

Each image carries two chunks: ``parameters``, AUTOMATIC1111's infotext (the prompt on the first line, then
``Negative prompt: …``, then ``Steps: 4, Sampler: euler, CFG scale: 3, Seed: 0, …``; a value holding a comma,
colon or newline is JSON-quoted, as A1111 does), which A1111's "PNG Info", ComfyUI and most image browsers
show; and ``fewstep``, the same record as JSON (prompt or label, negative prompt, seed, the image's index in
its run, steps, sampler, guidance, size, model, LoRAs, the command).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from ..errors import FewstepError
from ..models.handle import Model
from .generate import guidance_or_default


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line of a UTF-8 text file, surrounding whitespace stripped; blank lines and lines
    starting with ``#`` are skipped. A missing, unreadable or empty file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FewstepError(f"prompts file {path} {'is a folder' if path.is_dir() else 'does not exist'}; "
                           f"give a text file with one prompt per line")
    from ..io.validate import text_lines

    lines = text_lines(path, "prompts file")    # a BOM dropped; U+2028 in a prompt is not a line break; size-capped
    lines = [line.replace("\u2028", " ").replace("\u2029", " ") for line in lines]   # inside a line: a space
    prompts = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not prompts:
        raise FewstepError(f"prompts file {path} has no prompts (blank lines and # comments are skipped)")
    return prompts


def run_settings(model: Model, steps: int | None, sampler: str | None, guidance_scale: float | None,
                 sigmas: Sequence[float] | None = None, eta: float | None = None) -> dict[str, Any]:
    """The steps, sampler and guidance scale a run of ``model`` uses, its defaults filled in (what
    :func:`fewstep.sampling.generate.generate` resolves), and TCD's γ (``eta``) where the sampler is tcd."""
    settings = {"steps": len(sigmas) if sigmas is not None else steps or model.config.default_steps,
                "sampler": sampler or model.config.default_sampler,
                "guidance_scale": guidance_or_default(model, guidance_scale)}
    if settings["sampler"] == "tcd":
        from ..core.solvers import TCD_GAMMA

        settings["eta"] = TCD_GAMMA if eta is None else eta
    if sigmas is not None:
        settings["sigmas"] = list(sigmas)
    return settings


def image_records(handle: Model, cond: Any, n: int, seed: int, settings: dict[str, Any], size: tuple[int, int],
                  negative_prompt: str | None = None, **extra: Any) -> list[dict[str, Any]]:
    """One record per image of a run of the model ``handle``: its prompt or label (and class name), the run's
    settings and seed, the image's index in the run (which block of the seed's noise it got:
    :mod:`fewstep.sampling.generate`), and ``extra`` (the model's path, LoRAs, the command)."""
    height, width = size
    out = []
    for i in range(n):
        record: dict[str, Any] = {}
        if cond is not None and handle.conditioner.text:
            record["prompt"] = cond[i]
            if negative_prompt is not None:
                record["negative_prompt"] = negative_prompt
        elif cond is not None:
            label = int(cond[i])
            record.update(label=label, class_name=handle.conditioner.class_names[label])
        out.append({**record, "seed": seed, "index": i, **settings, "width": width, "height": height, **extra})
    return out


def _quote(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def parameters_text(record: dict[str, Any]) -> str:
    """AUTOMATIC1111's infotext of a record (module docstring)."""
    first = record.get("prompt")
    if first is None:
        first = f"label {record['label']} ({record['class_name']})" if "label" in record else "(unconditional)"
    lines = [first]
    if record.get("negative_prompt") is not None:
        lines.append(f"Negative prompt: {record['negative_prompt']}")
    fields = {"Steps": record["steps"], "Sampler": record["sampler"], "CFG scale": record["guidance_scale"],
              "Seed": record["seed"], "Image index": record["index"],
              "Size": f"{record['width']}x{record['height']}", "Model": record.get("model")}
    if record.get("loras"):
        fields["LoRAs"] = ", ".join(record["loras"])
    if record.get("sigmas"):
        fields["Sigmas"] = ", ".join(f"{s:g}" for s in record["sigmas"])
    fields["Version"] = f"fewstep {record.get('version', '')}".strip()
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)


def png_text(record: dict[str, Any]) -> dict[str, str]:
    """The PNG text chunks of one image: ``parameters`` (A1111) and ``fewstep`` (JSON)."""
    return {"parameters": parameters_text(record), "fewstep": json.dumps(record, ensure_ascii=False)}
