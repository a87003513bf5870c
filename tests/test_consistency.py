"""Consistency distillation / training: curricula against the papers' formulas, the CD loss against
the exact PF-ODE of a finite data set, shared dropout, exact resume of the objective state (ACT's included;
ACT's own behaviour is tests/test_act.py)."""

import math

import pytest
import torch
from helpers import tiny_unet

from fewstep.core.denoisers import EDMDenoiser, cm_scalings
from fewstep.core.oracle import ExactDenoiser
from fewstep.core.schedules import EDMSchedule, karras_levels, karras_sigmas
from fewstep.core.solvers import sample_heun
from fewstep.nets.discriminator import Discriminator
from fewstep.objectives.adversarial import AdversarialConsistencyLoss, diff_augment
from fewstep.objectives.consistency import ConsistencyLoss
from fewstep.objectives.curricula import (
    Curriculum,
    ct_num_scales,
    ct_target_ema,
    ict_level_probs,
    ict_num_scales,
)
from fewstep.objectives.distances import l2, pseudo_huber
from fewstep.training import TrainConfig, train


# --- curricula -----------------------------------------------------------------------------------
def test_karras_levels_are_the_karras_grid_reversed():
    n = 18
    levels = karras_levels(torch.arange(n), n)
    assert torch.allclose(levels, karras_sigmas(n, 0.002, 80.0).flip(0))
    assert levels[0].item() == pytest.approx(0.002) and levels[-1].item() == pytest.approx(80.0)


def test_ct_schedules_follow_song_et_al_appendix_c():
    assert ct_num_scales(0, 1000) == 2 and ct_num_scales(1000, 1000) == 151
    n = [ct_num_scales(k, 1000) for k in range(0, 1001, 50)]
    assert n == sorted(n)                                    # N(k) grows monotonically
    assert ct_target_ema(2) == pytest.approx(0.9)             # μ0 at N = s0
    assert ct_target_ema(151) == pytest.approx(math.exp(2 * math.log(0.9) / 151))


def test_ict_curriculum_doubles_and_caps():
    total = 800                                              # K' = ⌊800 / (log2 128 + 1)⌋ = 100
    assert [ict_num_scales(k, total) for k in (0, 99, 100, 200, 700, 799)] == [11, 11, 21, 41, 1281, 1281]


def test_ict_level_probs_are_the_discretized_lognormal():
    probs = ict_level_probs(641)
    assert probs.sum().item() == pytest.approx(1.0) and (probs >= 0).all()
    levels = karras_levels(torch.arange(641), 641)
    below = probs[levels[1:] <= math.exp(-1.1)].sum().item()  # mass of the pairs under the median e^{P_mean}
    assert below == pytest.approx(0.5, abs=0.01)


def test_curriculum_draws_adjacent_levels():
    schedule = EDMSchedule()
    for method in ("cd", "ct", "ict"):
        cur = Curriculum.for_method(method, 100)
        lo, hi = cur.sample_pairs(256, 50, schedule)
        n = cur.scales(50)
        idx = torch.round((lo.double() ** (1 / 7) - 0.002 ** (1 / 7)) / (80 ** (1 / 7) - 0.002 ** (1 / 7)) * (n - 1))
        assert torch.allclose(karras_levels(idx + 1, n).float(), hi, rtol=1e-5)
        assert (hi > lo).all() and lo.min() >= 0.002 - 1e-6 and hi.max() <= 80 + 1e-3


def test_pseudo_huber_is_l2_like_near_zero_and_norm_like_far():
    x = torch.zeros(2, 1, 16, 16)
    c = 0.00054 * 16
    small, large = torch.full_like(x, 1e-5), torch.full_like(x, 1.0)
    assert pseudo_huber(small, x)[0].item() == pytest.approx(small[0].square().sum().item() / (2 * c), rel=1e-2)
    assert pseudo_huber(large, x)[0].item() == pytest.approx(16 - c, rel=1e-3)


# --- the CD loss against the exact PF-ODE --------------------------------------------------------
class ExactFlowMap(torch.nn.Module):
    """f*(x, σ): the oracle PF-ODE solved from σ down to σmin with 200 Heun steps: the ideal student."""

    def __init__(self, den):
        super().__init__()
        self.den = den

    def forward(self, x, sigma, **cond):
        out = torch.empty_like(x)
        for s in sigma.unique():
            rows = sigma == s
            grid = karras_sigmas(200, 0.002, float(s)).to(x.dtype)
            out[rows] = sample_heun(self.den, x[rows], grid)
        return out


@pytest.mark.parametrize("solver", ["heun", "euler"])
def test_cd_loss_vanishes_on_the_exact_consistency_function(solver):
    """The exact flow map of the teacher's ODE is what CD should learn: its loss is near zero, while the
    teacher's own one-step denoiser (not consistent along trajectories) is far from it."""
    g = torch.Generator().manual_seed(0)
    data = torch.randn(8, 2, generator=g, dtype=torch.float64)
    den = ExactDenoiser(data)
    cur = Curriculum(name="cd", total_steps=1, num_scales=18, target_ema=0.0)
    loss_fn = ConsistencyLoss(EDMSchedule(), cur, l2, teacher=lambda cond: (den, {}), solver=solver)
    batch = {"images": data[torch.randint(0, 8, (64,), generator=g)]}
    torch.manual_seed(1)
    exact = loss_fn(ExactFlowMap(den), batch)[0].item()
    torch.manual_seed(1)
    one_step = loss_fn(lambda x, s, **c: den(x, s), batch)[0].item()
    assert exact < 1e-2 * one_step, (exact, one_step)
    if solver == "heun":
        assert exact < 1e-4


