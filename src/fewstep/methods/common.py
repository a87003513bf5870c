"""What every recipe shares: the accelerate set-up, the training loop call, which process saves, and the
training record a model folder keeps.

A recipe (one module per method) builds a student from its teacher, picks an objective, runs
:meth:`Run.fit` and saves the result; it holds no formula of its own (those are in :mod:`fewstep.core`
and :mod:`fewstep.objectives`)::

    run = Run(config, command, accelerator)
    teacher.to(run.device)
    result = run.fit(student, objective, teacher.training_data(data), settings,  # once, or per batch
                     frozen=[teacher.denoiser])  # sharded with the student under FSDP
    if result is None:            # not the main process: it saves nothing
        return None
    return save_model(out, teacher.derive(net=..., config=...), readme)
"""

from __future__ import annotations

from dataclasses import asdict, is_dataclass, replace
from typing import Any

import torch
from torch import nn

from ..training import TrainConfig, TrainResult, train
from ..training.sharding import enable_fsdp, is_sharded, make_accelerator


class Run:
    """One training run of a recipe: its config, the command that started it and its accelerator."""

    def __init__(self, config: TrainConfig, command: str = "", accelerator=None) -> None:
        self.config, self.command = config, command
        self.accelerator = enable_fsdp(accelerator or make_accelerator(config.mixed_precision))
        torch.manual_seed(config.seed)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def sharded(self) -> bool:
        """Under FSDP (``accelerate launch --use_fsdp``): the weights are sharded over :attr:`processes`."""
        return is_sharded(self.accelerator)

    @property
    def is_main(self) -> bool:
        """The process that writes (the others train and save nothing)."""
        from accelerate.state import PartialState

        return PartialState().is_main_process

    def fit(self, model: nn.Module, objective, data, settings: Any = None,
            params: list[nn.Parameter] | None = None, frozen: list[nn.Module] | None = None,
            **config_changes: Any) -> TrainResult | None:
        """Train ``model`` on ``data`` (tensors, or :class:`fewstep.training.loop.Batches` computed per batch; the
        recipe's ``settings`` recorded in every checkpoint); the result
        on the main process, None on the others, which save nothing. ``frozen``: the teacher's modules the
        objective calls (its denoiser), sharded like the student under FSDP (in place: the teacher is then for this
        run only); a frozen module not named here stays whole on every process."""
        extra = {**(asdict(settings) if is_dataclass(settings) else settings or {}), **config_changes.pop("extra", {})}
        config = replace(self.config, extra=extra, **config_changes)
        result = train(model, objective, data, config, self.accelerator, params=params, frozen=frozen)
        return result if self.is_main else None

    def record(self, method: str, result: TrainResult, teacher: Any = None, **extra: Any) -> dict:
        """What a model folder records of its training: the command, the method, steps, final loss, wall-clock
        on how many threads and processes (under FSDP, the parameter elements each process held: ``fsdp``), the
        teacher and the full config."""
        return {"command": self.command, "method": method, "steps": result.step, "final_loss": result.last_loss,
                "wall_seconds": round(result.seconds, 1), "threads": torch.get_num_threads(),
                "processes": self.accelerator.num_processes, "teacher": None if teacher is None else str(teacher),
                **({"fsdp": result.shards} if result.shards else {}), **extra,
                "config": asdict(result.config or self.config)}


def parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def readme(title: str, what: str, usage: str, command: str) -> str:
    """A model folder's README.md: what it is, how to use it, the command that made it."""
    return f"# {title}\n\n{what}\n\n{usage}\n\nTrained with:\n\n```\n{command}\n```\n"
