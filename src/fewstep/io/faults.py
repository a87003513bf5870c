"""Faults the user can act on — a full disk, a read-only or foreign folder — as one line naming the path and the
fix (DESIGN.md §3: never a traceback), for :mod:`fewstep.io.atomic` and the CLI's last resort."""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

from ..errors import FewstepError

# errno values that are the user's situation (a full disk, a read-only or foreign folder), not a bug
NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}
_STRERROR = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
             "Read-only file system": errno.EROFS, "Permission denied": errno.EACCES,
             "Operation not permitted": errno.EPERM, "File too large": errno.EFBIG}


# --- errors the user can act on ---------------------------------------------------------------------
def error_number(e: BaseException) -> int | None:
    """The errno of a full disk or an unwritable place behind ``e`` (an OSError, or a library's wrapping of one,
    such as safetensors' "I/O error: No space left on device (os error 28)"), else None."""
    seen = set()
    while e is not None and id(e) not in seen and not isinstance(e, FewstepError):
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in NO_SPACE | NOT_WRITABLE:
            return e.errno
        if not isinstance(e, OSError) or e.errno is None:
            text = str(e)
            found = re.search(r"os error (\d+)|code: (\d+)", text)
            if found and int(found[1] or found[2]) in NO_SPACE | NOT_WRITABLE:
                return int(found[1] or found[2])
            for words, number in _STRERROR.items():
                if words in text:
                    return number
        e = e.__cause__ or e.__context__
    return None


def _free_mb(path: Path) -> str:
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    return f"{shutil.disk_usage(existing).free / 2**20:,.0f} MB" if existing is not None else "unknown"


def io_error_message(e: BaseException, path: str | Path | None, existed: bool | None = None,
                     writing: bool = True, outputs: dict[str, str] | None = None) -> str | None:
    """One line for a full disk or an unwritable place while writing ``path`` (``writing``; else while using it
    somehow: then a permission problem may be a read's), or None for any other error. ``existed``: whether
    ``path`` was there before (then it is said to be unchanged). Where the error does not say which file it
    was (``path`` None), the command's ``outputs`` (flag -> path) are named instead, each with its free space."""
    number = error_number(e)
    if number is None:
        return None
    path = path if path is not None else getattr(e, "filename", None)
    if path is None:
        where = ", ".join(f"{flag} {value} ({_free_mb(Path(value))} free)" for flag, value in (outputs or {}).items())
        what = "no space left on device" if number in NO_SPACE else os.strerror(number).lower()
        fix = "free some space or write elsewhere" if number in NO_SPACE else "write elsewhere, or make it writable"
        return f"{what} while writing {'the outputs: ' + where if where else 'the output'}; {fix}, and run again"
    path = Path(os.fsdecode(path))
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    kept = " (the existing one is unchanged)" if existed else ""
    if number in NO_SPACE:
        free = f"{_free_mb(path)} free there"
        return (f"no space left on device writing {path}: {free}{kept}; free some space or write elsewhere, "
                f"and run again")
    folder = existing if existing is not None and existing.is_dir() else path.parent
    if number == errno.EROFS:
        return f"cannot write {path}: {folder} is on a read-only file system{kept}; write elsewhere"
    if not writing:
        return f"permission denied on {path}; check its permissions (or those of {folder})"
    return f"cannot write {path}: {folder} is not writable (permission denied){kept}; write elsewhere, or make it writable"
