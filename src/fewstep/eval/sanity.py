"""The ruler checked on itself: what FID says about real images and real images made worse.

A ruler worth trusting puts real images at its floor and moves beyond its spread for each damage a sample can
have: blur (a Gaussian of 1 and 2 pixels), noise, and missing modes (3 of the 9 emoji groups dropped). The same
real images are damaged each time, so every difference is the damage's alone. ``tests/test_ruler.py`` asserts it
on the shipped emoji ruler; ``fewstep bench --only ruler`` writes the table for the feature network beside the
group classifier's features (BENCHMARKS "The ruler").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .evaluate import Ruler

DAMAGES = ("real", "blur 1 px", "blur 2 px", "noise 0.1", "noise 0.2", "3 of 9 groups dropped")


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """A separable Gaussian blur of standard deviation ``sigma`` pixels (kernel radius ⌈3σ⌉, edges reflected)."""
    radius = math.ceil(3 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-x**2 / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    out = F.pad(images, (radius, radius, 0, 0), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1).contiguous(), groups=c)
    out = F.pad(out, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1).contiguous(), groups=c)


def damaged_sets(ruler: Ruler, num: int = 300, seed: int = 0) -> dict[str, Tensor]:
    """:data:`DAMAGES` → ``num`` images: a seeded draw of real images, and the same draw damaged; the last one is
    drawn from the images outside 3 of the groups (the last three; labels as the ruler's data set has them)."""
    data, g = ruler.data, torch.Generator().manual_seed(seed)
    real = data.images[torch.randperm(len(data), generator=g)[:num]]
    noise = torch.randn(real.shape, generator=g)
    kept = (data.labels < data.num_classes - 3).nonzero().flatten()
    partial = data.images[kept[torch.randperm(len(kept), generator=g)[:num]]]
    return {"real": real, "blur 1 px": gaussian_blur(real, 1.0), "blur 2 px": gaussian_blur(real, 2.0),
            "noise 0.1": (real + 0.1 * noise).clamp(-1, 1), "noise 0.2": (real + 0.2 * noise).clamp(-1, 1),
            "3 of 9 groups dropped": partial}


def sanity_rows(ruler: Ruler, num: int = 300, seed: int = 0) -> dict[str, dict]:
    """FID ± its spread, precision and recall of each of :func:`damaged_sets` on ``ruler``."""
    out = {}
    for name, images in damaged_sets(ruler, num, seed).items():
        s = ruler.score(images, seed=seed)
        out[name] = {k: s[k] for k in ("fid", "fid_std", "precision", "recall", "kid", "kid_std")}
    return out
