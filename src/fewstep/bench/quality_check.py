"""The quality check CI runs: every shipped generator's FID at 200 samples, recorded with its spread.

``fewstep bench --only quality-check`` samples each shipped model (every folder of ``models/`` that generates: a
model, or a LoRA on its base) with its own sampler and guidance scale at min(its default steps, 4), 200 samples,
seed 0, scores them on its data set's ruler and records FID ± its bootstrap spread and the accuracy in bench.json
(BENCHMARKS "Quality check"). ``tests/test_quality_check.py`` samples them again on every CI run and fails where
a model's FID leaves its recorded spread: a sampler, a loader, a ruler or a weight file that changed what the
shipped models make. The recorded figure is a regression reference at 200 samples, not the model's quality (its
BENCHMARKS section has that, at more samples); classifiers, feature networks and the tiny VAE make no images of
their own and are not in it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..eval.evaluate import Ruler, dataset_ruler
from ..io.validate import load_json
from ..models.folders import load_model
from ..models.handle import Model
from ..models.loras import LORA_FILE, apply_loras
from ..models.tiny_vae import KIND as TINY_VAE
from .measure import quality_rows

NUM, SEED, MAX_STEPS = 200, 0, 4


@dataclass(frozen=True)
class Check:
    """One shipped generator: a model folder, or a LoRA folder applied (λ = 1) to its base."""

    name: str
    folder: Path
    base: Path | None = None

    def model(self) -> Model:
        if self.base is None:
            return load_model(self.folder)
        return apply_loras(load_model(self.base), [(self.folder, 1.0)])


def shipped(models_dir: Path) -> list[Check]:
    """Every generator among ``models_dir``'s folders (module docstring), by name: a LoRA folder (it holds
    :data:`fewstep.models.loras.LORA_FILE`) whose base is shipped too, or a model folder (any other fewstep.json but a
    tiny autoencoder's)."""
    found = []
    for folder in sorted(p for p in models_dir.iterdir() if (p / "fewstep.json").is_file()):
        info = load_json(folder / "fewstep.json", "a model's fewstep.json (a JSON object)")
        base = models_dir / Path(info.get("base", "")).name
        if not (folder / LORA_FILE).is_file():
            found += [Check(folder.name, folder)] if info.get("kind") != TINY_VAE else []
        elif base.is_dir():
            found.append(Check(folder.name, folder, base))
    return found


def check_row(check: Check, models_dir: Path, num: int = NUM, seed: int = SEED) -> dict:
    """The check's one row (sampler, guidance and steps the model's own, steps capped at :data:`MAX_STEPS`)."""
    model = check.model()
    steps = min(model.config.default_steps, MAX_STEPS)
    row = quality_rows(model, _ruler(models_dir, model.config.dataset.split(":")[0]), [steps], None, None, num, seed,
                       name=check.name)[0]
    return {k: row[k] for k in ("steps", "sampler", "guidance_scale", "fid", "fid_std", "cond_accuracy",
                                "cond_accuracy_std")}


@lru_cache(maxsize=4)
def _ruler(models_dir: Path, dataset: str) -> Ruler:
    """One ruler per data set for all the checks (its reference features take seconds)."""
    return dataset_ruler(dataset, models_dir)


def measure(models_dir: Path, settings, command: str = "") -> dict:
    """Every shipped generator's row (200 samples, seed 0, whatever ``settings`` say)."""
    return {"command": command, "num": NUM, "seed": SEED,
            "rows": {c.name: check_row(c, models_dir) for c in shipped(models_dir)}}


def section(report) -> list[str]:
    g = getattr(report, "quality_check", None) or {}
    if not g:
        return []
    lines = ["", "## Quality check (CI)", "",
             f"Written by `{g['command']}`. Each shipped generator at its own sampler and guidance, min(default steps, "
             f"{MAX_STEPS}) steps, {g['num']} samples, seed {g['seed']}: the reference `tests/test_quality_check.py` "
             "checks on every CI run (FID within the recorded spread). A regression reference at 200 samples, not the "
             "models' quality (their sections have that).", "",
             "| model | sampler | s | steps | FID | accuracy |", "|---|---|---:|---:|---:|---:|"]
    for name, r in g["rows"].items():
        accuracy = "–" if r["cond_accuracy"] is None else f"{r['cond_accuracy']:.3f} ± {r['cond_accuracy_std']:.3f}"
        lines.append(f"| {name} | {r['sampler']} | {r['guidance_scale']:g} | {r['steps']} | {r['fid']:.3f} ± "
                     f"{r['fid_std']:.3f} | {accuracy} |")
    return lines
