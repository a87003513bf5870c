"""Will it fit? The memory a training run's weights need, checked before any of it is allocated.

What a run holds beside the frozen teacher is known from its parameter count alone (the activations come on
top, and depend on batch, resolution and --gradient-checkpointing): per trained parameter, in fp32, the
weights, their gradient and Adam's two moments (16 bytes), plus 4 for a separate target network and 4 for
the weight EMA. A full-size SD-1.5 UNet (859.5M) under LCD thus needs 19.2 GiB for these alone with the
defaults, 16.0 GiB with ``--ema 0``, beside its frozen teacher (3.2 GiB in fp32, 1.6 in bf16): the measured
peaks are in BENCHMARKS.md "Full size on 24 GB".

Under FSDP (``accelerate launch --use_fsdp --fsdp_version 2``; :mod:`fewstep.training.sharding`) all of that is
sharded over the N processes — the trained weights, gradients, moments, target and EMA, and the frozen teacher a
recipe names — so each process holds 1/N of it, plus what it holds whole: a frozen module left replicated, and the
FSDP units in flight (the largest unit's full weights and gradients, twice: the one computing and the one
prefetched). :class:`Footprint` keeps the two parts apart; :func:`per_process_bytes` gives one process's share of a
model that need not be built (a full-size FLUX or SD3.5 row of a benchmark), and :func:`check_fits` refuses a run
that does not fit in one line that says how many processes of this one's memory would fit it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import FewstepError
from ..io.budget import free_memory
from .optimizers import MOMENT_BYTES

WEIGHT_AND_GRAD = 8   # bytes per trained parameter in fp32; the optimizer's moments come on top (MOMENT_BYTES)
# the activations and the allocator on top, at the smallest batch: the full-size LCD with the defaults passed
# 19.1 GiB (its weights' 19.2 GiB estimate) before its first step ended, with 19.5 GiB free at its start
MARGIN = 1.1
IN_FLIGHT = 2 * WEIGHT_AND_GRAD   # per parameter of the largest FSDP unit: its full weights and gradients, ×2 units
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
FSDP_LAUNCH = "accelerate launch --use_fsdp --fsdp_version 2"


def training_bytes(trained: int, target: bool, ema: bool, optimizer: str = "adamw") -> int:
    """Bytes of the trained weights, their gradients, the optimizer's moments (8 bytes for AdamW's two in fp32,
    2 for 8-bit AdamW's), a target copy and an EMA copy."""
    return trained * (WEIGHT_AND_GRAD + MOMENT_BYTES[optimizer] + 4 * target + 4 * ema)


@dataclass(frozen=True)
class Footprint:
    """A run's weights in bytes: the part FSDP divides over its processes, the part each holds whole, and what each
    holds in flight under FSDP only (the all-gathered units)."""

    sharded: int          # trained weights, gradients, moments, target, EMA; a frozen teacher that is sharded
    whole: int = 0        # a frozen module left replicated
    in_flight: int = 0    # under FSDP: the largest unit's full weights and gradients, twice (computing, prefetched)

    def per_process(self, processes: int = 1) -> int:
        """What one of ``processes`` FSDP processes holds (``processes`` = 1: one unsharded process, everything)."""
        if processes <= 1:
            return self.sharded + self.whole
        return math.ceil(self.sharded / processes) + self.whole + self.in_flight

    def processes_for(self, free: int) -> int | None:
        """The fewest FSDP processes (two or more), each with ``free`` bytes, that hold it (the margin for
        activations included); None if no number does (what each holds whole does not fit)."""
        room = free / MARGIN - self.whole - self.in_flight
        if room <= 0:
            return None
        return max(2, math.ceil(self.sharded / room))


def dtype_bytes(dtype: str | torch.dtype | int) -> int:
    """Bytes per element of ``dtype`` ("fp32", "bf16", torch.float16, … or a number of bytes)."""
    if isinstance(dtype, int):
        return dtype
    if isinstance(dtype, torch.dtype):
        return dtype.itemsize
    try:
        return DTYPE_BYTES[dtype.lower()]
    except KeyError:
        raise FewstepError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_BYTES)}") from None


