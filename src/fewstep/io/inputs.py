"""A command's inputs, protected: no output of a command may be one of its inputs (base, teacher, LoRA, model,
input images, data set), lie inside one or contain one (DESIGN.md §2). ``fewstep.cli.main`` collects the inputs of
every subcommand once (:func:`protect_inputs`); every check and write of :mod:`fewstep.io.atomic` asks
:func:`check_not_input`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from ..errors import FewstepError

_inputs: ContextVar[tuple[tuple[Path, str], ...]] = ContextVar("inputs", default=())
_writable_inputs: ContextVar[frozenset[Path]] = ContextVar("writable_inputs", default=frozenset())


@contextmanager
def protect_inputs(inputs: Iterable[tuple[str | Path, str]]) -> Iterator[None]:
    """Within the block, no output may be one of ``inputs`` — (path, what it is, e.g. "--teacher") — nor lie
    inside one, nor contain one (:func:`check_not_input`; every check and write of this module asks it)."""
    token = _inputs.set(_inputs.get() + tuple((Path(p), what) for p, what in inputs))
    try:
        yield
    finally:
        _inputs.reset(token)


@contextmanager
def writing_into(*paths: str | Path) -> Iterator[None]:
    """Within the block, the files ``paths`` may be written although they lie in an input: for a command whose
    job is to update its input in place (``eval --tune-sigmas --save-sigmas`` stores the grids in the model's
    ``fewstep.json``)."""
    token = _writable_inputs.set(_writable_inputs.get() | {Path(p).resolve() for p in paths})
    try:
        yield
    finally:
        _writable_inputs.reset(token)


def _identity(path: Path) -> tuple:
    """What makes two spellings of a path the same place: the file's (device, inode) where it exists (so a
    symlink, a bind mount or another case spelling cannot hide an input), else its resolved path."""
    try:
        st = path.stat()
        return ("inode", st.st_dev, st.st_ino)
    except OSError:
        return ("path", str(path))


def _relation(output: Path, source: Path) -> str | None:
    """How ``output`` overlaps ``source`` ("is", "is inside", "contains") or None."""
    out, src = output.resolve(), source.resolve()
    out_id, src_id = _identity(out), _identity(src)
    if out_id == src_id:
        return "is"
    if src_id in {_identity(p) for p in out.parents}:
        return "is inside"
    if out_id in {_identity(p) for p in src.parents}:
        return "contains"
    return None


def check_not_input(path: str | Path, what: str = "--out") -> Path:
    """``path``, refused with one line if it is one of the command's inputs (:func:`protect_inputs`), inside
    one or contains one: writing there would replace or change what the command reads."""
    path = Path(path)
    if path.resolve() in _writable_inputs.get():
        return path
    for source, name in _inputs.get():
        relation = _relation(path, source)
        if relation is not None:
            kind = "folder" if source.is_dir() else "file"
            raise FewstepError(f"{what} {path} {relation} the {name} {kind} {source}, an input of this command "
                               f"that fewstep never writes over; give {what} a path outside it")
    return path
