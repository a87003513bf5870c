"""One run per work folder, resumed only as itself, and never a non-finite checkpoint.

- :class:`WorkDirLock`: a lock file holding the owner's pid and host, taken for the whole run, so a
  second run on the same ``--work-dir`` is refused instead of overwriting the first one's checkpoints;
  a lock whose process is gone (a killed run) is stale and taken over.
- :func:`check_resume`: the settings that define a run (method settings, data, batch, seed, lr, EMA)
  must match the checkpoint's, or the resume is refused unless forced.
- :func:`all_finite` / :func:`last_good_checkpoint`: weights are checked before every checkpoint and
  the final save; the checkpoint a divergence message names is one whose weights are finite.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..errors import FewstepError

LOCK_NAME = ".fewstep-run.lock"
# TrainConfig fields a resumed run may change: how long it runs, how it reports and keeps checkpoints
FREE_FIELDS = {"out_dir", "max_steps", "checkpoint_every", "keep_checkpoints", "log_every", "progress",
               "force_resume", "mixed_precision", "memory_check"}


class WorkDirLock:
    """``with WorkDirLock(folder):`` — refuse a second live run on ``folder`` (module docstring)."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.owner = {"pid": os.getpid(), "host": socket.gethostname()}

    def __enter__(self) -> "WorkDirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and _alive(holder):
                    raise FewstepError(f"another run (pid {holder['pid']} on {holder['host']}) is using the work folder "
                                       f"{self.path.parent}; wait for it to finish, or give another --work-dir") from None
                self.path.unlink(missing_ok=True)    # stale: its run is gone
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.owner, f)
            return self
        raise FewstepError(f"could not take the lock {self.path}; remove it if no run is using {self.path.parent}")

    def __exit__(self, *exc) -> None:
        if self._holder() == self.owner:
            self.path.unlink(missing_ok=True)

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None
        except (OSError, ValueError):
            return None


def _alive(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return True                                  # another machine's run: assume it lives
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return holder["pid"] != os.getpid()


def check_resume(saved: dict, current: dict, checkpoint: Path, force: bool = False) -> None:
    """Refuse to resume ``checkpoint`` (saved TrainConfig ``saved``) with settings that define another run."""
    changed = sorted(k for k in set(saved) | set(current) if k not in FREE_FIELDS and saved.get(k) != current.get(k))
    if changed and not force:
        detail = "; ".join(f"{k}: {_short(saved.get(k))} → {_short(current.get(k))}" for k in changed)
        raise FewstepError(f"the work folder's checkpoint {checkpoint} is of another run ({detail}); give another "
                           f"--work-dir, or pass --force-resume to continue it with these settings")


def _short(value, limit: int = 80) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def all_finite(module: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


def last_good_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint under ``root`` whose weights are all finite."""
    if not root.is_dir():
        return None
    for folder in sorted((p for p in root.glob("step-*") if (p / "state.json").exists()), reverse=True):
        try:
            if all(bool(torch.isfinite(t).all()) for t in load_file(folder / "model.safetensors").values()
                   if t.is_floating_point()):
                return folder
        except Exception:  # an unreadable checkpoint is not a good one
            continue
    return None
