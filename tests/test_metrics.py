"""Tests of fewstep.eval.metrics: FID, KID, improved precision/recall, and the stats cache.

Known answers come from closed forms (Fréchet distance of Gaussians), an independent scipy
implementation, estimator properties (KID unbiasedness) and 2-D toy sets whose manifold
coverage is obvious.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from scipy.ndimage import gaussian_filter

from fewstep.eval.metrics import (
    FeatureStatsCache,
    feature_stats,
    fid,
    frechet_distance,
    kid,
    precision_recall,
)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """These tensors are tiny; intra-op threads only add contention on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def correlated_gaussian(n: int, d: int, rng: np.random.Generator, shift: float = 0.0) -> np.ndarray:
    mixing = np.random.default_rng(1234).normal(size=(d, d)) / np.sqrt(d)   # fixed across calls
    return rng.normal(size=(n, d)) @ mixing + shift


def scipy_frechet(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """Reference: the pytorch-fid / Heusel et al. formula with scipy.linalg.sqrtm of Σ1Σ2."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# ---------------------------------------------------------------- FID

def test_fid_of_a_set_with_itself_is_zero_and_below_any_perturbation() -> None:
    rng = np.random.default_rng(0)
    x = correlated_gaussian(1000, 32, rng)
    assert abs(fid(x, x)) < 1e-6
    for perturbed in (x + 0.05 * rng.normal(size=x.shape), x * 1.05, x + 0.05, x[:, ::-1].copy()):
        assert fid(x, perturbed) > 1e-3


def test_fid_accepts_numpy_and_torch_alike() -> None:
    rng = np.random.default_rng(1)
    x, y = correlated_gaussian(300, 8, rng), correlated_gaussian(300, 8, rng, shift=0.3)
    expected = fid(x, y)
    assert fid(torch.from_numpy(x), torch.from_numpy(y)) == expected
    assert fid(torch.from_numpy(x).float(), y) == pytest.approx(expected, rel=1e-5)


def test_fid_grows_monotonically_with_noise() -> None:
    rng = np.random.default_rng(2)
    x = correlated_gaussian(2000, 16, rng)
    eps = rng.normal(size=x.shape)
    scores = [fid(x, x + std * eps) for std in (0.1, 0.3, 0.6, 1.0)]
    assert scores[0] > 0
    assert all(a < b for a, b in zip(scores, scores[1:])), scores


def test_fid_grows_monotonically_with_blur() -> None:
    """'Images': random smooth 8×8 fields; features: the 64 flattened pixels."""
    rng = np.random.default_rng(3)
    images = gaussian_filter(rng.normal(size=(2000, 8, 8)), sigma=(0, 1, 1), mode="wrap")
    feats = images.reshape(len(images), -1)
    scores = []
    for blur in (0.5, 1.0, 1.5, 2.0):
        blurred = gaussian_filter(images, sigma=(0, blur, blur), mode="wrap")
        scores.append(fid(feats, blurred.reshape(len(images), -1)))
    assert scores[0] > 0
    assert all(a < b for a, b in zip(scores, scores[1:])), scores


@pytest.mark.parametrize("d", [16, 64])
def test_frechet_matches_scipy_sqrtm_reference(d: int) -> None:
    rng = np.random.default_rng(d)
    x = correlated_gaussian(800, d, rng)
    y = rng.normal(size=(800, d)) * np.linspace(0.5, 2.0, d) + 0.2     # a different covariance and mean
    (mu1, s1), (mu2, s2) = (tuple(t.numpy() for t in feature_stats(f)) for f in (x, y))
    np.testing.assert_allclose(np.cov(x, rowvar=False), s1, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(x.mean(0), mu1, rtol=1e-12, atol=1e-12)
    expected = scipy_frechet(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)
    assert fid(x, y) == pytest.approx(expected, rel=1e-6)


def test_frechet_closed_form_for_gaussians() -> None:
    """For commuting Σ1 = Q diag(a) Qᵀ, Σ2 = Q diag(b) Qᵀ: d² = ‖μ1−μ2‖² + Σ(√a − √b)²."""
    rng = np.random.default_rng(5)
    d = 12
    a, b = rng.uniform(0.1, 4.0, d), rng.uniform(0.1, 4.0, d)
    a[:3] = 0.0                                                           # rank-deficient Σ1
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    rotated = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-8)
    # and from samples of those Gaussians, FID approaches it (bias and noise are O(d/N))
    n = 20000
    xa = mu1 + rng.normal(size=(n, d)) * np.sqrt(a)
    xb = mu2 + rng.normal(size=(n, d)) * np.sqrt(b)
    assert fid(xa, xb) == pytest.approx(expected, rel=0.03)


def test_frechet_is_stable_for_singular_covariances() -> None:
    """20 samples in 64-D: Σ has rank ≤ 19, the case where sqrtm-based FID goes complex or noisy."""
    rng = np.random.default_rng(6)
    x = rng.normal(size=(20, 64))
    assert abs(fid(x, x)) < 1e-8
    mu, sigma = feature_stats(x)
    scaled = frechet_distance(mu, sigma, mu, 4 * sigma)                   # Tr(Σ)·(1 − 2)² exactly
    assert scaled == pytest.approx(float(sigma.trace()), rel=1e-8)


# ---------------------------------------------------------------- KID

def poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1) ** 3


def test_kid_with_full_subsets_equals_the_unbiased_mmd2_formula() -> None:
    """subset_size ≥ N: every subset is the whole set, so KID is the plain U-statistic."""
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(60, 5)), rng.normal(size=(80, 5)) + 0.3
    m = 60
    y = y[:m]
    off = ~np.eye(m, dtype=bool)
    expected = (
        poly_kernel(x, x)[off].mean() + poly_kernel(y, y)[off].mean() - 2 * poly_kernel(x, y).mean()
    )
    mean, std = kid(x, y, num_subsets=3, subset_size=1000)
    assert mean == pytest.approx(expected, rel=1e-10)
    assert std < 1e-12


def test_kid_is_unbiased_for_one_distribution_and_positive_for_two() -> None:
    """60 independent pairs of disjoint samples from one Gaussian: each KID (one full subset) is an
    independent unbiased estimate of MMD² = 0, so their mean lies within 4 standard errors of 0.
    The biased V-statistic on the same draws is offset by O(1/m) and fails the same bound,
    which shows the bound can catch a bias."""
    rng = np.random.default_rng(8)
    m, d, reps = 100, 8, 60
    unbiased, biased = [], []
    for _ in range(reps):
        x, y = rng.normal(size=(m, d)), rng.normal(size=(m, d))
        unbiased.append(kid(x, y, num_subsets=1, subset_size=m)[0])
        biased.append(poly_kernel(x, x).mean() + poly_kernel(y, y).mean() - 2 * poly_kernel(x, y).mean())
    stderr = np.std(unbiased, ddof=1) / np.sqrt(reps)
    assert abs(np.mean(unbiased)) < 4 * stderr
    assert np.mean(biased) > 4 * stderr

    same_mean, _ = kid(rng.normal(size=(600, d)), rng.normal(size=(600, d)), num_subsets=20, subset_size=300)
    diff_mean, diff_std = kid(rng.normal(size=(600, d)), rng.normal(size=(600, d)) + 0.5, num_subsets=20,
                              subset_size=300)
    assert diff_mean > 3 * diff_std > 0
    assert abs(same_mean) < 0.05 * diff_mean


# ---------------------------------------------------------------- precision / recall

def two_modes(n: int, rng: np.random.Generator) -> np.ndarray:
    centres = np.where(rng.random(n) < 0.5, -5.0, 5.0)
    return np.stack([centres, np.zeros(n)], axis=1) + rng.normal(size=(n, 2))


def test_precision_recall_on_a_line_with_known_radii() -> None:
    """Reals at 0,1,…,9 with k=1: each radius is 1 (the point itself is excluded, else 0)."""
    real = np.arange(10.0)[:, None]
    fake = np.array([[0.5], [4.3], [9.9], [12.0]])
    precision, recall = precision_recall(real, fake, k=1)
    assert precision == pytest.approx(3 / 4)
    # fake radii (k=1): 0.5→3.8, 4.3→3.8, 9.9→2.1, 12.0→2.1; every real in [0, 12] is within one
    assert recall == pytest.approx(1.0)


def test_precision_recall_two_dimensional_cases() -> None:
    rng = np.random.default_rng(9)
    real = two_modes(1000, rng)

    precision, recall = precision_recall(real, two_modes(1000, rng))
    assert precision > 0.9 and recall > 0.9

    # mode collapse: every fake sample comes from the right-hand mode (same spread as that mode)
    collapsed = np.array([5.0, 0.0]) + rng.normal(size=(1000, 2))
    precision, recall = precision_recall(real, collapsed)
    assert precision > 0.9
    assert 0.35 < recall < 0.65

    precision, recall = precision_recall(real, real + 100.0)
    assert precision == 0.0 and recall == 0.0


def test_precision_recall_batching_does_not_change_the_answer() -> None:
    rng = np.random.default_rng(10)
    real, fake = two_modes(300, rng), two_modes(250, rng) * 1.3
    assert precision_recall(real, fake, batch_size=7) == precision_recall(real, fake, batch_size=4096)


# ---------------------------------------------------------------- cache

def test_feature_stats_cache_round_trips(tmp_path) -> None:
    rng = np.random.default_rng(11)
    feats = rng.normal(size=(200, 6))
    cache = FeatureStatsCache(tmp_path / "stats")
    mu, sigma = cache.get("toy-ref", lambda: feats)
    assert cache.path("toy-ref").exists() and cache.path("toy-ref").suffix == ".safetensors"

    def must_not_run() -> np.ndarray:
        raise AssertionError("features recomputed although cached")

    mu2, sigma2 = FeatureStatsCache(tmp_path / "stats").get("toy-ref", must_not_run)
    assert torch.equal(mu, mu2) and torch.equal(sigma, sigma2)
    assert mu2.dtype == torch.float64
    with pytest.raises(ValueError):
        cache.path("../escape")


def test_bootstrap_spread_of_a_mean_is_the_standard_error():
    """The bootstrap std of a sample mean is σ/√n (Efron 1979), the figure eval reports beside accuracy."""
    from fewstep.eval.metrics import bootstrap_std

    x = torch.randn(2000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    spread = bootstrap_std(lambda i: float(x[i].mean()), len(x), resamples=400, seed=1)
    assert abs(spread - float(x.std()) / len(x) ** 0.5) < 0.1 * spread
