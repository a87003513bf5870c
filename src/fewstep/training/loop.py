"""One training loop for every objective (nanoGPT-style: flat, ordered, config saved in every checkpoint).

An objective is a callable ``objective(model, batch) -> (loss, logs)``; the loop owns everything
else: accelerate (multi-process DDP, mixed precision), gradient accumulation, clipping, linear
LR warm-up, EMA, atomic checkpoints, exact resume, a progress bar and a JSON-lines metrics log.
An objective with state of its own (a target network, a discriminator) may also define
``state_dict()``/``load_state_dict()`` (tensors, checkpointed beside the model) and
``after_step(model, step)`` (called after every optimizer step, e.g. to update a target network).

Determinism and exact resume: the data order is a function of (seed, epoch) and every
micro-batch reseeds torch's RNG from (seed, step, micro-step, rank), so a run restored at step s
replays exactly what an uninterrupted run does from s on. The data is a dict of tensors a batch is cut
from, or :class:`Batches` that compute each batch from its indices (random crops and flips, latents
encoded on the fly: :class:`fewstep.models.data.PerBatch`) with a generator of their own, seeded from
(seed, step, micro-step, rank) as well, so that a resumed run sees the same crops and the objective's
random numbers are those it draws without them. Checkpoints hold model, optimizer, EMA,
objective state and the step; they are safetensors + JSON (no pickles), written to a temporary
folder and renamed into place, and only the last ``keep_checkpoints`` are kept.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import FewstepError, TrainingDiverged
from ..io.atomic import allow_replacing, atomic_path, read_marker
from ..io.validate import check_checkpoint_state, load_json, metrics_records
from .optimizers import flat_state, make_optimizer, nested_state
from .runs import WorkDirLock, all_finite, check_resume, last_good_checkpoint


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


class Batches(Protocol):
    """Training data computed per batch: ``batch(indices, generator)`` → the batch's tensors."""

    def __len__(self) -> int: ...

    def batch(self, index: Tensor, generator: torch.Generator) -> dict[str, Tensor]: ...


class Objective(Protocol):
    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]: ...


@dataclass
class TrainResult:
    model: nn.Module       # the trained (online) weights
    ema: nn.Module         # the EMA weights
    step: int
    last_loss: float
    seconds: float = 0.0   # wall-clock of the whole run, resumed parts included
    config: TrainConfig | None = None  # the run's settings


def train(model: nn.Module, objective: Objective, data: dict[str, Tensor] | Batches, config: TrainConfig,
          accelerator: Accelerator | None = None, params: list[nn.Parameter] | None = None) -> TrainResult:
    """Train ``model`` (the module whose weights are optimized) on in-memory ``data`` tensors, or on
    :class:`Batches` computed per batch.

    ``params`` restricts what is optimized (e.g. LoRA weights); default: every parameter that
    requires grad. Resumes from the latest checkpoint in ``config.out_dir`` if there is one (of the same
    run: :func:`fewstep.training.runs.check_resume`); one run at a time per folder (a lock file).
    """
    acc = accelerator or Accelerator(mixed_precision=config.mixed_precision)
    with WorkDirLock(config.out_dir) if acc.is_main_process else contextlib.nullcontext():
        return _train(model, objective, data, config, acc, params)


