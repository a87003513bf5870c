"""Sample-quality metrics on feature matrices (DESIGN.md §5).

Every function takes features ``[N, D]`` as a numpy array or a torch tensor and computes in
float64; which network produced the features (the shipped classifier, or Inception) is the
caller's business.

- FID: Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017,
  "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium", eq. 6).
- KID: unbiased MMD² with a cubic polynomial kernel (Bińkowski et al. 2018, "Demystifying MMD
  GANs", §4 and Appendix D), averaged over random subsets.
- Improved precision and recall: k-NN manifold estimates (Kynkäänniemi et al. 2019, "Improved
  Precision and Recall Metric for Assessing Generative Models", eqs. 1–3).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..io.atomic import atomic_path

Features = np.ndarray | Tensor


def _as_f64(x: Features) -> Tensor:
    """A float64 CPU tensor view/copy of ``x``."""
    return torch.as_tensor(x).detach().to(device="cpu", dtype=torch.float64)


def _as_2d(x: Features) -> Tensor:
    t = _as_f64(x)
    if t.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {tuple(t.shape)}")
    return t


def _check_pair(a: Tensor, b: Tensor) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")


def feature_stats(features: Features) -> tuple[Tensor, Tensor]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` (float64) of features ``[N, D]``, N ≥ 2."""
    x = _as_2d(features)
    if len(x) < 2:
        raise ValueError("need at least 2 samples for a covariance")
    mu = x.mean(dim=0)
    centred = x - mu
    return mu, centred.T @ centred / (len(x) - 1)


def _clip_eigvals(w: Tensor) -> Tensor:
    """Zero the eigenvalues of a PSD matrix that are round-off: below D·eps·max|λ| (the rank
    tolerance of numpy's matrix_rank). Their square roots (~1e-8 each) would otherwise add up."""
    tol = w.abs().max() * len(w) * torch.finfo(w.dtype).eps
    return torch.where(w > tol, w, torch.zeros_like(w))


def _sqrtm_psd(a: Tensor) -> Tensor:
    """Symmetric square root of a symmetric PSD matrix, round-off eigenvalues set to 0."""
    w, v = torch.linalg.eigh((a + a.T) / 2)
    return (v * _clip_eigvals(w).sqrt()) @ v.T


def frechet_distance(mu1: Features, sigma1: Features, mu2: Features, sigma2: Features) -> float:
    """d² = ‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2(Σ1Σ2)^{1/2})  (Heusel et al. 2017, eq. 6).

    Tr((Σ1Σ2)^{1/2}) is the sum of square roots of the eigenvalues of Σ1Σ2, which are those of
    the symmetric PSD matrix M = Σ1^{1/2} Σ2 Σ1^{1/2} (similar matrices). Both roots are taken
    by symmetric eigendecomposition with round-off eigenvalues (negative, or below D·eps·λ_max)
    set to 0, so near-singular or rank-deficient covariances need no ε-regularisation and give
    no complex parts, unlike ``scipy.linalg.sqrtm`` on the non-symmetric product.
    """
    mu1, mu2, s1, s2 = (_as_f64(t) for t in (mu1, mu2, sigma1, sigma2))
    root1 = _sqrtm_psd(s1)
    m = root1 @ s2 @ root1
    tr_covmean = _clip_eigvals(torch.linalg.eigvalsh((m + m.T) / 2)).sqrt().sum()
    d2 = (mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_covmean
    return float(d2.clamp_min(0))


def fid(feats_a: Features, feats_b: Features) -> float:
    """Fréchet Inception Distance between two feature sets (see :func:`frechet_distance`)."""
    a, b = _as_2d(feats_a), _as_2d(feats_b)
    _check_pair(a, b)
    return frechet_distance(*feature_stats(a), *feature_stats(b))


def _poly_kernel(x: Tensor, y: Tensor) -> Tensor:
    """k(x, y) = (x·y / d + 1)³  (Bińkowski et al. 2018, §4)."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def _mmd2_unbiased(x: Tensor, y: Tensor) -> Tensor:
    """Unbiased MMD² of equal-size samples (Gretton et al. 2012, eq. 3; Bińkowski et al. 2018, eq. 4):
    Σ_{i≠j} [k(x_i,x_j) + k(y_i,y_j)] / (m(m−1)) − 2 Σ_{i,j} k(x_i,y_j) / m².
    """
    m = len(x)
    kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    within = (kxx.sum() - kxx.trace() + kyy.sum() - kyy.trace()) / (m * (m - 1))
    return within - 2 * kxy.sum() / m**2


def kid(
    feats_a: Features, feats_b: Features, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Kernel Inception Distance: mean and std of unbiased MMD² over random subsets.

    Bińkowski et al. 2018 (arXiv 1801.01401, §4 / Appendix D). Follows the estimator of
    torch-fidelity (``torch_fidelity/metric_kid.py``: ``mmd2(..., mmd_est='unbiased')`` with
    kernel degree 3, γ = 1/d, coef0 = 1) and clean-fid (``cleanfid/fid.py: kernel_distance``):
    each subset draws ``subset_size`` rows from each set without replacement, ``subset_size`` is
    clipped to the smaller set, and std is the population std (ddof=0) of the subset values.
    The estimate is unbiased, so it can be slightly negative for matching distributions.
    """
    a, b = _as_2d(feats_a), _as_2d(feats_b)
    _check_pair(a, b)
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError("KID needs at least 2 samples per set")
    rng = np.random.default_rng(seed)
    values = torch.stack([
        _mmd2_unbiased(a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)])
        for _ in range(num_subsets)
    ])
    return float(values.mean()), float(values.std(correction=0))


