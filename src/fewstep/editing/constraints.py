"""The linear maps of zero-shot editing (Song et al. 2023 Appendix D): which part of a reference image
is known, as a :class:`~fewstep.sampling.constrained.Constraint`. Inpainting is A = I
(:func:`fewstep.sampling.constrained.inpainting`); colorization keeps each pixel's luminance,
super-resolution each patch's mean, both through orthogonal bases built as the reference code
(openai/consistency_models ``cm/karras_diffusion.py``, ``obtain_orthogonal_matrix``) builds them.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import FewstepError
from ..sampling.constrained import Constraint

Half = Literal["bottom", "top", "left", "right"]

# ITU-R BT.601 luma weights, as the reference's ``iterative_colorization`` uses.
LUMA = (0.2989, 0.5870, 0.1140)


def orthogonal_basis(first: Sequence[float] | Tensor) -> Tensor:
    """An orthogonal matrix Q (float64) whose first column is ``first``/‖first‖: QR of the identity
    with its first column replaced, sign fixed, as the reference code's ``obtain_orthogonal_matrix``."""
    v = torch.as_tensor(first, dtype=torch.float64)
    m = torch.eye(len(v), dtype=torch.float64)
    m[:, 0] = v / v.norm()
    q = torch.linalg.qr(m).Q
    return -q if q[:, 0] @ v < 0 else q


def colorization(channels: int = 3) -> Constraint:
    """Colorization (Appendix D): per pixel, the orthogonal 3×3 basis whose first vector is the luma
    direction w = (0.2989, 0.5870, 0.1140)/‖w‖; the first coefficient (luminance/‖w‖) is known, so
    the output's luminance w·x equals the reference's exactly (up to float error)."""
    if channels != 3:
        raise FewstepError(f"colorization needs an RGB (3-channel) model; this one has {channels} channel(s)")
    q = orthogonal_basis(LUMA)
    known = torch.zeros(3, 1, 1, dtype=torch.bool)
    known[0] = True

    def A(x: Tensor) -> Tensor:
        return torch.einsum("bchw,cd->bdhw", x, q.to(x))

    def A_inv(a: Tensor) -> Tensor:
        return torch.einsum("bdhw,cd->bchw", a, q.to(a))

    return Constraint(A, A_inv, known)


def superresolution(factor: int) -> Constraint:
    """Super-resolution (Appendix D): per ``factor``×``factor`` patch and channel, the orthogonal basis
    of R^{factor²} whose first vector is the uniform average 1/factor; the first coefficient
    (factor × the patch mean) is known, so the output's patch averages equal the low-res image's."""
    if factor < 1:
        raise FewstepError(f"super-resolution factor must be at least 1, got {factor}")
    q = orthogonal_basis([1.0] * factor**2)
    known = torch.zeros(factor**2, dtype=torch.bool)
    known[0] = True

    def A(x: Tensor) -> Tensor:  # [B, C, H, W] → [B, C, H/f, W/f, f²] coefficients
        b, c, h, w = x.shape
        if h % factor or w % factor:
            raise FewstepError(f"super-resolution by {factor} needs an image size divisible by {factor}, got {h}×{w}")
        patches = x.reshape(b, c, h // factor, factor, w // factor, factor).permute(0, 1, 2, 4, 3, 5)
        return patches.reshape(b, c, h // factor, w // factor, factor**2) @ q.to(x)

    def A_inv(a: Tensor) -> Tensor:
        b, c, hp, wp, _ = a.shape
        patches = (a @ q.to(a).T).reshape(b, c, hp, wp, factor, factor).permute(0, 1, 2, 4, 3, 5)
        return patches.reshape(b, c, hp * factor, wp * factor)

    return Constraint(A, A_inv, known)


def half_mask(size: int, masked: Half) -> Tensor:
    """A [size, size] known-mask with the named half to be generated (False) and the rest kept."""
    known = torch.ones(size, size, dtype=torch.bool)
    h = size // 2
    region = {"bottom": (slice(h, None), slice(None)), "top": (slice(None, size - h), slice(None)),
              "right": (slice(None), slice(h, None)), "left": (slice(None), slice(None, size - h))}
    if masked not in region:
        raise FewstepError(f"unknown half {masked!r}; use bottom, top, left or right")
    known[region[masked]] = False
    return known


def rough_strokes(images: Tensor, cell: int = 2) -> Tensor:
    """A crude stand-in for a stroke painting (for demos and the bench): ``cell``×``cell`` block
    means, binarized to {−1, 1} per channel."""
    blocks = F.avg_pool2d(images, cell)
    return F.interpolate(torch.where(blocks > 0, 1.0, -1.0), scale_factor=cell, mode="nearest")


def luminance(images: Tensor) -> Tensor:
    """w·x with the luma weights :data:`LUMA`, [B, 1, H, W] (RGB in)."""
    return torch.einsum("bchw,c->bhw", images, torch.tensor(LUMA, dtype=images.dtype))[:, None]
