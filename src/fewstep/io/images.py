"""Image grids as PNG (no torchvision), written atomically so a failed run leaves no partial file."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..errors import FewstepError
from .atomic import atomic_path, check_writable


def to_uint8(images: Tensor) -> np.ndarray:
    """[N, C, H, W] in [−1, 1] → uint8 [N, H, W, C]."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: Tensor, nrow: int, pad: int = 1, scale: int = 1) -> Image.Image:
    """Tile images row by row (``nrow`` per row) with ``pad`` pixels of padding; upscale by ``scale``."""
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    rows = (n + nrow - 1) // nrow
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, im in enumerate(arr):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = im
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Save as PNG via a temporary file and rename; a clear error if the path can't be written."""
    path = check_writable(path, ".png")
    try:
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG")
    except OSError as e:
        raise FewstepError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def labeled_rows(rows: list[tuple[str, Image.Image]], margin: int = 150) -> Image.Image:
    """Stack image rows vertically with a text label to the left of each."""
    from PIL import ImageDraw

    width = margin + max(im.width for _, im in rows)
    height = sum(im.height for _, im in rows)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for label, im in rows:
        canvas.paste(im.convert("RGB"), (margin, y))
        draw.text((6, y + im.height // 2 - 6), label, fill="black")
        y += im.height
    return canvas


def read_png(path: str | Path, channels: int, sizes: Sequence[int] = ()) -> Tensor:
    """An image file as [1, C, H, W] in [−1, 1], converted to L (``channels`` 1) or RGB (3). An image
    that is not square of one of ``sizes`` (when given) is a clear error: fewstep never resizes silently."""
    path = Path(path)
    if not path.is_file():
        raise FewstepError(f"input image {path} does not exist")
    try:
        with Image.open(path) as im:
            im = im.convert({1: "L", 3: "RGB"}[channels])
    except OSError as e:
        raise FewstepError(f"cannot read image {path}: {e}") from None
    if sizes and (im.width != im.height or im.width not in sizes):
        raise FewstepError(f"{path} is {im.width}x{im.height} pixels; this model needs "
                           + " or ".join(f"{s}x{s}" for s in sizes))
    arr = np.asarray(im, dtype=np.float32).reshape(im.height, im.width, channels)
    return torch.from_numpy(arr).permute(2, 0, 1)[None] / 127.5 - 1
