"""An uploaded or drawn image (the bytes of a data URL) → the model's input tensor, refusing before decoding.

Called off the event loop (:mod:`fewstep.serve.app` runs every message's checks in a small thread pool), and
cheap where it can be: the pixel count is read from the PNG/JPEG/WebP header (PIL opens lazily) and a too-large
image is refused before a pixel is decoded; a JPEG is decoded at a reduced scale (``draft``) and a large image is
box-reduced in PIL to a few times the model's size before the float conversion and the antialiased bicubic
resize, so a 2048×2048 upload costs tens of milliseconds instead of a second. Messages never carry PIL's text
(which can name an object's address).
"""

from __future__ import annotations

import io

from PIL import Image, ImageOps
from torch import Tensor

from ..io.images import image_tensor

MAX_SIDE = 2048                  # pixels, each side
FORMATS = ("PNG", "JPEG", "WEBP")
SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF")   # PNG, JPEG, RIFF (WebP's container)
OVERSAMPLE = 4                   # a large image is box-reduced to at least this many times the model's size first


class UploadError(ValueError):
    """An upload refused, with one line for the person at the page."""


def decode_upload(raw: bytes, channels: int, size: int) -> Tensor:
    """``raw`` (PNG, JPEG or WebP bytes) as [1, C, size, size] in [−1, 1], centre-cropped; an image larger than
    :data:`MAX_SIDE` on a side is refused from its header, before it is decoded."""
    if not any(raw.startswith(magic) for magic in SIGNATURES) or (raw.startswith(b"RIFF") and raw[8:12] != b"WEBP"):
        raise UploadError("the upload is not an image this server reads: send a PNG, JPEG or WebP")
    try:
        im = Image.open(io.BytesIO(raw), formats=FORMATS)      # lazy: the header only
    except Image.DecompressionBombError:
        raise UploadError(f"image must be at most {MAX_SIDE}×{MAX_SIDE} pixels; this one is far larger") from None
    except (OSError, ValueError, SyntaxError):
        raise UploadError("the upload could not be read as a PNG, JPEG or WebP image (damaged or not an image)") \
            from None
    with im:
        if max(im.size) > MAX_SIDE or min(im.size) < 1:
            raise UploadError(f"image must be at most {MAX_SIDE}×{MAX_SIDE} pixels, got {im.width}×{im.height}")
        try:
            if im.format == "JPEG":
                im.draft("RGB" if channels == 3 else "L", (size * OVERSAMPLE, size * OVERSAMPLE))
            im.load()
            im = shrink(ImageOps.exif_transpose(im), size)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, MemoryError):
            raise UploadError("the uploaded image is damaged or truncated: it could not be decoded") from None
        return image_tensor(im, channels, size)[None]


def shrink(im: Image.Image, size: int) -> Image.Image:
    """``im`` centre-cropped to a square and box-reduced by a whole factor to no less than ``OVERSAMPLE × size``
    (8-bit modes only; alpha composited over white first, as :func:`fewstep.io.images.image_array` does), so the
    float conversion and the final antialiased resize work on a small image."""
    side = min(im.size)
    factor = side // (OVERSAMPLE * size)
    if factor < 2 or im.mode not in ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr"):
        return im
    left, top = (im.width - side) // 2, (im.height - side) // 2
    im = im.crop((left, top, left + side, top + side))
    if im.mode in ("LA", "P", "PA", "RGBA") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        im = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im.alpha_composite(rgba)
    im = im.convert("RGB") if im.mode not in ("L", "RGB") else im
    return im.reduce(factor)