def test_online_and_target_share_dropout():
    """With the target equal to the online weights and σ_n = σ_{n+1}, the pair must be identical:
    only true when both branches draw the same dropout mask."""
    torch.manual_seed(0)
    model = EDMDenoiser(tiny_unet(dropout=0.5), scalings=cm_scalings).train()
    cur = Curriculum(name="ct", total_steps=10)
    loss_fn = ConsistencyLoss(EDMSchedule(), cur, l2, condition=lambda batch: {"class_labels": batch["labels"]})
    same = torch.full((4,), 1.5)
    loss_fn.curriculum = type("Fixed", (), {"sample_pairs": lambda *a: (same, same), "weight": cur.weight,
                                            "scales": cur.scales, "ema": cur.ema})()
    batch = {"images": torch.rand(4, 1, 8, 8) * 2 - 1, "labels": torch.tensor([0, 1, 2, 0])}
    pair = loss_fn.pair(model, batch)
    assert torch.equal(pair.online.detach(), pair.target)


def _setup(method):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = {"images": torch.rand(16, 1, 8, 8, generator=g) * 2 - 1, "labels": torch.randint(0, 3, (16,), generator=g)}
    model = EDMDenoiser(tiny_unet(), scalings=cm_scalings)
    teacher_net = EDMDenoiser(tiny_unet()).eval().requires_grad_(False)
    loss = ConsistencyLoss(EDMSchedule(), Curriculum.for_method("ct" if method == "act" else method, 4),
                           pseudo_huber if method == "ict" else l2,
                           teacher=(lambda c: (teacher_net, {"class_labels": c["class_labels"]})) if method == "cd" else None,
                           condition=lambda batch: {"class_labels": batch["labels"]})
    if method == "act":
        disc = Discriminator(8, 1, 3, width=8)
        loss = AdversarialConsistencyLoss(loss, disc, r1_interval=2)
    return model, loss, data


@pytest.mark.parametrize("method", ["cd", "ict", "act"])
def test_resumed_run_equals_uninterrupted(tmp_path, method):
    """Target network, curriculum step, discriminator and its optimizer are checkpointed with the model."""
    cfg = dict(max_steps=4, batch_size=8, lr=1e-3, warmup_steps=1, checkpoint_every=2, progress=False)
    model, full_loss, data = _setup(method)
    full = train(model, full_loss, data, TrainConfig(out_dir=str(tmp_path / "a"), **cfg))
    model, loss, data = _setup(method)
    train(model, loss, data, TrainConfig(out_dir=str(tmp_path / "b"), **{**cfg, "max_steps": 2}))
    model, loss2, data = _setup(method)
    resumed = train(model, loss2, data, TrainConfig(out_dir=str(tmp_path / "b"), **cfg))
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    a, b = full_loss.state_dict(), loss2.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6), key


def test_diff_augment_is_identity_at_zero_and_keeps_shape():
    x = torch.randn(5, 3, 16, 16)
    assert torch.equal(diff_augment(x, 0.0), x)
    y = diff_augment(x, 1.0)
    assert y.shape == x.shape and not torch.equal(y, x)


def test_fitted_ct_curriculum_keeps_the_papers_target_horizon_as_a_share_of_the_run():
    """At the paper's 800k iterations the fitted μ0 is the paper's 0.9; at any length the target's EMA
    horizon at the end, 1/(1 − μ(K)), is the same share of the run (≈ 0.09%)."""
    from fewstep.objectives.curricula import PAPER_STEPS, Curriculum

    assert Curriculum.for_method("ct", PAPER_STEPS, fitted=True).mu0 == pytest.approx(0.9)
    share = 1 / (1 - Curriculum.for_method("ct", PAPER_STEPS).ema(PAPER_STEPS)) / PAPER_STEPS
    for k in (20_000, 100_000):
        c = Curriculum.for_method("ct", k, fitted=True)
        assert 1 / (1 - c.ema(k)) / k == pytest.approx(share, rel=1e-6)
    short = Curriculum.for_method("ct", 1500, fitted=True)
    assert short.ema(1500) < 0.5 < Curriculum.for_method("ct", 1500).ema(1500)   # the paper's target barely moves


@pytest.mark.parametrize("method, given, expected", [("ict", None, "pseudo-huber"), ("ct", None, "l2"),
                                                     ("ict", "l2", "l2")])
def test_ict_trains_with_the_papers_pseudo_huber_by_default(tmp_path, method, given, expected):
    """iCT's distance is pseudo-Huber (Song & Dhariwal 2023 §3.3) unless --distance says otherwise; CT's is l2."""
    from fewstep.cli import main
    from fewstep.models.folders import load_model

    argv = ["train", "--method", method, "--dataset", "digits", "--width", "8", "--steps", "1", "--batch", "4",
            "--out", str(tmp_path / "m"), "--work-dir", str(tmp_path / "w"), "--no-progress"]
    assert main(argv + (["--distance", given] if given else [])) == 0
    assert load_model(tmp_path / "m").config.training["config"]["extra"]["distance"] == expected
