"""The streaming engine under ``fewstep serve``: requests in, PNGs out, as fast as the model allows.

- **Stream batching** (StreamDiffusion, Kodaira et al. 2023 §3.1): every request runs the one sampler,
  :func:`fewstep.sampling.generate.generate`, on a *view* of the model whose denoiser and decoder calls are
  merged across requests by :class:`fewstep.serve.batching.MicroBatcher` — one UNet batch per step for all
  of them, whichever step each is at, one decoder batch for those finishing together.
- **Nothing recomputed that did not change**: prompt embeddings are cached (:class:`PromptCache`), the
  unconditional one is computed once, and a request identical to a recent one is answered from the result
  cache.
- **Latest wins**: a client's new request cancels its previous one, queued or in flight (at its next network
  call), so typing never builds a backlog.
- **Back-pressure**: at most ``queue_limit`` requests in flight; beyond it a request is refused at once with
  :class:`Busy`, and every cache is bounded, so memory stays bounded however many clients come.
- **LoRA sliders** (Luo et al. 2023b: θ = θ_pre + λ1·τ_style + λ2·τ_LCM) served from fused weights
  (:mod:`fewstep.serve.sliders`: θ_pre + Σ λ_i·ΔW_i, what diffusers' ``set_adapters`` + ``fuse_lora`` give,
  re-fused when a client's λs change: by the request itself when fusing is cheap, else in the background). A
  request takes the fused state of its λs when it starts and keeps it to its end; until that state is ready it
  is answered by the unfused peft adapters at its λs (their scales set just before each of its batches). Requests with different λs, or one fused and one
  unfused, never share a batch. ``fuse=False`` (``fewstep serve --no-fuse``) keeps every request unfused.
- **No Python per network call**: the denoiser and the decoder run as checked traces compiled for the
  fastest backend that replays them — ONNX Runtime, else TorchScript, else eager (:mod:`fewstep.serve.traced`;
  a fused slider state's weights as inputs of its trace), except the unfused LoRA path.
"""

from __future__ import annotations

import copy
import logging
import statistics
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import FewstepError
from ..io.data_urls import png_data_urls
from ..models.folders import serving
from ..models.handle import Model
from ..sampling.generate import generate
from .batching import Batched, Cancelled, MicroBatcher, Standin, Ticket
from .protocol import MAX_NUM, Request, limits
from .sliders import FusedSliders, Unsupported
from .traced import Traced, backend_chain

log = logging.getLogger("fewstep.serve")


class Busy(FewstepError):
    """Too many requests in flight: refused now rather than queued without bound."""


