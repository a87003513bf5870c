"""Will it fit? The memory a training run's weights need, checked before any of it is allocated.

What a run holds beside the frozen teacher is known from its parameter count alone (the activations come on
top, and depend on batch, resolution and --gradient-checkpointing): per trained parameter, in fp32, the
weights, their gradient and Adam's two moments (16 bytes), plus 4 for a separate target network and 4 for
the weight EMA. A full-size SD-1.5 UNet (859.5M) under LCD thus needs 19.2 GiB for these alone with the
defaults, 16.0 GiB with ``--ema 0``, beside its frozen teacher (3.2 GiB in fp32, 1.6 in bf16): the measured
peaks are in BENCHMARKS.md "Full size on 24 GB".
"""

from __future__ import annotations

import torch

from ..errors import FewstepError
from .optimizers import MOMENT_BYTES

WEIGHT_AND_GRAD = 8   # bytes per trained parameter in fp32; the optimizer's moments come on top (MOMENT_BYTES)
# the activations and the allocator on top, at the smallest batch: the full-size LCD with the defaults passed
# 19.1 GiB (its weights' 19.2 GiB estimate) before its first step ended, with 19.5 GiB free at its start
MARGIN = 1.1


def training_bytes(trained: int, target: bool, ema: bool, optimizer: str = "adamw") -> int:
    """Bytes of the trained weights, their gradients, the optimizer's moments (8 bytes for AdamW's two in fp32,
    2 for 8-bit AdamW's), a target copy and an EMA copy."""
    return trained * (WEIGHT_AND_GRAD + MOMENT_BYTES[optimizer] + 4 * target + 4 * ema)


def available_bytes(device: torch.device | str = "cpu") -> int | None:
    """Free memory where the run trains: the accelerator's, or the machine's (``MemAvailable``); None if
    unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_fits(need: int, what: str, device: torch.device | str = "cpu", advice: str = "") -> None:
    """Refuse, in one line and before allocating, a run whose weights alone need more than is free."""
    free = available_bytes(device)
    if free is not None and need * MARGIN > free:
        raise FewstepError(f"{what} needs at least {need / 2 ** 30:.1f} GiB more memory for its weights, gradients "
                           f"and optimizer state (activations on top); {free / 2 ** 30:.1f} GiB is free. {advice}"
                           f"Or pass --no-memory-check to try anyway")
