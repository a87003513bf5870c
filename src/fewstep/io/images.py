"""Image grids as PNG (no torchvision), written atomically so a failed run leaves no partial file."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

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


def png_info(text: dict[str, str] | None):
    """PNG text chunks (tEXt, or iTXt for non-Latin-1 text) of ``text``, for ``Image.save(pnginfo=...)``."""
    from PIL.PngImagePlugin import PngInfo

    if not text:
        return None
    info = PngInfo()
    for key, value in text.items():
        try:
            value.encode("latin-1")
            info.add_text(key, value)
        except UnicodeEncodeError:
            info.add_itxt(key, value)
    return info


def save_png(image: Image.Image, path: str | Path, text: dict[str, str] | None = None) -> Path:
    """Save as PNG (with the text chunks ``text``) via a temporary file and rename; a clear error if the path
    can't be written."""
    path = check_writable(path, ".png")
    try:
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG", pnginfo=png_info(text))
    except OSError as e:
        raise FewstepError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def pil_images(images: Tensor) -> list[Image.Image]:
    """[N, C, H, W] in [−1, 1] → N PIL images at their own resolution (grayscale for one channel)."""
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in to_uint8(images)]


def write_png_folder(folder: str | Path, images: Sequence[Image.Image], texts: Sequence[dict[str, str]],
                     name: str = "{:05d}.png") -> Path:
    """A new folder of one PNG per image (``name`` formatted with its index) with its text chunks, written
    atomically (:func:`fewstep.io.atomic.atomic_path`: an existing folder is replaced only when it may be)."""
    folder = Path(folder)
    try:
        with atomic_path(folder, directory=True) as tmp:
            for i, (image, text) in enumerate(zip(images, texts, strict=True)):
                image.save(tmp / name.format(i), format="PNG", pnginfo=png_info(text))
    except OSError as e:
        raise FewstepError(f"cannot write {folder}: {e.strerror or e}") from None
    return folder


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


MAX_PIXELS = 4096 * 4096  # an input larger than this is refused before it is decoded (decompression bombs)


def open_image(source, where: str) -> Image.Image:
    """A PIL image, decoded, EXIF orientation applied; a file that is not an image, or one too large, is a
    clear error."""
    from PIL import ImageOps

    try:
        with Image.open(source) as im:
            if im.width * im.height > MAX_PIXELS:
                raise FewstepError(f"{where} is {im.width}x{im.height} pixels; fewstep reads images of at most "
                                   f"{MAX_PIXELS:,} pixels: downscale it first")
            im.load()
            return ImageOps.exif_transpose(im)
    except (OSError, Image.DecompressionBombError, ValueError) as e:
        raise FewstepError(f"cannot read image {where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def image_array(im: Image.Image, channels: int) -> np.ndarray:
    """[H, W, C] float32 in [0, 1] as the user means the image: 16-bit and 32-bit grayscale scaled by their
    own range (not clipped to 8 bits), palette and alpha images composited over white (the embedded data's
    background), then RGB (``channels`` 3) or ITU-R 601 luma (1)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        gray = np.asarray(im, dtype=np.float64)
        gray = gray / (65535.0 if im.mode.startswith("I;16") or gray.max() > 255 else 255.0)
        rgb = np.repeat(gray[..., None], 3, axis=2)
    elif im.mode == "F":
        rgb = np.repeat(np.clip(np.asarray(im, dtype=np.float64), 0, 1)[..., None], 3, axis=2)
    else:
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float64) / 255.0
        rgb = rgba[..., :3] * rgba[..., 3:] + (1 - rgba[..., 3:])   # over white
    if channels == 1:
        rgb = (rgb @ np.array([0.299, 0.587, 0.114]))[..., None]
    return np.clip(rgb, 0, 1).astype(np.float32)


def image_tensor(im: Image.Image, channels: int, size: int | None = None) -> Tensor:
    """[C, H, W] in [−1, 1] (:func:`image_array`); with ``size``, centre-cropped to a square and resized
    (bicubic, antialiased) to ``size``×``size``: the aspect ratio is kept, not squashed."""
    x = torch.from_numpy(image_array(im, channels)).permute(2, 0, 1) * 2 - 1
    if size is None:
        return x
    h, w = x.shape[-2:]
    side = min(h, w)
    x = x[:, (h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
    if side != size:
        x = torch.nn.functional.interpolate(x[None], size=(size, size), mode="bicubic", antialias=True,
                                            align_corners=False)[0]
    return x.clamp(-1, 1)


def read_png(path: str | Path, channels: int, sizes: Sequence[int] = ()) -> Tensor:
    """An image file as [1, C, H, W] in [−1, 1] (:func:`image_array`). An image that is not square of one of
    ``sizes`` (when given) is a clear error: fewstep never resizes an edit's input silently."""
    path = Path(path)
    if path.is_dir():
        raise FewstepError(f"input image {path} is a folder; give an image file")
    if not path.is_file():
        raise FewstepError(f"input image {path} does not exist")
    im = open_image(path, str(path))
    if sizes and (im.width != im.height or im.width not in sizes):
        raise FewstepError(f"{path} is {im.width}x{im.height} pixels; this model needs "
                           + " or ".join(f"{s}x{s}" for s in sizes))
    return image_tensor(im, channels)[None]
