"""What every objective shares: the contract, condition dropout and the loss in the network's own space.

An objective is a small callable ``objective(model, batch) -> (loss, logs)`` (EDM's ``training/loss.py``
style); batches are dicts of tensors with ``images`` (x_0: pixels in [−1, 1], or VAE latents) and the
cached conditioning of each image. ``model`` is a σ-space denoiser (:mod:`fewstep.core.denoisers`),
possibly wrapped by DDP.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from ..core.denoisers import append_dims, unwrap

__all__ = ["Cond", "ConditionFn", "TeacherFn", "drop_condition", "dropout_condition", "is_fsdp_module",
           "load_optimizer_state",
           "optimizer_state", "rng_state", "set_rng_state", "unwrap", "weighted_mse"]

Cond = dict[str, Tensor]
ConditionFn = Callable[[dict], Cond]                            # batch → the student's conditioning
TeacherFn = Callable[[Cond], tuple[Callable[..., Tensor], Cond]]  # cond → (denoiser, extra_args)


def drop_condition(cond: Cond, null: Cond, p: float) -> Cond:
    """Replace each sample's condition by the unconditional one with probability p (Ho & Salimans 2022,
    Algorithm 1): a class label by the null class, a prompt embedding (or token ids) by the empty
    prompt's. ``null`` holds one unconditional value per key, broadcast over the batch."""
    if p <= 0 or not cond:
        return cond
    first = next(iter(cond.values()))
    drop = torch.rand(len(first), device=first.device) < p
    return {k: torch.where(append_dims(drop, v.ndim), null[k].to(v), v) for k, v in cond.items()}


def dropout_condition(keys: dict[str, str], null: Cond, p: float) -> ConditionFn:
    """batch → ``{denoiser keyword: batch[key]}`` for ``keys`` = {denoiser keyword: batch key}, with
    :func:`drop_condition` at rate ``p``."""
    return lambda batch: drop_condition({k: batch[b] for k, b in keys.items()}, null, p)


def weighted_mse(model: nn.Module, out: Tensor, target: Tensor, sigma: Tensor) -> Tensor:
    """E[λ(σ)·‖out − target‖²] with λ(σ) = 1/c_out(σ)² (Karras et al. 2022, eq. 8): plain MSE in the
    network's own output space, whatever it predicts (EDM's F, ε: λ = 1/σ², v, x_0). The weighting of
    the denoising loss and of guided and progressive distillation."""
    c_out = unwrap(model).scalings(sigma)[1]
    return ((out.float() - target.float()) / append_dims(c_out.float(), out.ndim)).square().mean()


def optimizer_state(optimizer: torch.optim.Optimizer, prefix: str) -> dict[str, Tensor]:
    """An optimizer's per-parameter state as flat tensors (a checkpoint's safetensors; its hyper-parameters are
    the recipe's): ``{prefix}{index}.{name}``."""
    return {f"{prefix}{i}.{k}": torch.as_tensor(v) for i, s in optimizer.state_dict()["state"].items()
            for k, v in s.items()}


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Tensor], prefix: str) -> None:
    """The inverse of :func:`optimizer_state`."""
    opt: dict[int, dict[str, Tensor]] = {}
    for k, v in state.items():
        if k.startswith(prefix):
            i, name = k[len(prefix):].split(".", 1)
            opt.setdefault(int(i), {})[name] = v
    optimizer.load_state_dict({"state": opt, "param_groups": optimizer.state_dict()["param_groups"]})


def is_fsdp_module(module: nn.Module) -> bool:
    """A module sharded by FSDP2 (:mod:`fewstep.training.sharding`): its forward all-gathers, so every process must
    run it, whatever its own batch holds."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def rng_state(device: torch.device) -> tuple:
    """The CPU (and CUDA) random state, to replay the same dropout masks in a second pass (openai/consistency_models)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda, device


def set_rng_state(state: tuple) -> None:
    """Restore a :func:`rng_state`."""
    cpu, cuda, device = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)

