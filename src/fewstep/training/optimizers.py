"""The optimizer of a run (``--optimizer``), and its state as safetensors + JSON.

- ``adamw``: PyTorch's AdamW (the default).
- ``adamw-fused``: the same update in one fused kernel per step (``torch.optim.AdamW(fused=True)``; CPU and
  CUDA), fewer passes over the weights; the same state.
- ``radam``: RAdam (Liu et al. 2020, *On the Variance of the Adaptive Learning Rate and Beyond*), Adam with
  its early steps' variance rectified: ACT's optimizer (kong13661/ACT), fewstep's default for ``--method act``.
- ``adamw-8bit``: bitsandbytes' 8-bit AdamW (Dettmers et al. 2022, *8-bit Optimizers via Block-wise
  Quantization*): both moments block-wise quantized to one byte each, 2 bytes per trained parameter instead
  of 8 — what diffusers' training scripts offer as ``--use_8bit_adam`` (6.9 → 1.7 GB of moments for a
  full-size SD-1.5 UNet). bitsandbytes is not a dependency of fewstep: ``pip install bitsandbytes``.
  Tensors under 4,096 elements keep 32-bit moments (bitsandbytes' ``min_8bit_size``).

An optimizer's ``state_dict`` may nest dicts (bitsandbytes' quantization state) and hold plain numbers (its
``step``): :func:`flat_state` splits it into tensors for safetensors and numbers for JSON, and
:func:`nested_state` puts it back, so every optimizer resumes exactly from fewstep's pickle-free checkpoints.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import FewstepError

OPTIMIZERS = ("adamw", "adamw-fused", "adamw-8bit", "radam")
MOMENT_BYTES = {"adamw": 8, "adamw-fused": 8, "adamw-8bit": 2, "radam": 8}   # both moments, per trained parameter


def make_optimizer(params: list[torch.nn.Parameter], name: str, lr: float, betas: tuple[float, float],
                   weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer called ``name`` (module docstring) over ``params``."""
    kwargs = {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay}
    if name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    if name == "adamw-fused":
        return torch.optim.AdamW(params, fused=True, **kwargs)
    if name == "radam":   # decoupled weight decay, as AdamW's
        return torch.optim.RAdam(params, decoupled_weight_decay=True, **kwargs)
    if name == "adamw-8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise FewstepError("--optimizer adamw-8bit needs bitsandbytes, which fewstep does not install: "
                               "pip install bitsandbytes (or use --optimizer adamw)") from None
        return bitsandbytes.optim.AdamW8bit(params, **kwargs)
    raise FewstepError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def flat_state(state: dict[int, dict[str, Any]]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An optimizer's per-parameter state → (tensors keyed "i.name[.inner]", the plain values likewise)."""
    tensors: dict[str, Tensor] = {}
    values: dict[str, Any] = {}

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, dict):
            for k, inner in v.items():
                walk(f"{prefix}.{k}", inner)
        elif torch.is_tensor(v):
            tensors[prefix] = v.contiguous()
        else:
            values[prefix] = v
    for i, s in state.items():
        walk(str(i), s)
    return tensors, values


def nested_state(tensors: dict[str, Tensor], values: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """:func:`flat_state` undone."""
    state: dict[int, dict[str, Any]] = {}
    for key, v in [*tensors.items(), *values.items()]:
        i, *path = key.split(".")
        node = state.setdefault(int(i), {})
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = v
    return state