def _knn_radii(x: Tensor, k: int, batch_size: int) -> Tensor:
    """Distance from each row of ``x`` to its k-th nearest other row (the (k+1)-th incl. itself)."""
    if len(x) <= k:
        raise ValueError(f"need more than k={k} samples, got {len(x)}")
    return torch.cat([
        torch.cdist(chunk, x).kthvalue(k + 1, dim=1).values for chunk in x.split(batch_size)
    ])


def _inside(queries: Tensor, support: Tensor, radii: Tensor, batch_size: int) -> Tensor:
    """Whether each of ``queries`` is within radius r_j of some support point j (Kynkäänniemi et al. eq. 1)."""
    return torch.cat([
        (torch.cdist(chunk, support) <= radii[None, :]).any(dim=1) for chunk in queries.split(batch_size)
    ])


def precision_recall_points(
    real_feats: Features, fake_feats: Features, k: int = 3, batch_size: int = 1024
) -> tuple[Tensor, Tensor]:
    """The per-point terms of :func:`precision_recall`: f(fake, Φ_real) for each fake, f(real, Φ_fake)
    for each real (booleans), whose means are precision and recall."""
    real, fake = _as_2d(real_feats), _as_2d(fake_feats)
    _check_pair(real, fake)
    return (_inside(fake, real, _knn_radii(real, k, batch_size), batch_size),
            _inside(real, fake, _knn_radii(fake, k, batch_size), batch_size))


def bootstrap_std(statistic: Callable[[Tensor], float], n: int, resamples: int = 50, seed: int = 0) -> float:
    """Std (ddof = 1) of ``statistic(index)`` over ``resamples`` bootstrap resamples of ``n`` points
    (Efron 1979: draws of n indices with replacement, seeded): the spread of an estimate over the sample."""
    rng = np.random.default_rng(seed)
    values = [statistic(torch.from_numpy(rng.integers(0, n, n))) for _ in range(resamples)]
    return float(np.std(values, ddof=1))


def precision_recall(
    real_feats: Features, fake_feats: Features, k: int = 3, batch_size: int = 1024
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, arXiv 1904.06991, eqs. 1–3).

    The manifold of a set Φ is the union of balls around each φ ∈ Φ with radius the distance
    to its k-th nearest neighbour in Φ (itself excluded), f(φ, Φ) = 1 if φ lies in it (eq. 1).
    precision = mean over fakes of f(fake, Φ_real) (eq. 2); recall = mean over reals of
    f(real, Φ_fake) (eq. 3). Distances are Euclidean, computed with ``torch.cdist`` in row
    batches of ``batch_size`` so memory is O(batch_size · N).
    """
    precision, recall = precision_recall_points(real_feats, fake_feats, k, batch_size)
    return float(precision.double().mean()), float(recall.double().mean())


class FeatureStatsCache:
    """(μ, Σ) of reference feature sets, computed once and kept as ``<root>/<name>.safetensors``.

    The name is the caller's key (e.g. ``"mnist-train-classifier-v1"``); it must change when the
    data or the feature network changes, since the cache never checks that.
    """

    _NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, name: str) -> Path:
        if not self._NAME.match(name):
            raise ValueError(f"cache name must be letters, digits, '.', '_' or '-': {name!r}")
        return self.root / f"{name}.safetensors"

    def get(self, name: str, features: Features | Callable[[], Features]) -> tuple[Tensor, Tensor]:
        """Load (μ, Σ) for ``name`` if stored; otherwise compute them from ``features`` (an array,
        or a zero-argument callable so the features are only computed on a miss) and store them."""
        path = self.path(name)
        if path.exists():
            stored = load_file(path)
            return stored["mu"], stored["sigma"]
        mu, sigma = feature_stats(features() if callable(features) else features)
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:                             # no half-written file on a crash
            save_file({"mu": mu.contiguous(), "sigma": sigma.contiguous()}, tmp)
        return mu, sigma
