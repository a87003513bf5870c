"""Stream batching (StreamDiffusion, Kodaira et al. 2023, §3.1): the network calls of every request in flight
run as ONE batch, whatever step each request is at.

Each request runs the ordinary sampler (:func:`fewstep.sampling.generate.generate`) in its own thread; its
model's denoiser and decoder are :class:`Batched` stand-ins whose calls wait here. One thread merges the
waiting calls that can share a batch (same key: the same function with the same LoRA weights, tensors of the
same trailing shapes), concatenates them along the batch, runs the real function once and hands each caller
its slice. A batch starts as soon as every request in flight is waiting (none is left to join), or
``max_wait`` seconds after its oldest call came or the previous batch ended (whichever is later: the requests
that batch served get that long to take their step and join again), so a request between calls never holds
the others up for long. A single request
therefore computes exactly what ``generate`` computes alone (one call, no concatenation), and concurrent ones
cost one network evaluation per step between them instead of one each.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


class Cancelled(Exception):
    """The request was superseded (latest wins), its client left, or the server is stopping."""


@dataclass(eq=False)          # one request: two tickets are never "equal" because their flags are
class Ticket:
    """One request in flight: its cancellation flag."""

    cancelled: bool = False


def tensor_signature(args: tuple[Tensor, ...], kwargs: dict[str, Tensor]) -> tuple:
    """Batch-first tensors' per-row shapes and dtypes (and the keyword names): what two calls' inputs must share
    to be concatenated, or to replay one trace."""
    return (tuple((tuple(a.shape[1:]), a.dtype) for a in args),
            tuple((k, tuple(v.shape[1:]), v.dtype) for k, v in sorted(kwargs.items())))


@dataclass(eq=False)          # a call is itself: compared by identity (the default eq would compare its tensors)
class _Call:
    key: Hashable
    fn: Callable[..., Tensor]
    args: tuple[Tensor, ...]
    kwargs: dict[str, Tensor]
    ticket: Ticket
    since: float = field(default_factory=time.perf_counter)
    done: threading.Event = field(default_factory=threading.Event)
    result: Tensor | None = None
    error: BaseException | None = None

    @property
    def size(self) -> int:
        return len(self.args[0])

    def signature(self) -> tuple:
        """What must agree for two calls to share a batch."""
        return (self.key, *tensor_signature(self.args, self.kwargs))


class MicroBatcher:
    """Merges concurrent calls into batches of at most ``max_batch`` rows (module docstring)."""

    def __init__(self, max_batch: int = 64, max_wait: float = 0.004) -> None:
        self.max_batch, self.max_wait = max_batch, max_wait
        self._cond = threading.Condition()
        self._pending: list[_Call] = []
        self._active = 0              # requests in flight (each waits on at most one call at a time)
        self._stopped = False
        self._free_since = 0.0        # when the last batch ended
        self.batches = self.rows = 0  # counters: batches run and rows in them
        self._thread = threading.Thread(target=self._loop, name="fewstep-batcher", daemon=True)
        self._thread.start()

    # --- the requests' side ------------------------------------------------------------------
    def enter(self) -> None:
        with self._cond:
            self._active += 1

    def leave(self) -> None:
        with self._cond:
            self._active -= 1
            self._cond.notify_all()

    def call(self, ticket: Ticket, key: Hashable, fn: Callable[..., Tensor], *args: Tensor, **kwargs: Tensor) -> Tensor:
        """``fn(*args, **kwargs)`` (batch-first tensors) as part of a merged batch; raises :class:`Cancelled`
        if the request's ticket is cancelled before or while it waits."""
        if ticket.cancelled or self._stopped:
            raise Cancelled()
        call = _Call(key, fn, args, kwargs, ticket)
        with self._cond:
            self._pending.append(call)
            self._cond.notify_all()
        call.done.wait()
        if call.error is not None:
            raise call.error
        return call.result

    def cancel(self, ticket: Ticket) -> None:
        """Cancel a request: its waiting call (if not yet running) returns :class:`Cancelled` now, and any
        later call raises it."""
        ticket.cancelled = True
        with self._cond:
            for call in [c for c in self._pending if c.ticket is ticket]:
                self._pending.remove(call)
                call.error = Cancelled()
                call.done.set()
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            for call in self._pending:
                call.error = Cancelled()
                call.done.set()
            self._pending.clear()
            self._cond.notify_all()
        self._thread.join(timeout=5)

    # --- the batching thread -----------------------------------------------------------------
    def _take(self) -> list[_Call] | None:
        """The next batch (oldest call first, then every compatible one), once it is due."""
        with self._cond:
            while True:
                if self._stopped:
                    return None
                if self._pending:
                    wait = max(self._pending[0].since, self._free_since) + self.max_wait - time.perf_counter()
                    if len(self._pending) >= self._active or wait <= 0:
                        break
                    self._cond.wait(wait)
                else:
                    self._cond.wait()
            head = self._pending[0].signature()
            batch, rows = [], 0
            for call in list(self._pending):
                if call.signature() == head and (not batch or rows + call.size <= self.max_batch):
                    batch.append(call)
                    rows += call.size
                    self._pending.remove(call)
            return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            try:
                out = _run(batch)
                for call, part in zip(batch, out):
                    call.result = part
            except Exception as e:  # the callers re-raise it; the server answers their requests with it
                for call in batch:
                    call.error = e
            self.batches += 1
            self.rows += sum(c.size for c in batch)
            with self._cond:
                self._free_since = time.perf_counter()
            for call in batch:
                call.done.set()


@torch.no_grad()
def _run(batch: list[_Call]) -> list[Tensor]:
    """One call of the batch's function on the concatenated inputs, split back per call."""
    first = batch[0]
    if len(batch) == 1:
        return [first.fn(*first.args, **first.kwargs)]
    args = [torch.cat([c.args[i] for c in batch]) for i in range(len(first.args))]
    kwargs = {k: torch.cat([c.kwargs[k] for c in batch]) for k in first.kwargs}
    return list(first.fn(*args, **kwargs).split([c.size for c in batch]))


class Standin:
    """A network's stand-in (a denoiser, a decoder): calls go to ``fn``, :meth:`parameters` are ``module``'s."""

    def __init__(self, fn: Callable[..., Tensor], module: Any = None) -> None:
        self.fn, self.module = fn, module

    def __call__(self, *args: Tensor, **kwargs: Tensor) -> Tensor:
        return self.fn(*args, **kwargs)

    def parameters(self):
        """The wrapped module's parameters (what :attr:`fewstep.models.handle.Model.device` reads)."""
        return self.module.parameters() if self.module is not None else iter(())


class Batched(Standin):
    """A stand-in for a function of batch-first tensors (a denoiser, a decoder) whose calls go through a
    :class:`MicroBatcher` under ``key`` for the request holding ``ticket``."""

    def __init__(self, batcher: MicroBatcher, ticket: Ticket, key: Hashable, fn: Callable[..., Tensor],
                 module: Any = None) -> None:
        super().__init__(fn, module)
        self.batcher, self.ticket, self.key = batcher, ticket, key

    def __call__(self, *args: Tensor, **kwargs: Tensor) -> Tensor:
        return self.batcher.call(self.ticket, self.key, self.fn, *args, **kwargs)
