"""Training checkpoints: ``step-NNNNNNN`` folders of safetensors + JSON (model, EMA, optimizer, objective state, the
step and the run's config), written atomically, the last ``keep_checkpoints`` kept, loaded for an exact resume;
under FSDP gathered to full tensors on save and cut back to each process's shard on load."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

from diffusers.training_utils import EMAModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import FewstepError
from ..io.atomic import allow_replacing, atomic_path, read_marker
from ..io.specs import check_checkpoint_state, metrics_records
from ..io.validate import load_json
from .config import TrainConfig
from .optimizers import flat_state, nested_state
from .runs import check_resume
from .sharding import gathered, scattered


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint folder (``step-0001000``) under ``root``, or None."""
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step-*") if is_checkpoint(p))    # never a user's folder of that name
    return done[-1] if done else None


def save_checkpoint(root: Path, step: int, model: nn.Module, optimizer, ema: EMAModel | None, objective,
                    config: TrainConfig, elapsed: float = 0.0, names: set[str] | None = None,
                    write: bool = True) -> Path | None:
    """Write ``root/step-NNNNNNN`` atomically (temporary folder, then rename); keep the last K. ``names``:
    the model's entries to keep (default all; :func:`fewstep.training.loop._saved_names`). Sharded tensors (FSDP) are gathered to full
    ones first (:func:`fewstep.training.sharding.gathered`: every process calls this, only the one with ``write``
    keeps them and writes)."""
    state_dict = model.state_dict() if names is None else {k: v for k, v in model.state_dict().items() if k in names}
    state_dict = gathered(state_dict, keep=write)
    ema_state = ema.state_dict() if ema is not None else {"shadow_params": []}
    shadow = gathered({f"shadow.{i}": p.detach() for i, p in enumerate(ema_state.pop("shadow_params"))}, keep=write)
    opt_state = optimizer.state_dict()
    opt_tensors, opt_values = flat_state(opt_state["state"])
    opt_tensors = gathered(opt_tensors, keep=write)
    objective_state = gathered(objective.state_dict(), keep=write) if hasattr(objective, "state_dict") else None
    if not write:
        return None
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    legacy = [final] if is_checkpoint(final) else []      # one written before markers: fewstep's own too
    with allow_replacing(*legacy), atomic_path(final, directory=True, kind="checkpoint") as tmp:
        save_file(contiguous(state_dict), tmp / "model.safetensors")
        save_file({k: p.contiguous() for k, p in shadow.items()}, tmp / "ema.safetensors")
        save_file(contiguous(opt_tensors), tmp / "optimizer.safetensors")   # 8-bit AdamW shares its quantization maps
        if objective_state is not None:
            save_file(contiguous(objective_state), tmp / "objective.safetensors")
        state = {"step": step, "elapsed_seconds": elapsed, "config": asdict(config), "ema": ema_state if ema else None,
                 "partial": names is not None,
                 "optimizer_param_groups": opt_state["param_groups"], "optimizer_values": opt_values}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
    for old in sorted(p for p in root.glob("step-*") if is_checkpoint(p))[: -config.keep_checkpoints]:
        shutil.rmtree(old)                                  # only checkpoints fewstep wrote, never another folder
    return final


def is_checkpoint(folder: Path) -> bool:
    """A checkpoint folder fewstep wrote: marked so (:func:`fewstep.io.atomic.read_marker`), or written before
    markers existed, with a state.json holding what :func:`save_checkpoint` writes (not the name alone)."""
    if not folder.is_dir():
        return False
    marker = read_marker(folder)
    if marker is not None:
        return marker.get("kind") == "checkpoint" and (folder / "state.json").is_file()
    try:
        state = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and {"step", "config", "optimizer_param_groups"} <= set(state)


def load_checkpoint(path: Path, model: nn.Module, optimizer, ema: EMAModel | None, objective,
                     config: TrainConfig, names: set[str] | None = None) -> tuple[int, float]:
    try:
        state = load_json(path / "state.json", "a checkpoint's state.json (a JSON object)", require_object=False)
    except (OSError, ValueError, FewstepError) as e:
        raise FewstepError(f"cannot resume from checkpoint {path}: {e}. Delete it to resume from an earlier one.") from None
    if not isinstance(state, dict) or not isinstance(state.get("config", {}), dict):
        raise FewstepError(f"cannot resume from checkpoint {path}: its state.json is not fewstep's. Delete it to resume "
                           f"from an earlier one.")
    check_checkpoint_state(state, path / "state.json", int(path.name.rpartition("-")[2]))
    saved = {**asdict(TrainConfig()), **state.get("config", {})}    # a field newer than the checkpoint: its default
    check_resume(json.loads(json.dumps(saved)), json.loads(json.dumps(asdict(config))), path, config.force_resume)
    try:
        weights = load_file(path / "model.safetensors")
        if names is not None and set(weights) != names:
            raise ValueError(f"it holds {len(weights)} tensors where this run trains {len(names)}")
        model.load_state_dict(scattered(weights, model.state_dict()), strict=names is None)   # FSDP: this one's shard
        if ema is not None:
            shadow = load_file(path / "ema.safetensors")
            keys = [f"shadow.{i}" for i in range(len(shadow))]
            shadow = scattered(shadow, dict(zip(keys, ema.shadow_params)))
            ema.load_state_dict({**state["ema"], "shadow_params": [shadow[k] for k in keys]})
        opt_tensors = load_file(path / "optimizer.safetensors")
        owners = [p for group in optimizer.param_groups for p in group["params"]]
        opt_tensors = scattered(opt_tensors, {k: owners[int(k.split(".")[0])] for k, v in opt_tensors.items()
                                              if int(k.split(".")[0]) < len(owners)
                                              and v.shape == owners[int(k.split(".")[0])].shape})   # Adam's moments
        opt_state = nested_state(opt_tensors, state.get("optimizer_values", {}))
        optimizer.load_state_dict({"state": opt_state, "param_groups": state["optimizer_param_groups"]})
        if hasattr(objective, "load_state_dict") and (path / "objective.safetensors").exists():
            own = objective.state_dict() if hasattr(objective, "state_dict") else {}
            objective.load_state_dict(scattered(load_file(path / "objective.safetensors"), own))
    except (OSError, KeyError, ValueError, RuntimeError, SafetensorError) as e:
        raise FewstepError(f"cannot resume from checkpoint {path}: {e}. Delete it to resume from an earlier one.") from None
    return int(state["step"]), float(state.get("elapsed_seconds", 0.0))


def contiguous(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """``sd`` as safetensors takes it: contiguous, no two entries on one storage (tied weights are copied, the
    rest written in place, so a checkpoint of a full-size UNet does not hold a second copy in memory)."""
    seen, out = set(), {}
    for k, v in sd.items():
        t = v.detach().contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[k] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


def truncate_log(path: Path, step: int) -> None:
    """On resume, drop log lines past the checkpoint so the log matches an uninterrupted run."""
    if not path.exists():
        return
    keep = [line for line, logged in metrics_records(path) if logged <= step]   # (a garbled line: one clear error)
    path.write_text("".join(line + "\n" for line in keep))
