"""Will it fit? An estimate of the memory a request needs, checked before anything of it is allocated, so that
``--batch 10**12`` or ``--image-size 100000`` is one line that gives the estimate and the free memory, not an
allocator's traceback (or the machine swapping for an hour). The estimates are lower bounds (the tensors the request
must hold at once, in float32); what the networks need on top is said, not guessed."""

from __future__ import annotations

from ..errors import FewstepError
from .validate import human_bytes

FLOAT = 4          # bytes of a float32


def free_memory() -> int | None:
    """The machine's free memory (``MemAvailable``), or None where unknown. (Training checks the accelerator's
    too: :func:`fewstep.training.memory.available_bytes`.)"""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_memory(need: float, what: str, fix: str, free: int | None = None) -> None:
    """Refuse, in one line, ``what`` when its estimated ``need`` (bytes) is more than the free memory."""
    free = free_memory() if free is None else free
    if free is not None and need > free:
        raise FewstepError(f"{what} needs at least {human_bytes(need)} of memory (estimated before allocating "
                           f"any); {human_bytes(free)} is free — {fix}")


def images_bytes(count: float, channels: int, height: int, width: int | None = None, copies: int = 1) -> float:
    """Bytes of ``count`` float32 images of ``channels``×``height``×``width`` held ``copies`` times at once."""
    return float(count) * channels * height * (height if width is None else width) * FLOAT * copies
