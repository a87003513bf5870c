"""What a bench run keeps: its settings and ``bench.json`` (:class:`BenchReport`), read back for --reuse."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FewstepError


@dataclass
class BenchSettings:
    teacher: str = "digits-teacher"
    num: int = 1000             # samples per quality point
    seed: int = 0
    timing_batch: int = 64      # images per batch for the speed table
    timing_repeats: int = 5     # median of this many timed runs
    quick: bool = False
    reuse: str | None = None    # a previous bench.json: its teacher quality rows are reused if num and seed match
    edit_models: tuple[str, ...] = ("digits-cd",)  # zero-shot editing is measured on these (and the teacher)
    edit_num: int = 200         # real images per editing measurement

    @classmethod
    def quick_settings(cls) -> "BenchSettings":
        return cls(num=100, timing_repeats=2, quick=True, edit_num=50)


@dataclass
class BenchReport:
    settings: dict
    machine: str
    date: str
    command: str
    quality: dict[str, list[dict]] = field(default_factory=dict)   # "model/sampler" -> EvalResult rows
    speed: list[dict] = field(default_factory=list)
    speedup: list[dict] = field(default_factory=list)
    costs: dict[str, dict] = field(default_factory=dict)            # distilled model -> training cost
    editing: dict[str, dict] = field(default_factory=dict)          # model -> fewstep.eval.editing.edit_metrics
    guided: dict = field(default_factory=dict)                      # bench.guided: Meng et al. 2023 on digits
    guided_latent: dict = field(default_factory=dict)               # bench.guided_latent: stage 1 on emoji-sd
    latent: dict = field(default_factory=dict)                      # bench.latent: Luo et al. 2023
    lora: dict = field(default_factory=dict)                        # bench.lora: Luo et al. 2023b
    ruler: dict = field(default_factory=dict)                       # bench.ruler: the emoji ruler checked on itself
    quality_check: dict = field(default_factory=dict)               # bench.quality_check: CI's reference rows
    emoji_pixel: dict = field(default_factory=dict)                 # bench.testbed: the emoji pixel testbed
    serve: dict = field(default_factory=dict)                       # bench.serve: fewstep serve, the tiny VAE
    sdxl: dict = field(default_factory=dict)                        # bench.sdxl: the SDXL-format teacher, LCM-LoRA
    flow: dict = field(default_factory=dict)                        # bench.flow: FLUX/SD3-format teachers, LCM-LoRAs
    tcd: dict = field(default_factory=dict)                         # bench.tcd: TCD-LoRA against LCM-LoRA
    remeasured: dict = field(default_factory=dict)                  # --only digits: {"command", "date"}


OLD_FEATURES = "emoji-classifier"   # what emoji sections were scored on before they recorded it


def features_of(section: dict) -> str:
    """The network whose features scored a section's FIDs (its "features"; sections from before the feature network
    recorded none: the group classifier's)."""
    return section.get("features", OLD_FEATURES)


def load_report(bench_json: Path, missing: str) -> BenchReport:
    """A saved bench.json (keys this version does not know are dropped); ``missing`` says what to do."""
    if not bench_json.is_file():
        raise FewstepError(f"no report at {bench_json}: {missing}")
    try:
        old = json.loads(bench_json.read_text())
        return BenchReport(**{k: v for k, v in old.items() if k in BenchReport.__dataclass_fields__})
    except (ValueError, TypeError, AttributeError) as e:
        raise FewstepError(f"{bench_json} is not a fewstep bench report ({e}); give the bench.json a run wrote") from None


def folder_digest(folder: Path) -> str:
    """A digest of a model or LoRA folder's weight files: rows measured on these weights stay valid."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(Path(folder).rglob("*.safetensors")):
        h.update(f.relative_to(folder).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def reusable_rows(rows: list[dict] | None, steps) -> list[dict] | None:
    """Saved quality rows when they are at exactly these step counts and have their spreads (rows from before
    spreads were measured are measured again); None otherwise."""
    if rows and [r["steps"] for r in rows] == list(steps) and all("fid_std" in r for r in rows):
        return rows
    return None