class LRU:
    """A bounded, thread-safe least-recently-used map."""

    def __init__(self, size: int) -> None:
        self.size, self._items, self._lock = size, OrderedDict(), threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: Hashable) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
            self.misses += 1
            return None

    def put(self, key: Hashable, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class PromptCache:
    """A text conditioner whose prompt embeddings are each computed once (an :class:`LRU` of ``size``); it
    stands in for the model's :class:`~fewstep.models.conditioners.TextConditioner` in a request's view."""

    def __init__(self, conditioner, size: int = 1024) -> None:
        self._inner, self.cache = conditioner, LRU(size)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __call__(self, prompts: Sequence[str], device=None) -> dict[str, Tensor]:
        found = {p: e for p in dict.fromkeys(prompts) if (e := self.cache.get(p)) is not None}
        missing = [p for p in dict.fromkeys(prompts) if p not in found]
        if missing:
            for p, e in zip(missing, self._inner.encode(missing)):
                self.cache.put(p, e)
                found[p] = e
        return {"encoder_hidden_states": torch.stack([found[p] for p in prompts]).to(device)}


class CodecWith:
    """A codec whose ``decode`` is another function (the micro-batcher's, or a compiled trace); everything else is
    the codec's own."""

    def __init__(self, codec, decode) -> None:
        self._codec, self.decode = codec, decode

    def __getattr__(self, name: str) -> Any:
        return getattr(self._codec, name)


def compiled(model: Model, backend: str = "auto") -> Model:
    """``model`` with its denoiser and decoder run as ``fewstep serve`` runs them, as checked traces on ``backend``
    (:mod:`fewstep.serve.traced`), for one caller at a time and no batcher: scripts, and the bench's end to end."""
    view = copy.copy(model)
    view.denoiser = Standin(Traced(model.denoiser, "denoise", backend=backend), model.denoiser)
    if not model.codec.pixels:
        view.codec = CodecWith(model.codec, Traced(model.codec.decode, "decode", backend=backend))
    return view


@dataclass
class Job:
    client: Hashable
    request: Request
    ticket: Ticket
    submitted: float
    future: Future | None = None
    counted: bool = True          # still counted in flight (a cancelled job stops counting at once)


class Engine:
    """Serves ``model`` (with its unfused LoRAs as sliders, if any) to many clients at once (module docstring)."""

    def __init__(self, model: Model, max_batch: int = 64, max_wait: float = 0.004, workers: int = 32,
                 queue_limit: int = 64, result_cache: int = 256, prompt_cache: int = 1024, backend: str = "auto",
                 fuse: bool = True) -> None:
        self.model, self.queue_limit = model, queue_limit
        self.variants = {n: serving(model, n) for n in model.config.serves_steps}   # a progressive folder's students
        self.adapters = list(getattr(model.backbone, "peft_config", {}))    # unfused LoRAs (sliders), if any
        self.backend = backend_chain(backend)[0]    # (the unfused LoRA path stays eager: a trace freezes its scales)
        self._networks: dict[tuple, Any] = {}
        weights = [float(lora["weight"]) for lora in model.config.loras][:len(self.adapters)]
        self.info = limits(model, weights)
        self._weights: tuple[float, ...] = tuple(weights)      # the unfused adapters' scales now (batcher thread)
        self._lora_layers = _lora_layers(model.backbone) if self.adapters else []
        if self.adapters:       # set, not assumed: another engine on the same model may have left other scales
            set_adapter_scales(self._lora_layers, self.adapters, self._weights)
        self.sliders: FusedSliders | None = None
        if self.adapters and fuse:
            try:
                self.sliders = FusedSliders(model, self.adapters)
            except Unsupported as e:
                log.warning("fewstep serve: the LoRA sliders are served unfused (slower): %s", e)
        self.served = {"fused": 0, "unfused": 0}               # requests run on fused / unfused LoRA weights
        self.batcher = MicroBatcher(max_batch, max_wait)
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="fewstep-request")
        self.prompts = PromptCache(model.conditioner, prompt_cache) if model.conditioner.text else None
        if self.prompts is not None:
            model.conditioner.empty()          # the unconditional embedding, once
        self.results = LRU(result_cache)
        self._lock = threading.RLock()   # re-entered: cancelling a queued future runs its done-callback at once
        self._latest: dict[Hashable, Job] = {}
        self._inflight = 0
        self._log: deque[tuple[float, int, float]] = deque(maxlen=2000)   # (done at, images, latency ms)
        self._started = time.perf_counter()

    # --- requests ------------------------------------------------------------------------------
    def submit(self, client: Hashable, request: Request) -> Future:
        """Start ``request`` for ``client``, cancelling the client's previous one (latest wins); the future's
        result is a dict with the images as PNG data URLs and the timings. Raises :class:`Busy`."""
        with self._lock:
            self._cancel(client)
            cached = self.results.get(request.cache_key())
            if cached is not None:
                future: Future = Future()
                future.set_result({**cached, "cached": True, "queue_ms": 0.0, "compute_ms": 0.0, "latency_ms": 0.0})
                return future
            if self._inflight >= self.queue_limit:
                raise Busy(f"server busy: {self._inflight} requests in flight (the limit is {self.queue_limit}); "
                           f"try again in a moment")
            job = Job(client, request, Ticket(), time.perf_counter())
            self._inflight += 1
            job.future = self.pool.submit(self._run, job)
            self._latest[client] = job
        job.future.add_done_callback(lambda _, job=job: self._finished(job))
        return job.future

    def warm_up(self) -> float:
        """One request at the page's defaults, run before any client's (it traces the networks, so the first
        person does not wait for it); its seconds."""
        started = time.perf_counter()
        info = self.info
        if self.sliders is not None:
            self.sliders.fuse(self._weights)       # the start-up sliders fused now, so the warm-up traces them
        self.submit(("warm-up",), Request(prompt="" if info["text"] else None, steps=info["steps"]["default"],
                                          guidance_scale=info["guidance"]["default"], loras=self._weights)).result()
        return time.perf_counter() - started

    def cancel(self, client: Hashable) -> None:
        """Drop ``client``'s request, queued or running (it disconnected)."""
        with self._lock:
            self._cancel(client)

    def _cancel(self, client: Hashable) -> None:
        job = self._latest.pop(client, None)
        if job is not None:
            self.batcher.cancel(job.ticket)
            if not job.future.cancel():      # already running: it stops at its next network call, and no longer
                self._release(job)           # counts against the queue limit (a typist's superseded requests)

    def _finished(self, job: Job) -> None:
        with self._lock:
            self._release(job)
            if self._latest.get(job.client) is job:
                del self._latest[job.client]

    def _release(self, job: Job) -> None:
        if job.counted:
            job.counted = False
            self._inflight -= 1

    # --- running one -----------------------------------------------------------------------------
    def _run(self, job: Job) -> dict[str, Any]:
        if job.ticket.cancelled:
            raise Cancelled()
        r = job.request
        model = self.variants.get(r.steps, self.model)
        view = self.view(model, job.ticket, r.loras)      # binds the request's LoRA weights (fused or not) to its end
        cond = [r.prompt] if model.conditioner.text else None if r.label is None else torch.tensor([r.label])
        init = None if r.image is None else r.image.expand(r.num, -1, -1, -1)
        started = time.perf_counter()
        self.batcher.enter()
        try:
            images = generate(view, cond, num=r.num, steps=r.steps, guidance_scale=r.guidance_scale, seed=r.seed,
                              init_images=init, strength=r.strength if init is not None else 1.0, batch_size=MAX_NUM)
        finally:
            self.batcher.leave()
        result = {"images": png_data_urls(images), "cached": False}
        self.results.put(r.cache_key(), result)
        done = time.perf_counter()
        timing = {"queue_ms": 1e3 * (started - job.submitted), "compute_ms": 1e3 * (done - started),
                  "latency_ms": 1e3 * (done - job.submitted)}
        self._log.append((done, r.num, timing["latency_ms"]))
        return {**result, **timing}

    def view(self, model: Model, ticket: Ticket, weights: tuple[float, ...]) -> Model:
        """``model`` as one request sees it: its denoiser and decoder calls merged with everyone else's (under
        the request's LoRA weights), its prompts through the cache."""
        view = copy.copy(model)
        denoise, how = self._denoiser(model, weights)
        view.denoiser = Batched(self.batcher, ticket, ("denoise", id(model), weights, how), denoise, model.denoiser)
        if not model.codec.pixels:       # a decoder worth batching across requests (a pixel codec is the identity)
            decode = self.network("decode", model.codec, model.codec.decode)
            view.codec = CodecWith(model.codec, Batched(self.batcher, ticket, ("decode", id(model.codec)), decode))
        if self.prompts is not None:
            view.conditioner = self.prompts
        return view

    def network(self, name: str, owner: Any, fn, weighted: bool = False):
        """``fn`` (``owner``'s denoiser or decoder) as the batcher runs it: compiled on the engine's backend unless
        that is eager (``weighted``: ``fn(weights, ...)``, the weights inputs of the trace)."""
        if self.backend == "eager":
            return fn
        key = (name, id(owner))
        with self._lock:
            if key not in self._networks:
                what = getattr(owner, "path", None) or getattr(getattr(owner, "model", None), "path", None)
                self._networks[key] = Traced(fn, f"{name} of {what or type(owner).__name__}", weighted, self.backend)
            return self._networks[key]

    def _denoiser(self, model: Model, weights: tuple[float, ...]) -> tuple[Any, Hashable]:
        """The denoiser one request's batches run, and what tells its batches from others' with the same weights:
        the model's own, or under LoRA sliders the fused state of ``weights`` if ready, else the unfused adapters
        at ``weights``."""
        if not self.adapters:
            return self.network("denoise", model, model.denoiser), None
        fused = self.sliders.get(weights) if self.sliders is not None else None
        with self._lock:
            self.served["fused" if fused is not None else "unfused"] += 1
        if fused is not None:
            net = self.network("denoise-fused", self.sliders, self.sliders, weighted=True)
            return (lambda *args, **kwargs: net(fused.tensors, *args, **kwargs)), id(fused)

        def unfused(*args: Tensor, **kwargs: Tensor) -> Tensor:   # on the batcher's thread, just before the batch
            if weights != self._weights:
                set_adapter_scales(self._lora_layers, self.adapters, weights)
                self._weights = weights
            return model.denoiser(*args, **kwargs)
        return unfused, "unfused"

    # --- reporting -----------------------------------------------------------------------------
    def stats(self, window: float = 5.0) -> dict[str, Any]:
        """Images per second over the last ``window`` seconds, latency percentiles of the last 200 requests,
        the mean batch and the caches' hit counts."""
        now = time.perf_counter()
        log = list(self._log)
        recent = [n for t, n, _ in log if now - t <= window]
        span = min(window, max(now - self._started, 1e-3))
        latencies = [lat for _, _, lat in log[-200:]]
        pct = statistics.quantiles(latencies, n=20, method="inclusive") if len(latencies) > 1 else latencies * 19
        b = self.batcher
        return {"images_per_second": sum(recent) / span, "p50_ms": pct[9] if pct else None,
                "p95_ms": pct[18] if pct else None, "mean_batch": b.rows / b.batches if b.batches else 0.0,
                "inflight": self._inflight, "requests": len(log),
                "prompt_cache_hits": self.prompts.cache.hits if self.prompts else 0,
                "result_cache_hits": self.results.hits, "backends": self.backends(),
                **({"lora_weights": dict(self.served)} if self.adapters else {})}

    def backends(self) -> dict[str, list[str]]:
        """The backend each served network runs on, per input signature seen (``{"denoise": ["onnxruntime"], ...}``)."""
        with self._lock:
            networks = dict(self._networks)
        out: dict[str, list[str]] = {}
        for (name, _), net in networks.items():
            out.setdefault(name, []).extend(net.backends if isinstance(net, Traced) else ["eager"])
        return out

    def close(self) -> None:
        with self._lock:
            for client in list(self._latest):
                self._cancel(client)
        self.batcher.stop()
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.sliders is not None:
            self.sliders.close()
        for net in self._networks.values():
            if isinstance(net, Traced):
                net.close()


def _lora_layers(unet) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in unet.modules() if isinstance(m, LoraLayer)]


def set_adapter_scales(layers: list, names: Sequence[str], weights: Sequence[float]) -> None:
    """Each adapter's weight λ as its peft scale λ·α/r, layer by layer: what diffusers' ``set_adapters`` does
    for a float weight, without re-activating every module (a test checks they agree)."""
    for layer in layers:
        for name, w in zip(names, weights):
            layer.set_scale(name, w)
