"""The training-image transforms of diffusers' text-to-image scripts, in torch alone (torchvision is not a
dependency, DESIGN.md §7).

``train_text_to_image.py`` and ``train_lcm_distill_sd_wds.py`` build ``transforms.Resize(resolution)`` (the
short side to the resolution, bicubic here as fewstep always resized, the aspect ratio kept), then
``CenterCrop(resolution)`` or, with ``--random_crop``, ``RandomCrop(resolution)``, then, with
``--random_flip``, ``RandomHorizontalFlip()`` (probability 0.5). Here:

- :func:`resize_short_side` is ``Resize(size)`` on a [C, H, W] tensor: the long side becomes
  ``int(size · long / short)``, as torchvision computes it;
- :func:`center_offsets` is ``CenterCrop``'s ``round((H − size) / 2)``;
- :func:`training_crops` cuts one batch: at the centre or at a random offset (uniform over every position,
  as ``RandomCrop.get_params``), each image flipped with probability 1/2 under ``flip``. Its randomness comes
  from the generator it is given: the training loop seeds one per micro-batch from (seed, step, micro-step,
  rank), so every use of an image gets a new crop and a resumed run cuts what an uninterrupted one does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import FewstepError

CROPS = ("center", "random")


@dataclass(frozen=True)
class Augment:
    """How training images are cut: ``crop`` "center" (diffusers' default) or "random" (a new crop each time an
    image is used), and a random horizontal ``flip`` (off by default: a flip changes text, digits, arrows)."""

    crop: str = "center"
    flip: bool = False

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise FewstepError(f"unknown crop {self.crop!r}: use {' or '.join(CROPS)}")

    @property
    def random(self) -> bool:
        """Each use of an image differs, so nothing computed from the images can be cached for the run."""
        return self.crop == "random" or self.flip


def resize_short_side(x: Tensor, size: int) -> Tensor:
    """[C, H, W] with its short side resized to ``size`` (bicubic, antialiased) and the long side in proportion,
    ``int(size · long / short)`` (torchvision's ``Resize(size)``); values kept in [−1, 1]."""
    h, w = x.shape[-2:]
    short, long = min(h, w), max(h, w)
    new_long = int(size * long / short)
    shape = (size, new_long) if h <= w else (new_long, size)
    if (h, w) == shape:
        return x
    return F.interpolate(x[None], size=shape, mode="bicubic", antialias=True, align_corners=False)[0].clamp(-1, 1)


def center_offsets(h: int, w: int, size: int) -> tuple[int, int]:
    """(top, left) of the centre ``size``×``size`` crop of an H×W image (torchvision's ``CenterCrop``)."""
    return round((h - size) / 2.0), round((w - size) / 2.0)


def crop(x: Tensor, size: int, top: int, left: int) -> Tensor:
    return x[..., top:top + size, left:left + size]


def center_crop(x: Tensor, size: int) -> Tensor:
    return crop(x, size, *center_offsets(*x.shape[-2:], size))


def training_crops(views: Sequence[Tensor], size: int, augment: Augment, generator: torch.Generator) -> Tensor:
    """[B, C, size, size]: each view (an image whose short side is ``size``) cut as ``augment`` says. Three
    uniform numbers are drawn per image whatever is asked (top, left, flip), so one image's flip does not
    depend on the crop mode or on the other images' shapes."""
    u = torch.rand(len(views), 3, generator=generator)
    out = []
    for x, (a, b, c) in zip(views, u.tolist()):
        h, w = x.shape[-2:]
        if augment.crop == "random":
            top, left = min(int(a * (h - size + 1)), h - size), min(int(b * (w - size + 1)), w - size)
        else:
            top, left = center_offsets(h, w, size)
        y = crop(x, size, top, left)
        out.append(y.flip(-1) if augment.flip and c < 0.5 else y)
    return torch.stack(out)
