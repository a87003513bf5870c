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

Not traced: a model with unfused LoRAs (peft's adapter scales are Python floats a trace would freeze, and
the sliders change them per request), and anything when ``trace=False`` (``fewstep serve --no-trace``).
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
    docstring); called from one thread (the batcher's)."""

    def __init__(self, fn: Callable[..., Tensor], name: str) -> None:
        self.fn, self.name = fn, name
        self._traces: dict[tuple, Callable[..., Tensor] | None] = {}

    @torch.no_grad()
    def __call__(self, *args: Tensor, **kwargs: Tensor) -> Tensor:
        sig = tensor_signature(args, kwargs)
        if sig not in self._traces:
            self._traces[sig] = self._trace(args, kwargs)
        traced = self._traces[sig]
        if traced is None:
            return self.fn(*args, **kwargs)
        return traced(*args, *(kwargs[k] for k in sorted(kwargs)))

    @property
    def traced(self) -> int:
        """How many signatures run traced (the rest run eager)."""
        return sum(t is not None for t in self._traces.values())

    def _trace(self, args: tuple[Tensor, ...], kwargs: dict[str, Tensor]) -> Callable[..., Tensor] | None:
        keys, n = sorted(kwargs), len(args)

        def positional(*tensors: Tensor) -> Tensor:
            return self.fn(*tensors[:n], **dict(zip(keys, tensors[n:])))

        example = (*args, *(kwargs[k] for k in keys))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")          # TracerWarnings: what they warn of is what the probe checks
                traced = torch.jit.trace(positional, example, check_trace=False, strict=False)
            probe = _probe(example)
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
