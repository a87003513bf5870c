"""Atomic writes that never destroy what the user has (DESIGN.md §2).

Everything fewstep writes goes to a temporary sibling with a unique name first and replaces the target
only once complete: a file by ``os.replace``; a folder by swapping the two names in one step
(Linux ``renameat2(RENAME_EXCHANGE)``; elsewhere old → aside, new → in place, old deleted), so a crash
at any moment leaves the old version or the new one, never neither. An existing folder is replaced only
when it is fewstep's own output (a model, LoRA, classifier or checkpoint folder) or empty; anything else
is refused with one line, unless the user said so (``--overwrite``: :func:`allow_replacing`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import uuid
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Iterator

from ..errors import FewstepError

# files that mark a folder as fewstep's own output: model/LoRA folders, training checkpoints, classifiers
MARKERS = ("fewstep.json", "state.json", "model_index.json", "model.safetensors")
_replaceable: ContextVar[frozenset[Path]] = ContextVar("replaceable", default=frozenset())


@contextmanager
def allow_replacing(*paths: str | Path) -> Iterator[None]:
    """Within the block, ``paths`` may be replaced even if they are not fewstep outputs (``--overwrite``)."""
    token = _replaceable.set(_replaceable.get() | {Path(p).resolve() for p in paths})
    try:
        yield
    finally:
        _replaceable.reset(token)


def is_fewstep_output(folder: Path) -> bool:
    return any((folder / m).exists() for m in MARKERS)


def check_replaceable(final: str | Path, what: str = "--out") -> Path:
    """The target of a write, refused (one line) before any work if writing it would destroy something of
    the user's, or cannot succeed: a file where a folder goes, the current folder or one above it, a folder
    that is not fewstep's own output, or a place with no writable folder above it."""
    final = Path(final)
    resolved = final.resolve()
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        raise FewstepError(f"{what} {final} is the current folder or one above it; give a new folder name")
    if resolved.exists() and resolved.is_dir() and any(resolved.iterdir()) and not is_fewstep_output(resolved) \
            and resolved not in _replaceable.get():
        raise FewstepError(f"{what} {final} exists and is not a fewstep output; choose another path, or pass "
                           f"--overwrite to replace it and everything in it")
    return check_creatable(final, what)


def check_creatable(path: str | Path, what: str = "--out") -> Path:
    """A folder fewstep will create or add to (a work folder): not a file, under a writable folder."""
    path = Path(path)
    resolved = path.resolve()
    if resolved.exists() and not resolved.is_dir():
        raise FewstepError(f"{what} {path} is a file; give a folder")
    parent = next((p for p in (resolved, *resolved.parents) if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK):
        raise FewstepError(f"cannot write {what} {path}: {parent} is not a writable folder")
    return path


@contextmanager
def atomic_path(final: str | Path, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``final`` (a folder, created, when ``directory``); on success it
    replaces ``final`` (:func:`check_replaceable` first), on an exception it is removed and ``final`` is
    left as it was."""
    final = Path(final)
    if directory:
        check_replaceable(final)
    if final.exists() and final.is_dir() != directory:
        raise FewstepError(f"cannot write {final}: it is a {'folder' if final.is_dir() else 'file'}, "
                           f"not a {'folder' if directory else 'file'}")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        if directory and final.exists():
            _swap_in(tmp, final)
        else:
            os.replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


def _swap_in(new: Path, final: Path) -> None:
    """``new`` becomes ``final``; the old ``final`` is deleted afterwards. One atomic exchange where the OS
    has it, else two renames (between them the old version waits under a unique name beside it)."""
    if _exchange(new, final):
        _remove(new)                                  # it now holds the old version
        return
    aside = final.with_name(f".{final.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.replace(final, aside)
    os.replace(new, final)
    _remove(aside)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step with Linux's renameat2(RENAME_EXCHANGE); False where unavailable."""
    libc_name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError, TypeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def check_writable(path: str | Path, suffix: str | None = None, what: str = "output") -> Path:
    """Fail with a clear :class:`FewstepError` if the file ``path`` can't be written (wrong suffix, no
    folder, a folder in its place)."""
    path = Path(path)
    if path.is_dir():
        raise FewstepError(f"cannot write {what} {path}: it is a folder; give a file name")
    if suffix and path.suffix.lower() != suffix:
        raise FewstepError(f"{what} {path} must end in {suffix}")
    if not path.parent.is_dir():
        raise FewstepError(f"cannot write {what} {path}: folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise FewstepError(f"cannot write {what} {path}: folder {path.parent} is not writable")
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
