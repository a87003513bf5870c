"""The settings of one training run (:class:`TrainConfig`), saved in every checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainConfig:
    """Settings of one training run; saved in every checkpoint's state.json."""

    out_dir: str = "runs/run"          # checkpoints/ and metrics.jsonl go here
    max_steps: int = 1000              # optimizer steps
    batch_size: int = 128              # global batch per optimizer step (all processes × accumulation)
    grad_accum: int = 1                # micro-batches per optimizer step
    lr: float = 2e-4
    warmup_steps: int = 100            # linear LR warm-up from 0; avoids early Adam blow-ups
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    optimizer: str = "adamw"           # "adamw" | "adamw-fused" | "adamw-8bit" (fewstep.training.optimizers)
    grad_clip: float = 1.0             # max global grad norm; 0 disables
    ema_decay: float = 0.999           # EMA of the weights, which is what gets saved as the model; 0: no EMA copy
                                       # (the online weights are saved; diffusers' LCD script does so, and a
                                       # full-size UNet's EMA is 3.4 GB more)
    ema_warmup: bool = True            # diffusers' 1 − (1+step)^−2/3 ramp: useful EMA even in short runs
    mixed_precision: str = "no"        # "no" | "fp16" | "bf16" (GPU users)
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 25
    seed: int = 0
    progress: bool = True              # tqdm bar on the main process
    force_resume: bool = False         # resume a checkpoint whose defining settings differ (fewstep.training.runs)
    memory_check: bool = True          # recipes refuse a run whose weights cannot fit (fewstep.training.memory)
    extra: dict[str, Any] = field(default_factory=dict)  # the objective's own settings, for the record
