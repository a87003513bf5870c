"""Writes that never destroy what the user has (DESIGN.md §2), in one place for every command.

The rules, all enforced here so that no subcommand can forget one:

1. **A folder is fewstep's own only by a marker fewstep wrote into it**: every folder written through
   :func:`atomic_path` (``directory=True``; :func:`fewstep.models.folders.write_folder` and everything built
   on it) gets a small JSON file :data:`MARKER` (``.fewstep-output``) naming fewstep, the kind of output, the
   command and the top-level files fewstep wrote there. A folder is *never* fewstep's because it holds a common
   name: ``model.safetensors``, ``state.json``, ``model_index.json`` or ``config.json`` are what anyone's folder
   may hold. Folders fewstep wrote before markers existed (the shipped ``models/*``) are still fewstep's
   through a legacy record, see :func:`is_fewstep_output`.
2. **An output is never one of the command's inputs**, nor inside one, nor containing one: the CLI names the
   inputs of the parsed command once (:func:`protect_inputs`, in ``fewstep.cli.main``) and every check and
   every write here consults them, so ``distill --out`` onto its ``--teacher`` or ``sample --out-dir`` onto its
   ``--model`` is refused with one line before any work, in every subcommand, including those that never call
   a check themselves. (A command that is meant to update an input, ``eval --save-sigmas``, says so with
   :func:`writing_into`.)
3. **An existing folder that is not fewstep's own output is refused** (one line) unless the user said so
   (``--overwrite``: :func:`allow_replacing`); **and even then only fewstep's files are replaced**: the user's
   other files there (``notes.txt``, ``photo.png``) stay.
4. **The new version replaces the old only once it is complete, and a crash leaves the old or the new, never
   neither.** Everything is written into a temporary sibling (``.NAME.tmp-PID-XXXXXXXX``) first. A file
   replaces its target with one ``os.replace``. A folder that holds nothing but fewstep's files (per its
   marker) is swapped with the new one in one step (Linux ``renameat2(RENAME_EXCHANGE)``; elsewhere the old
   goes aside under ``.NAME.old-PID-XXXXXXXX``, the new into place, then the old is deleted). A folder that
   also holds files of the user's is updated entry by entry instead: each of fewstep's new entries moves in
   with one atomic rename (a sub-folder by an exchange), files fewstep wrote there last time (listed in the
   old marker) and no longer writes are removed, and the marker is written last; so at every moment each of
   fewstep's entries is the old or the new one and nothing of the user's is touched.
5. **No temporary a rerun does not clean.** Temporaries are named after their target and the writing
   process's id; a run writing a target first removes the temporaries of that target whose process is gone
   (a killed run), and puts back an old version left aside by a run killed between its two renames.
6. **A full disk or a read-only folder is one clear line** (:class:`~fewstep.errors.FewstepError`: "no space
   left on device writing X: N MB free there …"), with the temporary removed and the old version intact.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from ..errors import FewstepError
from .faults import io_error_message
from .inputs import check_not_input, protect_inputs, writing_into  # noqa: F401  (re-exported)

MARKER = ".fewstep-output"          # what makes a folder fewstep's own (module docstring, rule 1)
LEGACY_RECORD = "fewstep.json"      # fewstep's model/LoRA record, in every folder it wrote before markers
# kept for callers that imported it: the names that make a folder fewstep's (the marker; the legacy record)
MARKERS = (MARKER, LEGACY_RECORD)

_replaceable: ContextVar[frozenset[Path]] = ContextVar("replaceable", default=frozenset())
_command: ContextVar[str | None] = ContextVar("command", default=None)



# --- what may be written ----------------------------------------------------------------------------
@contextmanager
def allow_replacing(*paths: str | Path) -> Iterator[None]:
    """Within the block, the folders ``paths`` may be written into even if they are not fewstep outputs
    (``--overwrite``). Only fewstep's files there are replaced; the rest stays (module docstring, rule 3).
    An input of the command stays refused."""
    token = _replaceable.set(_replaceable.get() | {Path(p).resolve() for p in paths})
    try:
        yield
    finally:
        _replaceable.reset(token)


@contextmanager
def recording_command(command: str | None) -> Iterator[None]:
    """Within the block, the markers of the folders written record ``command`` (the command line)."""
    token = _command.set(command)
    try:
        yield
    finally:
        _command.reset(token)


def _legacy_output(folder: Path) -> bool:
    """A folder fewstep wrote before markers existed. ``fewstep.json`` is fewstep's own format (the record
    of every model, pipeline, LoRA, tiny VAE and adapter set it wrote, the shipped ``models/*`` included), not a
    common name, so a folder holding one is taken as fewstep's: re-running the command that wrote it must
    keep working. The shipped classifiers predate that record: theirs is a ``config.json`` whose
    ``training.command`` is a fewstep command line (what fewstep wrote into it; a config.json alone is not
    enough). Neither makes a diffusers folder fewstep's that fewstep did not write (``model_index.json``
    and no ``fewstep.json``), nor a folder holding ``model.safetensors`` or ``state.json``."""
    if (folder / LEGACY_RECORD).is_file():
        return True
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    training = config.get("training") if isinstance(config, dict) else None
    command = training.get("command") if isinstance(training, dict) else None
    return isinstance(command, str) and command.startswith("fewstep ")


def read_marker(folder: str | Path) -> dict | None:
    """The folder's :data:`MARKER` (what fewstep wrote there), or None if it has none fewstep wrote."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    files = marker.get("files", []) if isinstance(marker, dict) else None
    if "fewstep" not in (marker if isinstance(marker, dict) else {}) or not isinstance(files, list) \
            or not all(isinstance(f, str) and f and "/" not in f and f not in (".", "..") for f in files):
        return None                                   # not a marker fewstep wrote: it names top-level entries
    return marker


def is_fewstep_output(folder: str | Path) -> bool:
    """Whether fewstep wrote ``folder``: by its :data:`MARKER`, or for folders written before markers existed,
    by the legacy record :func:`_legacy_output` describes. Never by a common file name."""
    folder = Path(folder)
    return folder.is_dir() and (read_marker(folder) is not None or _legacy_output(folder))


def check_replaceable(final: str | Path, what: str = "--out") -> Path:
    """The folder a command will write, refused with one line before any work if writing it would destroy
    something of the user's or cannot succeed: the current folder or one above it, one of the command's
    inputs (or inside or around one), a file where a folder goes, an existing folder that is not fewstep's own
    output (unless :func:`allow_replacing`), a place with no writable folder above it."""
    final = Path(final)
    resolved = final.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise FewstepError(f"{what} {final} is the current folder or one above it; give a new folder name")
    check_not_input(final, what)
    if resolved.is_dir() and any(_entries(resolved)) and not is_fewstep_output(resolved) \
            and resolved not in _replaceable.get():
        raise FewstepError(f"{what} {final} exists and is not a fewstep output (fewstep marks the folders it writes "
                           f"with {MARKER}); choose another path, or pass --overwrite to write fewstep's files into "
                           f"it (nothing else there is touched)")
    return check_creatable(final, what)


def check_creatable(path: str | Path, what: str = "--out") -> Path:
    """A folder fewstep will create or add to (a work folder): not a file, under a writable folder, not one
    of the command's inputs."""
    path = Path(path)
    check_not_input(path, what)
    resolved = path.resolve()
    if resolved.exists() and not resolved.is_dir():
        raise FewstepError(f"{what} {path} is a file; give a folder")
    parent = next((p for p in (resolved, *resolved.parents) if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK):
        raise FewstepError(f"cannot write {what} {path}: {parent} is not a writable folder")
    return path


def check_writable(path: str | Path, suffix: str | None = None, what: str = "output") -> Path:
    """Fail with a clear :class:`FewstepError` if the file ``path`` can't be written (wrong suffix, no
    folder, a folder in its place, not writable, one of the command's inputs)."""
    path = Path(path)
    check_not_input(path, what)
    if path.is_dir():
        raise FewstepError(f"cannot write {what} {path}: it is a folder; give a file name")
    if suffix and path.suffix.lower() != suffix:
        raise FewstepError(f"{what} {path} must end in {suffix}")
    if not path.parent.is_dir():
        raise FewstepError(f"cannot write {what} {path}: folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise FewstepError(f"cannot write {what} {path}: folder {path.parent} is not writable")
    return path


# --- writing ----------------------------------------------------------------------------------------
@contextmanager
def atomic_path(final: str | Path, directory: bool = False, kind: str | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of ``final`` (a folder, created, when ``directory``) to fill; on success it
    replaces ``final`` as the module docstring says (a folder only when :func:`check_replaceable` allows, and
    marked with :data:`MARKER` recording ``kind``), on an exception it is removed and ``final`` is left as it
    was. A full disk or a folder that cannot be written becomes one :class:`FewstepError` line. Temporaries of
    ``final`` left by killed runs are removed first."""
    final = Path(final)
    if directory:
        if final.is_symlink():
            final = final.resolve()              # write where the link points; the link stays a link
        check_replaceable(final)
    else:
        check_not_input(final, "output")
    if final.exists() and final.is_dir() != directory:
        raise FewstepError(f"cannot write {final}: it is a {'folder' if final.is_dir() else 'file'}, "
                           f"not a {'folder' if directory else 'file'}")
    existed, tmp = final.exists(), None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(final)
        tmp = _sibling(final, "tmp")
        if directory:
            tmp.mkdir()
        yield tmp
        if directory:
            _commit_folder(tmp, final, kind)
        else:
            os.replace(tmp, final)
    except BaseException as e:
        if tmp is not None:
            _remove_quietly(tmp)
        message = io_error_message(e, final, existed)
        if message is not None:
            raise FewstepError(message) from None
        raise


def write_text(path: str | Path, text: str) -> Path:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def _sibling(path: Path, what: str) -> Path:
    """A hidden name beside ``path`` for a temporary (``tmp``) or an old version set aside (``old``),
    named after ``path`` and this process, so that a later run can tell whose it is."""
    return path.with_name(f".{path.name}.{what}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _temporary_pattern(name: str | None = None) -> re.Pattern:
    target = re.escape(name) if name is not None else r".+"
    return re.compile(rf"^\.(?P<target>{target})\.(?P<what>tmp|old)-(?P<pid>\d+)-[0-9A-Za-z]+$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True                                   # another user's process
    except (ProcessLookupError, OverflowError, ValueError):
        return False                                  # gone, or no process could have that id
    return True


def remove_stale_temporaries(final: str | Path) -> list[Path]:
    """Remove the temporaries of ``final`` (beside it, and inside it when it is a folder) whose writing process
    is gone: a run killed mid-write. An old version set aside by a run killed between its two renames is put
    back where its target is missing instead (the old, never neither). Returns what was removed or restored."""
    final = Path(final)
    done = []
    inside = final.is_dir() and (is_fewstep_output(final) or final.resolve() in _replaceable.get())
    for folder, pattern in ((final.parent, _temporary_pattern(final.name)), (final, _temporary_pattern())):
        if not folder.is_dir() or (folder == final and not inside):
            continue                                   # inside only a folder fewstep may write (it made them)
        try:
            names = sorted(os.listdir(folder), key=lambda n: "tmp" in n)    # the old versions first
        except OSError:
            continue
        for name in names:
            match = pattern.match(name)
            if match is None or _alive(int(match["pid"])):
                continue
            path, target = folder / name, folder / match["target"]
            try:
                if match["what"] == "old" and not target.exists() and not target.is_symlink():
                    os.rename(path, target)
                else:
                    _remove(path)
                done.append(path)
            except OSError:
                pass                                   # left for a later run; the write itself will tell
    return done


def _marker_text(kind: str, files: list[str]) -> str:
    import fewstep

    marker = {"fewstep": getattr(fewstep, "__version__", "?"), "kind": kind, "command": _command.get(),
              "files": sorted(files)}
    return json.dumps(marker, indent=1) + "\n"


def _write_marker(folder: Path, kind: str | None, files: list[str]) -> Path:
    path = folder / MARKER
    path.write_text(_marker_text(kind or _kind_of(folder), files))
    return path


def _kind_of(folder: Path) -> str:
    """What a folder is, for the marker: its fewstep.json's ``kind`` where it has one, else the subcommand
    that wrote it."""
    try:
        record = json.loads((folder / LEGACY_RECORD).read_text())
        return str(record.get("kind") or "model")
    except (OSError, ValueError, AttributeError):
        words = (_command.get() or "").split()
        return f"{words[1]} output" if len(words) > 1 and words[0] == "fewstep" else "folder"


def _entries(folder: Path) -> set[str]:
    """The names in ``folder`` that are not this module's own bookkeeping (the marker, temporaries)."""
    temporary = _temporary_pattern()
    return {n for n in os.listdir(folder) if n != MARKER and not temporary.match(n)}


def _commit_folder(tmp: Path, final: Path, kind: str | None) -> None:
    """The complete folder ``tmp`` becomes ``final`` (module docstring, rule 4)."""
    new = sorted(_entries(tmp))
    _write_marker(tmp, kind, new)
    if not final.exists():
        os.rename(tmp, final)
        return
    old = _entries(final)
    marker = read_marker(final)
    listed = set(marker.get("files", [])) & old if marker is not None else set()
    kept = old - listed - set(new)             # the user's files (or an old fewstep's we cannot tell): they stay
    if not kept:
        _replace_entry(tmp, final)               # the whole folder: one exchange where the OS has it
        return
    interim = _sibling(final / MARKER, "tmp")  # until done, the marker claims the old and the new entries
    interim.write_text(_marker_text(kind or _kind_of(tmp), sorted(listed | set(new))))
    os.replace(interim, final / MARKER)
    for name in new:
        _replace_entry(tmp / name, final / name)
    for name in sorted(listed - set(new)):
        _remove(final / name)
    os.replace(tmp / MARKER, final / MARKER)
    _remove(tmp)


def _replace_entry(src: Path, dst: Path) -> None:
    """``src`` takes the place of ``dst`` in one atomic step where the OS allows (a file by ``os.replace``, a
    folder by an exchange); a folder where no exchange exists goes in by two renames, the old set aside
    under a name a later run restores from (:func:`remove_stale_temporaries`)."""
    if not dst.exists() and not dst.is_symlink():
        os.rename(src, dst)
        return
    src_dir, dst_dir = src.is_dir(), dst.is_dir() and not dst.is_symlink()
    if not src_dir and not dst_dir:
        os.replace(src, dst)
        return
    if src_dir and dst_dir and _exchange(src, dst):
        _remove(src)                                  # it now holds the old version
        return
    aside = _sibling(dst, "old")
    os.rename(dst, aside)
    os.rename(src, dst)
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


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _remove_quietly(path: Path) -> None:
    try:
        _remove(path)
    except OSError:
        pass                                          # a later run removes it (remove_stale_temporaries)
