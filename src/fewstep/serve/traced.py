"""The network calls of ``fewstep serve`` as TorchScript traces: diffusers' Python per call, gone.

At real-time sizes on a CPU a small UNet's call is mostly Python — diffusers' ``forward``, the denoiser's
scalings, the module hooks — not arithmetic: the 1.5M-parameter ``emoji-lcm`` UNet takes ~9 ms eager at
batch 1 and ~4 ms traced, ~18 against ~12 ms at batch 10 (one thread, measured side by side). A trace
(``torch.jit.trace``, PyTorch's own tracer; what StreamDiffusion gets from TensorRT on a GPU) records the
tensor operations of one call and replays them without the Python, for any batch size.

A trace is only right where the call's Python does not branch on tensor values, so every trace is checked
before use: replayed on a *different* batch (one more row, rows reordered, floating inputs scaled by 1.05,
so a batch size or a value frozen into the trace shows) against the eager function, and used only if they
agree to float rounding; otherwise the eager function serves that signature and the reason is logged. One
trace per input signature (keyword names, per-row shapes, dtypes); the batch dimension stays free.

A network whose weights change between calls (LoRA sliders served fused, :mod:`fewstep.serve.sliders`) is traced
with those weights as *inputs* (``weighted=True``: ``fn(weights, *args, **kwargs)``), so one trace serves every
slider state; its probe also scales the weights by 1.05, so a trace that froze them shows.

Not traced: a model with unfused LoRAs (``fewstep serve --no-fuse``, or adapters :mod:`~fewstep.serve.sliders`
cannot fuse: peft's adapter scales are Python floats a trace would freeze, and the sliders change them per
request), and anything when ``trace=False`` (``fewstep serve --no-trace``).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from .batching import tensor_signature

log = logging.getLogger("fewstep.serve")

RTOL, ATOL = 1e-4, 1e-5


class Traced:
    """``fn(*args, **kwargs)`` of batch-first tensors, through a checked trace per input signature (module
    docstring); called from one thread (the batcher's). With ``weighted``, ``fn(weights, *args, **kwargs)``: the
    first argument a sequence of weight tensors, inputs of the trace like the rest."""

    def __init__(self, fn: Callable[..., Tensor], name: str, weighted: bool = False) -> None:
        self.fn, self.name, self.weighted = fn, name, weighted
        self._traces: dict[tuple, Callable[..., Tensor] | None] = {}

    @torch.no_grad()
    def __call__(self, *args, **kwargs: Tensor) -> Tensor:
        weights: tuple[Tensor, ...] = tuple(args[0]) if self.weighted else ()
        batch = args[1:] if self.weighted else args
        sig = (tuple((tuple(w.shape), w.dtype) for w in weights), *tensor_signature(batch, kwargs))
        if sig not in self._traces:
            self._traces[sig] = self._trace(weights, batch, kwargs)
        traced = self._traces[sig]
        if traced is None:
            return self.fn(*args, **kwargs)
        return traced(*weights, *batch, *(kwargs[k] for k in sorted(kwargs)))

    @property
    def traced(self) -> int:
        """How many signatures run traced (the rest run eager)."""
        return sum(t is not None for t in self._traces.values())

    def _trace(self, weights: tuple[Tensor, ...], args: tuple[Tensor, ...],
               kwargs: dict[str, Tensor]) -> Callable[..., Tensor] | None:
        keys, m, n = sorted(kwargs), len(weights), len(args)

        def positional(*tensors: Tensor) -> Tensor:
            rest = tensors[m:]
            head = (tensors[:m],) if self.weighted else ()
            return self.fn(*head, *rest[:n], **dict(zip(keys, rest[n:])))

        batch = (*args, *(kwargs[k] for k in keys))
        example = (*weights, *batch)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")          # TracerWarnings: what they warn of is what the probe checks
                traced = torch.jit.trace(positional, example, check_trace=False, strict=False)
            probe = (*(w * 1.05 if w.is_floating_point() else w for w in weights), *_probe(batch))
            want, got = positional(*probe), traced(*probe)
        except Exception as e:  # an operation the tracer cannot record: this signature stays eager
            log.info("%s runs eager: tracing failed (%s: %s)", self.name, type(e).__name__, e)
            return None
        if got.shape != want.shape or not torch.allclose(got, want, rtol=RTOL, atol=ATOL):
            log.info("%s runs eager: its trace does not replay a different batch", self.name)
            return None
        return traced


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
