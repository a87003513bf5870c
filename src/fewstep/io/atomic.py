"""Atomic writes: everything fewstep writes goes to a temporary name first and is renamed into
place, so a crash or a bad input never leaves a half-written file or folder (DESIGN.md §3)."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import FewstepError


@contextmanager
def atomic_path(final: str | Path, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``final`` (a folder, created, when ``directory``); on success it
    replaces ``final``, on an exception it is removed and ``final`` is left as it was."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp")
    _remove(tmp)
    if directory:
        tmp.mkdir(parents=True)
    try:
        yield tmp
        if directory and final.exists():
            shutil.rmtree(final)  # os.replace cannot replace a non-empty folder
        os.replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


def check_writable(path: str | Path, suffix: str | None = None) -> Path:
    """Fail with a clear :class:`FewstepError` if ``path`` can't be written (wrong suffix, no folder)."""
    path = Path(path)
    if suffix and path.suffix.lower() != suffix:
        raise FewstepError(f"output {path} must end in {suffix}")
    if not path.parent.is_dir():
        raise FewstepError(f"cannot write {path}: folder {path.parent} does not exist")
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
