"""The network calls of ``fewstep serve`` compiled from one trace: diffusers' Python per call, gone.

At real-time sizes on a CPU a small UNet's call is mostly Python — diffusers' ``forward``, the denoiser's
scalings, the module hooks — not arithmetic. A trace records the tensor operations of one call and a backend
replays them without the Python, for any batch size (what StreamDiffusion gets from TensorRT on a GPU, and FastSD
CPU from OpenVINO). Backends, fastest first where each applies (``fewstep bench --only serve-backends`` measures
them side by side, "Backends" in BENCHMARKS.md; on this project's CPU, one thread, the served ``emoji-sd`` denoiser
at batch 1: eager 9.0 ms, TorchScript 3.2, ONNX Runtime 1.9, OpenVINO at float32 2.6, ``torch.compile`` 5.9):

- ``onnxruntime``: the call exported by PyTorch's TorchScript-based ONNX exporter (``torch.onnx.export``, the batch
  dimension dynamic) into an ONNX Runtime CPU session with all graph optimisations, ``torch.get_num_threads()``
  intra-op threads. Float32 CPU tensors only (half precision and other devices go to the next backend), and a
  network under protobuf's 2 GB limit (a full-size SD UNet in float32 is over it: its export fails and it goes to
  the next backend).
- ``torchscript``: ``torch.jit.trace``, PyTorch's own tracer; any device and dtype.
- ``eager``: the function itself (``fewstep serve --backend eager``), and every backend's fallback.

A trace is only right where the call's Python does not branch on tensor values, so every compiled call is checked
before use: replayed on a *different* batch (one more row, rows reordered, floating inputs scaled by 1.05, so a
batch size or a value frozen into the trace shows) against the eager function, and used only if they agree to
float rounding; otherwise the next backend of the chain is tried (ONNX Runtime → TorchScript → eager) and the
reason is logged. One compiled call per input signature (keyword names, per-row shapes, dtypes); the batch
dimension stays free.

A network whose weights change between calls (LoRA sliders served fused, :mod:`fewstep.serve.sliders`) is traced
with those weights as *inputs* (``weighted=True``: ``fn(weights, *args, **kwargs)``), so one compiled call serves
every slider state; its probe also scales the weights by 1.05, so a trace that froze them shows. In ONNX Runtime
weights fed as inputs cost ~1.5× (its kernels prepack constant weights only), so a state called again gets a
session of its own with them as constants (:meth:`OnnxCall.bind`), built and checked in the background while its
calls go on with the weights as inputs; the last ``keep_bound`` (2) are kept.

Not traced: a model with unfused LoRAs (``fewstep serve --no-fuse``, or adapters :mod:`~fewstep.serve.sliders`
cannot fuse: peft's adapter scales are Python floats a trace would freeze, and the sliders change them per
request), and anything under ``--backend eager``.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor, nn

from ..errors import FewstepError
from . import BACKEND_CHOICES, BACKENDS
from .batching import tensor_signature

log = logging.getLogger("fewstep.serve")

RTOL, ATOL = 1e-4, 1e-4   # float rounding of a reordered sum (ONNX Runtime fuses), far below a frozen value's 5%


def backend_chain(backend: str) -> tuple[str, ...]:
    """The backends a call tries in turn, eager's fallback last: ``backend``'s place in :data:`BACKENDS` onwards
    (``auto``: the fastest installed, ONNX Runtime if ``onnxruntime`` imports, else TorchScript)."""
    if backend not in BACKEND_CHOICES:
        raise FewstepError(f"unknown backend {backend!r}: choose one of {', '.join(BACKEND_CHOICES)}")
    if backend == "auto":
        backend = "onnxruntime" if importlib.util.find_spec("onnxruntime") is not None else "torchscript"
    if backend == "onnxruntime" and importlib.util.find_spec("onnxruntime") is None:
        raise FewstepError("--backend onnxruntime needs the onnxruntime package: pip install onnxruntime")
    return BACKENDS[BACKENDS.index(backend):]


def torchscript(fn: Callable[..., Tensor], example: tuple[Tensor, ...],
                batched: Sequence[bool]) -> Callable[..., Tensor]:
    """``fn`` traced by ``torch.jit.trace`` on ``example`` (its batch dimension free: TorchScript's is)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # TracerWarnings: what they warn of is what the probe checks
        return torch.jit.trace(fn, example, check_trace=False, strict=False)


class _Call(nn.Module):
    """A function as the module ``torch.onnx.export`` wants (its tensors captured as constants)."""

    def __init__(self, fn: Callable[..., Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *tensors: Tensor) -> Tensor:
        return self.fn(*tensors)


def onnxruntime(fn: Callable[..., Tensor], example: tuple[Tensor, ...], batched: Sequence[bool]) -> OnnxCall:
    """``fn`` exported to ONNX on ``example`` (dimension 0 dynamic for the ``batched`` inputs and the output) and
    run by an ONNX Runtime CPU session; its inputs and output float32 (or integer) CPU tensors."""
    if any(t.device.type != "cpu" or t.dtype in (torch.float16, torch.bfloat16) for t in example):
        raise TypeError("ONNX Runtime serves float32 CPU tensors here")
    names = [f"input{k}" for k in range(len(example))]
    axes = {name: {0: "batch"} for name, b in zip(names, batched) if b}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Call(fn), example, buffer, input_names=names, output_names=["output"],
                          dynamic_axes={**axes, "output": {0: "batch"}}, opset_version=17, dynamo=False)
    return OnnxCall(buffer.getvalue(), names)


class OnnxCall:
    """An exported call in an ONNX Runtime session (all graph optimisations, ``torch.get_num_threads()`` intra-op
    threads), fed its inputs in order. :meth:`bind` makes the session of the same graph with some inputs fixed."""

    def __init__(self, model: bytes, names: Sequence[str]) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3          # warnings of unused initializers etc. are not the user's concern
        self.model, self.names = model, list(names)
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        used = {i.name for i in self.session.get_inputs()}      # the exporter drops inputs the graph does not read
        self._feeds = [(k, name) for k, name in enumerate(self.names) if name in used]

    def __call__(self, *tensors: Tensor) -> Tensor:
        out = self.session.run(None, {name: tensors[k].detach().contiguous().numpy() for k, name in self._feeds})
        return torch.from_numpy(out[0])

    def bind(self, fixed: Sequence[Tensor]) -> OnnxCall:
        """The same graph with its first ``len(fixed)`` inputs constants of these values: a fused slider state's
        weights as initializers, so ONNX Runtime folds their transposes and prepacks them as it does a plain
        network's (~1.5x faster than weights fed as inputs on ``emoji-sd``: its MLAS kernels prepack constant
        weights only). Called with the remaining inputs."""
        import onnx
        from onnx import numpy_helper

        proto = onnx.load_from_string(self.model)
        constant = dict(zip(self.names, fixed))
        inputs = [i for i in proto.graph.input if i.name not in constant]
        read = {i.name for i in proto.graph.input} & constant.keys()       # (inputs the exporter dropped stay out)
        del proto.graph.input[:]
        proto.graph.input.extend(inputs)
        proto.graph.initializer.extend(numpy_helper.from_array(constant[name].detach().contiguous().numpy(), name)
                                       for name in sorted(read))
        return OnnxCall(proto.SerializeToString(), self.names[len(fixed):])


COMPILERS: dict[str, Callable[..., Callable[..., Tensor]]] = {"onnxruntime": onnxruntime, "torchscript": torchscript}


class Traced:
    """``fn(*args, **kwargs)`` of batch-first tensors, through a checked compiled trace per input signature (module
    docstring) on the first backend of ``backend``'s chain that replays it; called from one thread (the batcher's).
    With ``weighted``, ``fn(weights, *args, **kwargs)``: the first argument a sequence of weight tensors, inputs of
    the trace like the rest."""

    def __init__(self, fn: Callable[..., Tensor], name: str, weighted: bool = False, backend: str = "torchscript",
                 keep_bound: int = 2) -> None:
        self.fn, self.name, self.weighted, self.keep_bound = fn, name, weighted, keep_bound
        self.chain = [b for b in backend_chain(backend) if b != "eager"]
        self._calls: dict[tuple, tuple[str, Callable[..., Tensor]] | None] = {}
        # weighted calls whose backend can bind weights (ONNX Runtime): a session per weights, made in the background
        self._bound: OrderedDict[tuple, tuple[tuple[Tensor, ...], Callable[..., Tensor] | None]] = OrderedDict()
        self._lock = threading.Lock()
        self._binder: ThreadPoolExecutor | None = None

    @torch.no_grad()
    def __call__(self, *args, **kwargs: Tensor) -> Tensor:
        weights: tuple[Tensor, ...] = tuple(args[0]) if self.weighted else ()
        batch = args[1:] if self.weighted else args
        sig = (tuple((tuple(w.shape), w.dtype) for w in weights), *tensor_signature(batch, kwargs))
        if sig not in self._calls:
            self._calls[sig] = self._compile(weights, batch, kwargs)
        found = self._calls[sig]
        if found is None:
            return self.fn(*args, **kwargs)
        inputs = (*batch, *(kwargs[k] for k in sorted(kwargs)))
        if weights and hasattr(found[1], "bind"):
            bound = self._bound_call(sig, found[1], weights, inputs)
            if bound is not None:
                return bound(*inputs)
        return found[1](*weights, *inputs)

    def _bound_call(self, sig: tuple, fn, weights: tuple[Tensor, ...], inputs: tuple[Tensor, ...]):
        """``fn`` bound to ``weights`` if that is ready, else None, a binding asked for in the background (the call
        runs with the weights as inputs meanwhile). The last ``keep_bound`` are kept; an entry (and a binding under
        way) holds its weights, so their ids (the key) cannot be another state's while it is kept."""
        key = (sig, *map(id, weights))
        with self._lock:
            entry = self._bound.get(key)
            if entry is not None:
                self._bound.move_to_end(key)
                return entry[1]
            self._bound[key] = (weights, None)              # pending (stays None if the binding fails)
            while len(self._bound) > self.keep_bound:
                self._bound.popitem(last=False)
            if self._binder is None:
                self._binder = ThreadPoolExecutor(1, thread_name_prefix="fewstep-bind")
            self._binder.submit(self._bind, key, fn, weights, inputs)
        return None

    def _bind(self, key: tuple, fn, weights: tuple[Tensor, ...], inputs: tuple[Tensor, ...]) -> None:
        """The binding of ``key``, checked against ``fn`` with the weights as inputs on the call that asked for it."""
        try:
            bound = fn.bind(weights)
            want, got = fn(*weights, *inputs), bound(*inputs)
            ok = got.shape == want.shape and torch.allclose(got, want, rtol=RTOL, atol=ATOL)
        except Exception as e:  # the weights stay inputs: slower, still right
            log.info("%s: binding its weights failed (%s: %s)", self.name, type(e).__name__, e)
            return
        if not ok:
            log.info("%s: its session with bound weights does not replay the call", self.name)
            return
        with self._lock:
            if key in self._bound:
                self._bound[key] = (weights, bound)

    @property
    def bound(self) -> int:
        """How many weight states run on a session of their own (with the weights as constants)."""
        with self._lock:
            return sum(f is not None for _, f in self._bound.values())

    def close(self) -> None:
        """Stop the background binding (a binding under way finishes)."""
        if self._binder is not None:
            self._binder.shutdown(wait=False, cancel_futures=True)

    @property
    def traced(self) -> int:
        """How many signatures run compiled (the rest run eager)."""
        return sum(c is not None for c in self._calls.values())

    @property
    def backends(self) -> list[str]:
        """The backend each signature runs on, in the order they came."""
        return [c[0] if c is not None else "eager" for c in self._calls.values()]

    def _compile(self, weights: tuple[Tensor, ...], args: tuple[Tensor, ...],
                 kwargs: dict[str, Tensor]) -> tuple[str, Callable[..., Tensor]] | None:
        keys, m, n = sorted(kwargs), len(weights), len(args)

        def positional(*tensors: Tensor) -> Tensor:
            rest = tensors[m:]
            head = (tensors[:m],) if self.weighted else ()
            return self.fn(*head, *rest[:n], **dict(zip(keys, rest[n:])))

        batch = (*args, *(kwargs[k] for k in keys))
        b = len(batch[0])
        batched = [False] * m + [t.dim() > 0 and len(t) == b for t in batch]
        probe = (*(w * 1.05 if w.is_floating_point() else w for w in weights), *_probe(batch))
        want = None
        for backend in self.chain:
            try:
                compiled = COMPILERS[backend](positional, (*weights, *batch), batched)
                want = positional(*probe) if want is None else want
                got = compiled(*probe)
            except Exception as e:  # an operation this backend cannot record: the next one is tried
                first = (str(e).splitlines() or [""])[0]
                log.info("%s: %s failed (%s: %s)", self.name, backend, type(e).__name__, first)
                continue
            if got.shape == want.shape and torch.allclose(got, want, rtol=RTOL, atol=ATOL):
                log.info("%s runs on %s", self.name, backend)
                return backend, compiled
            log.info("%s: its %s trace does not replay a different batch", self.name, backend)
        log.info("%s runs eager", self.name)
        return None


def _probe(example: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """A batch unlike ``example``: one more row, the rows in another order, floating values scaled by 1.05."""
    b = len(example[0])
    order = torch.cat([torch.arange(b).roll(1), torch.zeros(1, dtype=torch.long)])

    def change(t: Tensor) -> Tensor:
        if t.dim() == 0 or len(t) != b:
            return t
        t = t[order]
        return t * 1.05 if t.is_floating_point() else t
    return tuple(change(t) for t in example)
