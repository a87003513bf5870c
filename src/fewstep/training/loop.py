"""One training loop for every objective (nanoGPT-style: flat, ordered, config saved in every checkpoint).

An objective is a callable ``objective(model, batch) -> (loss, logs)``; the loop owns everything
else: accelerate (multi-process DDP, mixed precision), gradient accumulation, clipping, linear
LR warm-up, EMA, atomic checkpoints, exact resume, a progress bar and a JSON-lines metrics log.
An objective with state of its own (a target network, a discriminator) may also define
``state_dict()``/``load_state_dict()`` (tensors, checkpointed beside the model) and
``after_step(model, step)`` (called after every optimizer step, e.g. to update a target network).

Determinism and exact resume: the data order is a function of (seed, epoch) and every
micro-batch reseeds torch's RNG from (seed, step, g), g = micro-step × processes + rank its place in the global
batch, so a run restored at step s replays exactly what an uninterrupted run does from s on, and P processes
with accumulation a run what one process with accumulation a·P runs (the same micro-batches, the same random
numbers; up to the order of the gradient sums). The data is a dict of tensors a batch is cut
from, or :class:`Batches` that compute each batch from its indices (random crops and flips, latents
encoded on the fly: :class:`fewstep.models.data.PerBatch`) with a generator of their own, seeded from
(seed, step, g) as well, so that a resumed run sees the same crops and the objective's
random numbers are those it draws without them. Checkpoints hold model, optimizer, EMA,
objective state and the step; they are safetensors + JSON (no pickles), written to a temporary
folder and renamed into place, and only the last ``keep_checkpoints`` are kept.

Under FSDP (``accelerate launch --use_fsdp --fsdp_version 2``; :mod:`fewstep.training.sharding`) the student,
its gradients, the optimizer's moments, the EMA, an objective's target network and the frozen modules a recipe
names are sharded over the processes; gradient clipping takes the global norm over the shards; checkpoints and the
returned modules are gathered to full tensors, so they are those of an unsharded run (and resume at any process
count). A checkpoint is loaded after ``prepare`` in every case, each process cutting its shard from the full
tensors.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import FewstepError, TrainingDiverged
from .checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint, truncate_log
from .config import TrainConfig
from .optimizers import make_optimizer
from .runs import WorkDirLock, last_good_checkpoint
from .sharding import (
    default_wrap_policy,
    enable_fsdp,
    gathered,
    is_sharded,
    local_numel,
    make_accelerator,
    shard,
    skeleton,
    unsharded,
)


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
    shards: dict | None = None  # under FSDP: the process count and the parameter elements each process held


def train(model: nn.Module, objective: Objective, data: dict[str, Tensor] | Batches, config: TrainConfig,
          accelerator: Accelerator | None = None, params: list[nn.Parameter] | None = None,
          frozen: list[nn.Module] | None = None, everywhere: bool = False) -> TrainResult:
    """Train ``model`` (the module whose weights are optimized) on in-memory ``data`` tensors, or on
    :class:`Batches` computed per batch.

    ``params`` restricts what is optimized (e.g. LoRA weights); default: every parameter that
    requires grad. ``frozen``: modules the objective runs but does not train (a teacher's denoiser, the module its
    forward is called on): sharded like the student under FSDP, left as they are otherwise. Resumes from the latest
    checkpoint in ``config.out_dir`` if there is one (of the same run: :func:`fewstep.training.runs.check_resume`);
    one run at a time per folder (a lock file).

    Under FSDP the returned modules are plain (unsharded) on the main process; the other processes get the sharded
    student back (they save nothing), or, with ``everywhere``, the plain modules too (a stage whose result the next
    stage runs on every process: the VAE before its pipeline's UNet).
    """
    acc = enable_fsdp(accelerator or make_accelerator(config.mixed_precision))
    with WorkDirLock(config.out_dir) if acc.is_main_process else contextlib.nullcontext():
        return _train(model, objective, data, config, acc, params, frozen or [], everywhere)


@dataclass
class _Run:
    """What :func:`_train` works on: the prepared (possibly sharded) student, its optimizer and EMA, where it
    resumed, and under FSDP what the result is gathered into."""

    ddp_model: nn.Module
    trained: nn.Module
    optimizer: Any
    params: list[nn.Parameter]
    names: list[str]
    saved: set[str] | None
    ema: EMAModel | None
    sharded: bool
    keep: bool = True                  # this process returns plain modules (FSDP: the main one, or all with everywhere)
    frame: nn.Module | None = None     # FSDP: the plain module the result is gathered into
    step: int = 0
    elapsed: float = 0.0
    shards: dict | None = None


def _train(model: nn.Module, objective: Objective, data: dict[str, Tensor] | Batches, config: TrainConfig,
           acc: Accelerator, params: list[nn.Parameter] | None, frozen: list[nn.Module], everywhere: bool = False
           ) -> TrainResult:
    out = Path(config.out_dir)
    ckpt_root = out / "checkpoints"
    n_data = len(data) if hasattr(data, "batch") else len(next(iter(data.values())))
    micro = _micro_batch_size(config, acc.num_processes)
    run = _prepare(model, objective, config, acc, params, frozen, everywhere, ckpt_root)
    log_path = out / "metrics.jsonl"
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        truncate_log(log_path, run.step)
    bar = tqdm(total=config.max_steps, initial=run.step, disable=not (config.progress and acc.is_main_process),
               desc="training", dynamic_ncols=True)
    loss_value, t0 = float("nan"), time.time()
    order = _DataOrder(n_data, config.seed)
    while run.step < config.max_steps:
        lr = config.lr * min(1.0, (run.step + 1) / max(1, config.warmup_steps))
        loss_value, logs, grad_norm = _optimizer_step(run, objective, data, config, acc, order, micro, lr, bar,
                                                      ckpt_root)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}")
        if acc.is_main_process and (run.step % config.log_every == 0 or run.step == config.max_steps):
            record = {"step": run.step, "loss": loss_value, "lr": lr, "time": round(time.time() - t0, 3),
                      **({"grad_norm": float(grad_norm)} if grad_norm is not None else {}), **logs}
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if run.step % config.checkpoint_every == 0 or run.step == config.max_steps:
            if not _all_finite(acc, [*run.trained.parameters(), *ema_params(run.ema)]):
                bar.close()
                _diverged(f"the weights became non-finite by step {run.step} (loss {loss_value:.4g}); nothing was "
                          f"saved", ckpt_root)
            if run.sharded or acc.is_main_process:              # under FSDP every process takes part in gathering
                save_checkpoint(ckpt_root, run.step, run.trained, run.optimizer, run.ema, objective, config,
                                run.elapsed + time.time() - t0, run.saved, write=acc.is_main_process)
            acc.wait_for_everyone()
    bar.close()
    return _result(run, config, loss_value, run.elapsed + time.time() - t0)


def _prepare(model: nn.Module, objective: Objective, config: TrainConfig, acc: Accelerator,
             params: list[nn.Parameter] | None, frozen: list[nn.Module], everywhere: bool, ckpt_root: Path) -> _Run:
    """The student and its optimizer through ``acc.prepare`` (and FSDP's sharding of it, its objective's own
    networks and ``frozen``), its EMA, and the latest checkpoint loaded into them."""
    sharded = is_sharded(acc)
    params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    names = _names(model, params)
    saved = _saved_names(model, params)
    if sharded:
        _check_shardable(config)
    optimizer = make_optimizer(params, config.optimizer, config.lr, config.adam_betas, config.weight_decay)
    keep, frame, own = True, None, []
    if sharded:
        keep = acc.is_main_process or everywhere
        frame = skeleton(model) if keep else None          # the plain module the result is gathered into
        default_wrap_policy(acc, model)
        own = objective.networks(model) if hasattr(objective, "networks") else []   # made from the unsharded student
    ddp_model, optimizer = acc.prepare(model, optimizer)
    trained = acc.unwrap_model(ddp_model)
    if sharded:
        for module in (*own, *frozen):
            shard(acc, module)
        named = dict(trained.named_parameters())
        params = [named[n] for n in names]                      # the sharded parameters that replaced them
    ema = EMAModel(params, decay=config.ema_decay, use_ema_warmup=config.ema_warmup) if config.ema_decay > 0 else None
    run = _Run(ddp_model, trained, optimizer, params, names, saved, ema, sharded, keep, frame)
    latest = latest_checkpoint(ckpt_root)
    if latest is not None:
        run.step, run.elapsed = load_checkpoint(latest, trained, optimizer, ema, objective, config, saved)
    run.shards = _shards(acc, trained, [*own, *frozen]) if sharded else None
    return run


def _optimizer_step(run: _Run, objective: Objective, data, config: TrainConfig, acc: Accelerator,
                    order: "_DataOrder", micro: int, lr: float, bar, ckpt_root: Path) -> tuple[float, dict, Any]:
    """One optimizer step of ``config.grad_accum`` micro-batches (each seeded by its place in the global batch):
    (the step's mean loss over processes, the objective's logs, the gradient norm before clipping)."""
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    total, logs = torch.zeros(()), {}
    for m in range(config.grad_accum):
        g = m * acc.num_processes + acc.process_index      # the micro-batch's place in the global batch
        torch.manual_seed(_seed(config.seed, run.step, g, 0))
        idx = order.indices(run.step * config.batch_size + g * micro, micro)
        batch = {k: v.to(acc.device) for k, v in _batch(data, idx, config.seed, run.step, g, 0).items()}
        # DDP all-reduces once per step; FSDP reduce-scatters every micro-batch, since holding the gradients
        # unsharded until the last one (its no_sync) would keep a full gradient copy on every process
        last = m == config.grad_accum - 1
        sync = acc.no_sync(run.ddp_model) if not (last or run.sharded) else contextlib.nullcontext()
        with sync:
            with acc.autocast():
                loss, logs = objective(run.ddp_model, batch)
            acc.backward(loss / config.grad_accum)
        total = total + loss.detach().float().cpu() / config.grad_accum
    loss_value = float(acc.reduce(total.to(acc.device), reduction="mean"))
    if not math.isfinite(loss_value):
        bar.close()
        _diverged(f"loss became {loss_value} at step {run.step}; training stopped with no further update", ckpt_root)
    grad_norm = acc.clip_grad_norm_(run.params, config.grad_clip) if config.grad_clip > 0 else None
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.step(run.params)
    run.step += 1
    if hasattr(objective, "after_step"):
        objective.after_step(run.trained, run.step)
    return loss_value, logs, grad_norm


def _result(run: _Run, config: TrainConfig, loss_value: float, seconds: float) -> TrainResult:
    """The online and EMA weights as plain modules (under FSDP gathered from the shards on the processes that
    keep them; the others get the sharded student back)."""
    if not run.sharded:
        averaged = run.trained if run.ema is None else _with_ema_weights(run.trained, run.ema, run.params)
        return TrainResult(run.trained, averaged, run.step, loss_value, seconds, config)
    online = gathered(run.trained.state_dict(), keep=run.keep)
    shadow = gathered(dict(zip(run.names, run.ema.shadow_params)), keep=run.keep) if run.ema is not None else None
    if not run.keep:
        return TrainResult(run.trained, run.trained, run.step, loss_value, seconds, config, run.shards)
    plain = unsharded(run.frame, online)
    averaged = plain
    if shadow is not None:
        averaged = copy.deepcopy(plain)
        averaged.load_state_dict(shadow, strict=False)
    return TrainResult(plain, averaged, run.step, loss_value, seconds, config, run.shards)


def ema_params(ema: EMAModel | None) -> list[Tensor]:
    return [] if ema is None else list(ema.shadow_params)


def _names(model: nn.Module, params: list[nn.Parameter]) -> list[str]:
    """The names of ``params`` in ``model``, in their order (to find them again once FSDP has replaced them)."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for p in params]


def _check_shardable(config: TrainConfig) -> None:
    if config.optimizer == "adamw-8bit":
        raise FewstepError("--optimizer adamw-8bit does not run under FSDP here (bitsandbytes' quantized states are "
                           "not sharded tensors); use --optimizer adamw, whose moments FSDP shards")


def _all_finite(acc: Accelerator, tensors: list[Tensor]) -> bool:
    """Every process's weights (its shards under FSDP) are finite."""
    local = all(bool(torch.isfinite(t.to_local() if hasattr(t, "to_local") else t).all()) for t in tensors)
    if acc.num_processes == 1:
        return local
    return int(acc.reduce(torch.tensor(int(local), device=acc.device), reduction="sum")) == acc.num_processes


def _shards(acc: Accelerator, trained: nn.Module, others: list[nn.Module]) -> dict:
    """What each process holds under FSDP: the student's parameter elements and those of the other sharded
    modules (target networks, frozen teachers), per rank, beside their totals."""
    held = torch.tensor([local_numel(trained), sum(local_numel(m) for m in others)], device=acc.device)
    per_rank = acc.gather(held[None]).cpu().tolist()
    return {"processes": acc.num_processes, "parameters": sum(p.numel() for p in trained.parameters()),
            "held": [r[0] for r in per_rank], "other_parameters": sum(p.numel() for m in others for p in m.parameters()),
            "other_held": [r[1] for r in per_rank]}


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
