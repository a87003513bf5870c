"""Distances d(x, y) ≥ 0 for consistency losses, one value per sample ([B] → the objective weights
and averages them).

- ``l2``: mean squared error per sample (openai/consistency_models ``mean_flat((x − y)²)``);
- ``l1``: mean absolute error per sample;
- ``pseudo-huber``: √(‖x − y‖² + c²) − c with c = 0.00054·√d (Song & Dhariwal 2023, iCT §3.3),
  d the number of dimensions: like l2 near 0, like l2-norm far away, robust to outliers (ECT: the same with its
  own c, default 0, :func:`pseudo_huber_c`);
- ``classifier``: squared distance of a classifier's penultimate features (the shipped digits or
  emoji classifier): a perceptual distance learned on the same data, the CPU stand-in for LPIPS.
  Note: the evaluation's FID uses the same features, so a model trained with it is judged by its own
  training signal; BENCHMARKS.md says which distance each figure used;
- ``features``: LPIPS's formula (Zhang et al. 2018, eq. 1) on the data set's own feature network
  (``models/<set>-features``, :mod:`fewstep.nets.classifier`): at the output of each of its five conv blocks
  the activations are unit-normalized over channels, and the squared differences summed over channels,
  averaged over positions and summed over blocks — the ``lpips`` package's ``lpips=False`` path (no learned
  per-channel weights, which need human judgements). The target is clipped to [−1, 1] as kong13661/ACT's
  ``LPIPSLoss`` does (``models/loss.py``). The stand-in for LPIPS, whose ImageNet-trained weights fewstep does
  not ship; ACT's default. The ruler's FID uses the same network's pooled features, so say so beside a
  figure of a model trained with it;
- ``lpips``: LPIPS (Zhang et al. 2018), as Song et al. 2023 use for their best CD/CT results, with
  inputs bilinearly resized to 224 as in their code. Needs the ``lpips`` package and its weights on
  disk (nothing is downloaded here).
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import FewstepError

Distance = Callable[[Tensor, Tensor], Tensor]
DISTANCES = ("l2", "l1", "pseudo-huber", "classifier", "features", "lpips")


def l2(x: Tensor, y: Tensor) -> Tensor:
    return (x - y).float().square().flatten(1).mean(1)


def l1(x: Tensor, y: Tensor) -> Tensor:
    return (x - y).float().abs().flatten(1).mean(1)


def pseudo_huber(x: Tensor, y: Tensor, c: float | None = None) -> Tensor:
    """√(‖x − y‖² + c²) − c, by default c = 0.00054·√d (iCT, Song & Dhariwal 2023 §3.3); c = 0 is the l2 norm
    ‖x − y‖, ECT's default (locuslab/ect ``training/loss.py:82-89``, ``ct_train.py`` -c 0.0)."""
    c = 0.00054 * math.sqrt(x[0].numel()) if c is None else c
    return ((x - y).float().square().flatten(1).sum(1) + c**2).sqrt() - c


def pseudo_huber_c(c: float) -> Distance:
    """:func:`pseudo_huber` with a fixed c (ECT's --huber-c)."""
    return partial(pseudo_huber, c=c)


class FeatureDistance(nn.Module):
    """‖φ(x) − φ(y)‖² / dim φ for a frozen feature network φ (a classifier's ``features``)."""

    def __init__(self, features: Callable[[Tensor], Tensor], resize: int | None = None) -> None:
        super().__init__()
        self.features = features
        self.resize = resize

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if self.resize:
            x, y = (F.interpolate(v, size=self.resize, mode="bilinear", align_corners=False) for v in (x, y))
        return (self.features(x) - self.features(y)).float().square().flatten(1).mean(1)


class PerceptualFeatureDistance(nn.Module):
    """Σ_l mean_hw ‖n(φ_l(x)) − n(φ_l(clip(y)))‖² over the conv blocks φ_l of a feature network (module docstring,
    ``features``); n(·) divides each position's channel vector by its norm (LPIPS's ``normalize_tensor``, ε = 1e-10)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.taps = {i for i, m in enumerate(net.body) if isinstance(m, nn.SiLU)}

    def blocks(self, x: Tensor) -> list[Tensor]:
        out = []
        for i, layer in enumerate(self.net.body):
            x = layer(x)
            if i in self.taps:
                out.append(x / (x.square().sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        self.net.to(x.device)
        pairs = zip(self.blocks(x), self.blocks(y.clamp(-1, 1)))
        return sum((a - b).float().square().sum(1).mean((1, 2)) for a, b in pairs)


def get_distance(name: str, classifier: str | Path | None = None, lpips_weights: str | Path | None = None) -> Distance:
    """The distance called ``name`` (one of :data:`DISTANCES`). ``classifier`` is a classifier folder
    (for ``classifier``), ``lpips_weights`` a local LPIPS weight file (for ``lpips``)."""
    if name == "l2":
        return l2
    if name == "l1":
        return l1
    if name == "pseudo-huber":
        return pseudo_huber
    if name == "classifier":
        if classifier is None:
            raise FewstepError("--distance classifier needs a classifier folder (--classifier DIR)")
        from ..nets.classifier import load_classifier
        net = load_classifier(classifier).eval().requires_grad_(False)
        return FeatureDistance(net.features)
    if name == "features":
        if classifier is None or not Path(classifier).is_dir():
            where = f"there is none at {classifier}; " if classifier is not None else ""
            raise FewstepError(f"--distance features (ACT's default) needs the data set's feature network: {where}"
                               "train one with fewstep train-classifier --instance and pass it as --classifier DIR, or "
                               "choose another --distance (l2, pseudo-huber)")
        from ..nets.classifier import load_classifier
        return PerceptualFeatureDistance(load_classifier(classifier))
    if name == "lpips":
        return _lpips(lpips_weights)
    raise FewstepError(f"unknown distance {name!r}; choose one of {', '.join(DISTANCES)}")


def _lpips(weights: str | Path | None) -> Distance:
    try:
        import lpips  # optional: pip install lpips
    except ImportError:
        raise FewstepError("--distance lpips needs the lpips package (pip install lpips) and its weights "
                           "on disk; use --distance pseudo-huber or classifier otherwise") from None
    if weights is None or not Path(weights).exists():
        raise FewstepError("--distance lpips needs --lpips-weights FILE (a local LPIPS .pth; nothing is "
                           "downloaded at run time)")
    net = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, model_path=str(weights), verbose=False)
    net = net.eval().requires_grad_(False)

    def distance(x: Tensor, y: Tensor) -> Tensor:
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        x, y = (F.interpolate(v, size=224, mode="bilinear", align_corners=False) for v in (x, y))
        return net.to(x.device)(x, y).flatten()

    return distance