def footprint(trained: int, *, optimizer: str = "adamw", target: bool = True, ema: bool = True, frozen: int = 0,
              frozen_dtype: str | torch.dtype | int = "fp32", frozen_sharded: bool = True, unit: int = 0) -> Footprint:
    """The :class:`Footprint` of training ``trained`` parameters (fp32 weights, gradients, ``optimizer``'s moments,
    a ``target`` copy, an ``ema`` copy) beside ``frozen`` parameters of ``frozen_dtype`` (a teacher), sharded under
    FSDP unless ``frozen_sharded`` is False (then every process holds it whole). ``unit``: the parameters of the
    largest FSDP unit (a transformer block, a UNet's ``ResnetBlock2D``: what is all-gathered at once,
    :func:`fewstep.training.sharding.largest_unit`), held in flight under FSDP (0: not counted)."""
    teacher = int(frozen) * dtype_bytes(frozen_dtype)
    return Footprint(sharded=training_bytes(int(trained), target, ema, optimizer) + (teacher if frozen_sharded else 0),
                     whole=0 if frozen_sharded else teacher, in_flight=int(unit) * IN_FLIGHT)


def per_process_bytes(trained: int, processes: int = 1, *, optimizer: str = "adamw", target: bool = True,
                      ema: bool = True, frozen: int = 0, frozen_dtype: str | torch.dtype | int = "fp32",
                      frozen_sharded: bool = True, unit: int = 0) -> int:
    """Bytes each of ``processes`` FSDP processes holds of a run's weights (:func:`footprint`; ``processes`` = 1: an
    unsharded run; activations on top), from parameter counts alone: e.g. a FLUX.1-size transformer (11.9B) as an
    LCD student beside its bf16 teacher, ``per_process_bytes(11.9e9, 8, frozen=11.9e9, frozen_dtype="bf16",
    unit=block)``, without building it."""
    return footprint(trained, optimizer=optimizer, target=target, ema=ema, frozen=frozen, frozen_dtype=frozen_dtype,
                     frozen_sharded=frozen_sharded, unit=unit).per_process(processes)


def available_bytes(device: torch.device | str = "cpu") -> int | None:
    """Free memory where the run trains: the accelerator's, or the machine's (``MemAvailable``); None if
    unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return free_memory()


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.1f} GiB"


def check_fits(need: int | Footprint, what: str, device: torch.device | str = "cpu", advice: str = "",
               processes: int = 1, local_processes: int = 1, resident: int = 0) -> None:
    """Refuse, in one line and before allocating, a run whose weights alone need more than is free.

    ``need``: bytes, or a :class:`Footprint`; ``processes``: the FSDP shard count (1: unsharded, DDP included), of
    which ``local_processes`` share this machine (on the CPU they share its memory; each GPU has its own).
    ``resident``: bytes of ``need`` each process holds already (a loaded teacher), whose memory is the run's again.
    Where a :class:`Footprint` is given, the line says how many FSDP processes of this one's free memory fit it.
    """
    fp = need if isinstance(need, Footprint) else Footprint(sharded=0, whole=need)
    free = available_bytes(device)
    if free is None:
        return
    if torch.device(device).type == "cpu":
        free //= max(1, local_processes)
    free += resident
    per = fp.per_process(processes)
    if per * MARGIN <= free:
        return
    if processes > 1:
        held = (f"{what} needs at least {_gib(per)} per process for its weights, gradients and optimizer state under "
                f"FSDP over {processes} processes ({_gib(fp.sharded)} sharded, {_gib(per - math.ceil(fp.sharded / processes))}"
                f" whole on each; activations on top); {_gib(free)} is free per process. ")
    else:
        held = (f"{what} needs at least {_gib(per - resident)} more memory for its weights, gradients and optimizer "
                f"state (activations on top); {_gib(free - resident)} is free. ")
    scale = ""
    if fp.sharded:
        fits = fp.processes_for(free)
        scale = (f"It needs {fits} processes of ≥ {_gib(free)} under FSDP ({FSDP_LAUNCH} --num_processes {fits}: "
                 f"a GPU or machine each). " if fits is not None else
                 f"No number of FSDP processes of {_gib(free)} fits it (each holds {_gib(fp.whole + fp.in_flight)} "
                 f"whole). ")
    raise FewstepError(f"{held}{advice}{scale}Or pass --no-memory-check to try anyway")
