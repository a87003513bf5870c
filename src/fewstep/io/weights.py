"""Weight files checked at the edge: a safetensors header read and checked before any tensor is (dtypes a network's
weights can have, shapes that match the bytes, offsets inside the file), and loaded weights checked finite.

A header that relabels float32 bytes as int32 (or stores the weights as int8) loads without an error in diffusers,
which casts every tensor to the model's dtype: the model then runs on garbage. A weight holding +inf or NaN gives
NaN images only after minutes of sampling. Both are one line here, naming the file and the tensor.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Iterable

from ..errors import FewstepError

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
            "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
FLOATS = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
# integer buffers some checkpoints carry beside the weights (CLIP's position ids, BatchNorm's counter, EMA counts)
INTEGER_BUFFER = re.compile(r"(^|\.)(position_ids|num_batches_tracked|num_updates|steps?|optimization_step)$")
MAX_HEADER = 100 * 2**20             # safetensors' own limit on the header


def read_header(path: str | Path, what: str = "weights file") -> dict[str, dict]:
    """The tensors a safetensors file says it holds (name → dtype, shape, data_offsets), each entry checked against
    the file: a known dtype, a shape of non-negative integers whose size × itemsize is the bytes it spans, those
    bytes inside the file. Its ``__metadata__`` is dropped."""
    path = Path(path)
    fix = "the file is damaged or not a safetensors file: copy or download it again"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            if n is None or n > min(MAX_HEADER, size - 8):
                raise FewstepError(f"{what} {path} is corrupt: its header length {n if n is not None else '(missing)'} "
                                   f"does not fit the file's {size:,} bytes — {fix}")
            text = f.read(n).decode("utf-8")
    except OSError as e:
        raise FewstepError(f"cannot read {what} {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise FewstepError(f"{what} {path} is corrupt: its header is not UTF-8 — {fix}") from None
    from .validate import parse_json

    header = parse_json(text, path, "a safetensors header (a JSON object)")
    if not isinstance(header, dict):
        raise FewstepError(f"{what} {path} is corrupt: its header is not a JSON object — {fix}")
    header.pop("__metadata__", None)
    body = size - 8 - n
    for name, entry in header.items():
        dtype, shape, offsets = (entry.get(k) for k in ("dtype", "shape", "data_offsets")) \
            if isinstance(entry, dict) else (None, None, None)
        if dtype not in ITEMSIZE or not isinstance(shape, list) or not isinstance(offsets, list) or len(offsets) != 2 \
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in [*shape, *offsets]):
            raise FewstepError(f"{what} {path} is corrupt: the header entry of tensor {name!r} ({json.dumps(entry)[:80]}) "
                               f"is not a dtype, a shape and two offsets — {fix}")
        start, end = offsets
        if not start <= end <= body or end - start != math.prod(shape) * ITEMSIZE[dtype]:
            raise FewstepError(f"{what} {path} is corrupt: tensor {name!r} ({dtype}, shape {shape}) spans bytes "
                               f"{start:,}–{end:,}, which is not its size or lies past the file's {body:,} data bytes — "
                               f"{fix}")
    return header


def check_float_weights(path: str | Path, what: str = "weights file") -> dict[str, dict]:
    """:func:`read_header`, and every tensor a floating-point one (F32, F16, BF16, …) but the integer buffers some
    checkpoints carry (position ids, counters): a network's weights are never integers, so an integer tensor is a
    relabelled header or a quantized file fewstep cannot run."""
    header = read_header(path, what)
    for name, entry in header.items():
        if entry["dtype"] not in FLOATS and not INTEGER_BUFFER.search(name):
            raise FewstepError(f"{what} {path}: tensor {name!r} is stored as {entry['dtype']}, but a network's "
                               f"weights are floating point ({', '.join(FLOATS[:4])}); its header relabels the bytes or "
                               f"it is a quantized file fewstep cannot run — use the original float file")
    return header


LARGEST = 1e8     # no trained network holds a weight near this; 3e38 is finite but overflows the first layer


def check_finite(tensors: Iterable[tuple[str, "object"]], where: str | Path, fix: str = "") -> None:
    """Every floating-point tensor of (name, tensor) pairs finite and below :data:`LARGEST` in magnitude; the
    first that is not is one line naming it (one pass: the largest magnitude is NaN or inf where any is)."""
    import torch

    for name, t in tensors:
        if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()):
            continue
        largest = float(t.detach().abs().max())
        if not largest <= LARGEST:
            kind = ("NaN" if bool(torch.isnan(t).any()) else "inf") if not math.isfinite(largest) else \
                f"a weight of {largest:.3g} (no trained network holds one above {LARGEST:.0e}; it overflows)"
            raise FewstepError(f"the weights in {where} are unusable: {name} holds {kind}; a network with such a "
                               f"weight gives NaN images — "
                               f"{fix or 'the file is damaged: copy or download it again, or re-save the model'}")


def check_weights_file(path: str | Path, what: str = "weights file", finite: bool = True) -> None:
    """A small weights file (a LoRA) checked whole: :func:`check_float_weights`, then every tensor finite."""
    check_float_weights(path, what)
    if finite:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                check_finite(((k, f.get_tensor(k)) for k in f.keys()), f"{what} {path}",
                             "the file is damaged, or was saved from a run that diverged")
        except SafetensorError as e:
            raise FewstepError(f"{what} {path} is corrupt: {str(e).splitlines()[0]}") from None
