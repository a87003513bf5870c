"""Images as ``data:`` URLs: what a web page's ``<img src>`` takes and a JSON message can carry."""

from __future__ import annotations

import base64
import io

from PIL import Image
from torch import Tensor

from .images import to_uint8


def png_data_urls(images: Tensor) -> list[str]:
    """[N, C, H, W] in [−1, 1] → one PNG data URL per image."""
    out = []
    for arr in to_uint8(images):
        buf = io.BytesIO()
        Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, format="PNG")
        out.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return out