def _train(model: nn.Module, objective: Objective, data: dict[str, Tensor] | Batches, config: TrainConfig,
           acc: Accelerator, params: list[nn.Parameter] | None) -> TrainResult:
    out = Path(config.out_dir)
    ckpt_root = out / "checkpoints"
    n_data = len(data) if hasattr(data, "batch") else len(next(iter(data.values())))
    micro = _micro_batch_size(config, acc.num_processes)

    params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, config.optimizer, config.lr, config.adam_betas, config.weight_decay)
    ema = EMAModel(params, decay=config.ema_decay, use_ema_warmup=config.ema_warmup) if config.ema_decay > 0 else None
    saved = _saved_names(model, params)
    step, elapsed = 0, 0.0
    latest = latest_checkpoint(ckpt_root)
    if latest is not None:
        step, elapsed = _load_checkpoint(latest, model, optimizer, ema, objective, config, saved)
    ddp_model, optimizer = acc.prepare(model, optimizer)

    log_path = out / "metrics.jsonl"
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        _truncate_log(log_path, step)
    bar = tqdm(total=config.max_steps, initial=step, disable=not (config.progress and acc.is_main_process),
               desc="training", dynamic_ncols=True)
    loss_value, t0 = float("nan"), time.time()
    order = _DataOrder(n_data, config.seed)

    while step < config.max_steps:
        lr = config.lr * min(1.0, (step + 1) / max(1, config.warmup_steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        total, logs = torch.zeros(()), {}
        for m in range(config.grad_accum):
            torch.manual_seed(_seed(config.seed, step, m, acc.process_index))
            start = step * config.batch_size + (m * acc.num_processes + acc.process_index) * micro
            idx = order.indices(start, micro)
            batch = {k: v.to(acc.device) for k, v in _batch(data, idx, config.seed, step, m, acc.process_index).items()}
            sync = acc.no_sync(ddp_model) if m < config.grad_accum - 1 else contextlib.nullcontext()
            with sync:
                with acc.autocast():
                    loss, logs = objective(ddp_model, batch)
                acc.backward(loss / config.grad_accum)
            total = total + loss.detach().float().cpu() / config.grad_accum
        loss_value = float(acc.reduce(total.to(acc.device), reduction="mean"))
        if not math.isfinite(loss_value):
            bar.close()
            _diverged(f"loss became {loss_value} at step {step}; training stopped with no further update", ckpt_root)
        grad_norm = acc.clip_grad_norm_(params, config.grad_clip) if config.grad_clip > 0 else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(params)
        step += 1
        if hasattr(objective, "after_step"):
            objective.after_step(acc.unwrap_model(ddp_model), step)

        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}")
        if acc.is_main_process and (step % config.log_every == 0 or step == config.max_steps):
            record = {"step": step, "loss": loss_value, "lr": lr, "time": round(time.time() - t0, 3),
                      **({"grad_norm": float(grad_norm)} if grad_norm is not None else {}), **logs}
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if step % config.checkpoint_every == 0 or step == config.max_steps:
            if not (all_finite(model) and all(bool(torch.isfinite(p).all()) for p in ema_params(ema))):
                bar.close()
                _diverged(f"the weights became non-finite by step {step} (loss {loss_value:.4g}); nothing was saved",
                          ckpt_root)
            if acc.is_main_process:
                save_checkpoint(ckpt_root, step, acc.unwrap_model(ddp_model), optimizer, ema, objective, config,
                                elapsed + time.time() - t0, saved)
            acc.wait_for_everyone()
    bar.close()

    trained = acc.unwrap_model(ddp_model)
    averaged = trained if ema is None else _with_ema_weights(trained, ema, params)
    return TrainResult(trained, averaged, step, loss_value, elapsed + time.time() - t0, config)


def ema_params(ema: EMAModel | None) -> list[Tensor]:
    return [] if ema is None else list(ema.shadow_params)


def _saved_names(model: nn.Module, params: list[nn.Parameter]) -> set[str] | None:
    """What a checkpoint holds of the model: None (its whole state) unless only some of its parameters train
    (a LoRA): then just those, since the frozen rest is the base model the run starts from anyway. A LoRA
    checkpoint of a full-size UNet is then its adapter's size (MBs), not the UNet's (GBs)."""
    ids = {id(p) for p in params}
    named = dict(model.named_parameters())
    if len(ids) == len(named):
        return None
    return {n for n, p in named.items() if id(p) in ids}


def _diverged(what: str, ckpt_root: Path) -> None:
    last = last_good_checkpoint(ckpt_root)
    raise TrainingDiverged(f"{what}. Last good checkpoint: {last or 'none'}. Try a lower --lr or a smaller --grad-clip.")


def _with_ema_weights(trained: nn.Module, ema: EMAModel, params: list[nn.Parameter]) -> nn.Module:
    """A copy of ``trained`` whose ``params`` hold their EMA (the weights a model folder saves)."""
    ema_model = copy.deepcopy(trained)
    names = {id(p): n for n, p in trained.named_parameters()}
    ema_named = dict(ema_model.named_parameters())
    ema.copy_to([ema_named[names[id(p)]] for p in params])
    return ema_model


# --- checkpoints -------------------------------------------------------------------------------
def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint folder (``step-0001000``) under ``root``, or None."""
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step-*") if _is_checkpoint(p))    # never a user's folder of that name
    return done[-1] if done else None


def save_checkpoint(root: Path, step: int, model: nn.Module, optimizer, ema: EMAModel | None, objective,
                    config: TrainConfig, elapsed: float = 0.0, names: set[str] | None = None) -> Path:
    """Write ``root/step-NNNNNNN`` atomically (temporary folder, then rename); keep the last K. ``names``:
    the model's entries to keep (default all; :func:`_saved_names`)."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    legacy = [final] if _is_checkpoint(final) else []      # one written before markers: fewstep's own too
    with allow_replacing(*legacy), atomic_path(final, directory=True, kind="checkpoint") as tmp:
        state_dict = model.state_dict() if names is None else {k: v for k, v in model.state_dict().items() if k in names}
        save_file(_contiguous(state_dict), tmp / "model.safetensors")
        ema_state = ema.state_dict() if ema is not None else {"shadow_params": []}
        save_file({f"shadow.{i}": p.detach().contiguous() for i, p in enumerate(ema_state.pop("shadow_params"))},
                  tmp / "ema.safetensors")
        opt_state = optimizer.state_dict()
        opt_tensors, opt_values = flat_state(opt_state["state"])
        save_file(_contiguous(opt_tensors), tmp / "optimizer.safetensors")   # 8-bit AdamW shares its quantization maps
        if hasattr(objective, "state_dict"):
            save_file(_contiguous(objective.state_dict()), tmp / "objective.safetensors")
        state = {"step": step, "elapsed_seconds": elapsed, "config": asdict(config), "ema": ema_state if ema else None,
                 "partial": names is not None,
                 "optimizer_param_groups": opt_state["param_groups"], "optimizer_values": opt_values}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
    for old in sorted(p for p in root.glob("step-*") if _is_checkpoint(p))[: -config.keep_checkpoints]:
        shutil.rmtree(old)                                  # only checkpoints fewstep wrote, never another folder
    return final


def _is_checkpoint(folder: Path) -> bool:
    """A checkpoint folder fewstep wrote: marked so (:func:`fewstep.io.atomic.read_marker`), or written before
    markers existed, with a state.json holding what :func:`save_checkpoint` writes (not the name alone)."""
    if not folder.is_dir():
        return False
    marker = read_marker(folder)
    if marker is not None:
        return marker.get("kind") == "checkpoint" and (folder / "state.json").is_file()
    try:
        state = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and {"step", "config", "optimizer_param_groups"} <= set(state)


def _load_checkpoint(path: Path, model: nn.Module, optimizer, ema: EMAModel | None, objective,
                     config: TrainConfig, names: set[str] | None = None) -> tuple[int, float]:
    try:
        state = load_json(path / "state.json", "a checkpoint's state.json (a JSON object)", require_object=False)
    except (OSError, ValueError, FewstepError) as e:
        raise FewstepError(f"cannot resume from checkpoint {path}: {e}. Delete it to resume from an earlier one.") from None
    if not isinstance(state, dict) or not isinstance(state.get("config", {}), dict):
        raise FewstepError(f"cannot resume from checkpoint {path}: its state.json is not fewstep's. Delete it to resume "
                           f"from an earlier one.")
    check_checkpoint_state(state, path / "state.json", int(path.name.rpartition("-")[2]))
    saved = {**asdict(TrainConfig()), **state.get("config", {})}    # a field newer than the checkpoint: its default
    check_resume(json.loads(json.dumps(saved)), json.loads(json.dumps(asdict(config))), path, config.force_resume)
    try:
        weights = load_file(path / "model.safetensors")
        if names is not None and set(weights) != names:
            raise ValueError(f"it holds {len(weights)} tensors where this run trains {len(names)}")
        model.load_state_dict(weights, strict=names is None)
        if ema is not None:
            shadow = load_file(path / "ema.safetensors")
            ema.load_state_dict({**state["ema"], "shadow_params": [shadow[f"shadow.{i}"] for i in range(len(shadow))]})
        opt_state = nested_state(load_file(path / "optimizer.safetensors"), state.get("optimizer_values", {}))
        optimizer.load_state_dict({"state": opt_state, "param_groups": state["optimizer_param_groups"]})
        if hasattr(objective, "load_state_dict") and (path / "objective.safetensors").exists():
            objective.load_state_dict(load_file(path / "objective.safetensors"))
    except (OSError, KeyError, ValueError, RuntimeError, SafetensorError) as e:
        raise FewstepError(f"cannot resume from checkpoint {path}: {e}. Delete it to resume from an earlier one.") from None
    return int(state["step"]), float(state.get("elapsed_seconds", 0.0))


# --- helpers -----------------------------------------------------------------------------------
class _DataOrder:
    """Epoch-wise permutations of the data, a function of (seed, epoch) only."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self._cache = n, seed, {}

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._cache:
            self._cache = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))}
        return self._cache[epoch]

    def indices(self, start: int, count: int) -> Tensor:
        pos = torch.arange(start, start + count)
        out = torch.empty(count, dtype=torch.long)
        for epoch in (pos // self.n).unique().tolist():
            mask = pos // self.n == epoch
            out[mask] = self._perm(epoch)[pos[mask] % self.n]
        return out


def _batch(data: dict[str, Tensor] | Batches, idx: Tensor, *seed: int) -> dict[str, Tensor]:
    """The micro-batch at ``idx``: cut from the tensors, or computed by the :class:`Batches` with a generator
    seeded from (seed, step, micro-step, rank) (apart from torch's RNG, which the objective draws from)."""
    if not hasattr(data, "batch"):
        return {k: v[idx] for k, v in data.items()}
    return data.batch(idx, torch.Generator().manual_seed(_seed(*seed, "data")))


def _micro_batch_size(config: TrainConfig, processes: int) -> int:
    parts = config.grad_accum * processes
    if config.batch_size % parts:
        raise FewstepError(f"batch size {config.batch_size} must be divisible by grad_accum × processes = {parts}")
    return config.batch_size // parts


def _seed(*parts: int) -> int:
    return int(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:15], 16)


def _contiguous(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """``sd`` as safetensors takes it: contiguous, no two entries on one storage (tied weights are copied, the
    rest written in place, so a checkpoint of a full-size UNet does not hold a second copy in memory)."""
    seen, out = set(), {}
    for k, v in sd.items():
        t = v.detach().contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[k] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


def _truncate_log(path: Path, step: int) -> None:
    """On resume, drop log lines past the checkpoint so the log matches an uninterrupted run."""
    if not path.exists():
        return
    keep = [line for line, logged in metrics_records(path) if logged <= step]   # (a garbled line: one clear error)
    path.write_text("".join(line + "\n" for line in keep))
