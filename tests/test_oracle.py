"""Solvers against the exact probability-flow ODE of a finite data set (DESIGN.md §5).

With the closed-form denoiser D*(x; σ) the PF-ODE dx/d ln σ = x − D*(x; σ) is known exactly, so
a high-accuracy scipy solve (DOP853, rtol 1e-11) is ground truth for fewstep's samplers.
"""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from fewstep.core.guidance import CFGDenoiser
from fewstep.core.oracle import ExactDenoiser
from fewstep.core.schedules import karras_sigmas
from fewstep.core.solvers import sample_ddim, sample_dpmpp_2m, sample_euler, sample_heun

SIGMA_MAX, SIGMA_END = 5.0, 0.1
STEPS = (16, 32, 64, 128)


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    data = torch.randn(8, 2, generator=g, dtype=torch.float64)
    x = torch.randn(16, 2, generator=g, dtype=torch.float64) * SIGMA_MAX
    den = ExactDenoiser(data)

    pts = data.numpy()

    def rhs(u, y):  # u = ln σ; D* written again in numpy, independently of ExactDenoiser
        y = y.reshape(len(x), -1)
        logits = -((y[:, None, :] - pts[None]) ** 2).sum(-1) / (2 * math.exp(2 * u))
        w = np.exp(logits - logits.max(1, keepdims=True))
        return (y - (w / w.sum(1, keepdims=True)) @ pts).reshape(-1)

    sol = solve_ivp(rhs, (math.log(SIGMA_MAX), math.log(SIGMA_END)), x.reshape(-1).numpy(), method="DOP853",
                    rtol=1e-11, atol=1e-12)
    return den, x, torch.from_numpy(sol.y[:, -1]).reshape(x.shape)


@pytest.mark.parametrize("sampler, order, final_tol", [
    (sample_euler, 1, 3e-2), (sample_ddim, 1, 3e-2), (sample_heun, 2, 2e-4), (sample_dpmpp_2m, 2, 1e-3)])
def test_samplers_converge_to_reference_at_their_order(problem, sampler, order, final_tol):
    den, x, reference = problem
    errors = [(sampler(den, x.clone(), karras_sigmas(n + 1, SIGMA_END, SIGMA_MAX, 7.0)) - reference).abs().max().item()
              for n in STEPS]
    assert errors[-1] < final_tol, errors
    assert all(a > b for a, b in zip(errors, errors[1:])), f"error must fall as steps double: {errors}"
    observed = sum(math.log2(a / b) for a, b in zip(errors[-3:], errors[-2:])) / 2
    assert order - 0.4 < observed < order + 0.6, f"observed order {observed:.2f}, expected {order}: {errors}"


def test_exact_denoiser_is_the_mmse_estimator():
    """D* minimizes E‖D(x_0 + σn) − x_0‖²: any perturbation of it does worse."""
    g = torch.Generator().manual_seed(1)
    data = torch.randn(5, 3, generator=g, dtype=torch.float64)
    den = ExactDenoiser(data)
    x0 = data[torch.randint(0, 5, (20000,), generator=g)]
    for sigma in (0.3, 1.0, 3.0):
        noisy = x0 + sigma * torch.randn(x0.shape, generator=g, dtype=torch.float64)
        d = den(noisy, torch.tensor(sigma))
        best = (d - x0).square().sum(1).mean()
        for worse in (0.9 * d + 0.1 * noisy, 0.9 * d + 0.1 * data.mean(0), d + 0.05):
            assert best < (worse - x0).square().sum(1).mean()
    # limits: σ → 0 picks the nearest point, σ → ∞ gives the mean
    torch.testing.assert_close(den(data + 1e-3, torch.tensor(1e-3)), data)
    torch.testing.assert_close(den(torch.zeros(1, 3, dtype=torch.float64), torch.tensor(1e6)), data.mean(0, keepdim=True))


def test_cfg_on_the_exact_denoiser():
    """s = 1 is the conditional denoiser, s = 0 the unconditional one, and the batched cond+uncond call
    equals the two separate calls combined as D_u + s(D_c − D_u)."""
    g = torch.Generator().manual_seed(2)
    data = torch.randn(12, 2, generator=g, dtype=torch.float64)
    labels = torch.arange(12) % 3
    den = ExactDenoiser(data, labels)
    x = torch.randn(6, 2, generator=g, dtype=torch.float64)
    sigma = torch.full((6,), 0.7, dtype=torch.float64)
    cond, null = torch.tensor([0, 1, 2, 0, 1, 2]), torch.full((6,), 3)
    d_c, d_u = den(x, sigma, class_labels=cond), den(x, sigma, class_labels=null)
    for s in (0.0, 1.0, 2.5):
        guided = CFGDenoiser(den, s, {"class_labels": null})(x, sigma, class_labels=cond)
        torch.testing.assert_close(guided, d_u + s * (d_c - d_u))
    torch.testing.assert_close(den(x, sigma, class_labels=null), ExactDenoiser(data)(x, sigma))
    with pytest.raises(ValueError, match="guidance scale"):
        CFGDenoiser(den, -1.0, {"class_labels": null})
