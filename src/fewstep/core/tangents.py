"""Jacobian-vector products of a network: the tangent df/dt of continuous-time consistency models (sCM, Lu & Song
2025, arXiv 2410.11081, §4: "the tangent is computed by a JVP", their Algorithm 1).

:func:`jvp` returns ``(f(*primals), J_f · tangents)`` either exactly, by forward-mode AD (``torch.func.jvp``), or by
a central finite difference along the tangent (f(p + h·v) − f(p − h·v))/(2h), the fallback NVlabs/FastGen ships
(``fastgen/methods/consistency_model/sCM.py: _estimate_jvp_finite_difference``, ``jvp_finite_diff_eps`` = 1e-3) for
networks with an op that has no forward-mode rule. ``"auto"`` tries the exact one and falls back, once, with a
warning.

Two ops of a diffusers UNet have no working forward-mode rule in PyTorch 2.x on CPU:
``scaled_dot_product_attention``'s flash/efficient kernels (``NotImplementedError``) and ``group_norm`` with a
non-contiguous tangent (a ``view`` error inside its rule). :func:`forward_ad_safe` runs the exact JVP with
attention on SDPA's math backend and group norm decomposed into mean/var/affine (the same numbers: a test
checks the decomposition and the JVP against a float64 finite difference); it swaps
``torch.nn.functional.group_norm`` only inside the ``with`` block.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

JVP_METHODS = ("auto", "exact", "finite-difference")


def _group_norm(input: Tensor, num_groups: int, weight: Tensor | None = None, bias: Tensor | None = None,
                eps: float = 1e-5) -> Tensor:
    """``F.group_norm`` from differentiable primitives (forward-mode AD through any tangent layout)."""
    n, c = input.shape[:2]
    x = input.reshape(n, num_groups, -1)
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    x = ((x - mean) * torch.rsqrt(var + eps)).reshape(input.shape)
    shape = (1, c) + (1,) * (input.ndim - 2)
    if weight is not None:
        x = x * weight.reshape(shape)
    if bias is not None:
        x = x + bias.reshape(shape)
    return x


@contextlib.contextmanager
def forward_ad_safe() -> Iterator[None]:
    """Attention on SDPA's math backend and a decomposed group norm, for ``torch.func.jvp`` (module docstring)."""
    original = F.group_norm
    F.group_norm = _group_norm
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        F.group_norm = original


_warned: set[str] = set()


def jvp(fn: Callable[..., Tensor], primals: Sequence[Tensor], tangents: Sequence[Tensor], method: str = "auto",
        eps: float = 1e-3) -> tuple[Tensor, Tensor]:
    """(fn(*primals), the directional derivative of ``fn`` at ``primals`` along ``tangents``), without gradients.

    ``method``: "exact" (forward-mode AD), "finite-difference" (central, step ``eps`` along the tangent, in the
    primals' dtype; both evaluations see the same random numbers, e.g. dropout masks, as the value does), or
    "auto" (exact, else the finite difference with a warning)."""
    if method not in JVP_METHODS:
        raise ValueError(f"unknown JVP method {method!r}; choose one of {', '.join(JVP_METHODS)}")
    if method != "finite-difference":
        try:
            with torch.no_grad(), forward_ad_safe():
                return torch.func.jvp(fn, tuple(primals), tuple(tangents))
        except (NotImplementedError, RuntimeError) as e:
            if method == "exact":
                raise
            key = f"{type(e).__name__}: {str(e).splitlines()[0]}"
            if key not in _warned:
                _warned.add(key)
                warnings.warn(f"forward-mode AD failed ({key}); using a finite-difference JVP", stacklevel=2)
    return _finite_difference(fn, primals, tangents, eps)


@torch.no_grad()
def _finite_difference(fn: Callable[..., Tensor], primals: Sequence[Tensor], tangents: Sequence[Tensor],
                       eps: float) -> tuple[Tensor, Tensor]:
    devices = [p.device for p in primals if p.device.type == "cuda"][:1]
    with torch.random.fork_rng(devices=devices):
        value = fn(*primals)
    with torch.random.fork_rng(devices=devices):
        plus = fn(*(p + eps * v for p, v in zip(primals, tangents)))
    with torch.random.fork_rng(devices=devices):
        minus = fn(*(p - eps * v for p, v in zip(primals, tangents)))
    return value, (plus - minus) / (2 * eps)
