"""ACT as kong13661/ACT's train_cifar10.py has it (fewstep.objectives.adversarial): the split batch, fresh fakes
from the updated student, a discriminator untouched by the generator's backward, R1 against its closed form,
adaptive augmentation, λ(σ), and a discriminator that learns to tell real from fake."""

import pytest
import torch
from helpers import tiny_unet

from fewstep.core.denoisers import EDMDenoiser, cm_scalings
from fewstep.core.schedules import EDMSchedule
from fewstep.nets.discriminator import Discriminator
from fewstep.objectives.adversarial import AdaptiveAugment, AdversarialConsistencyLoss, halves
from fewstep.objectives.consistency import ConsistencyLoss
from fewstep.objectives.curricula import Curriculum
from fewstep.objectives.distances import l2


class _Linear(torch.nn.Module):
    """D(x, σ) = ⟨w, x⟩: ∇_x D = w for every input, so R1 = γ/2·‖w‖² exactly."""

    def __init__(self, shape=(1, 8, 8)) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(3)))

    def forward(self, x, sigma, **cond):
        return (x * self.w).flatten(1).sum(1)


class _Zero(torch.nn.Module):
    """A student whose every output is 0 (records the calls it gets and whether grad was on)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, bool]] = []

    def forward(self, x, sigma, **cond):
        self.calls.append((len(x), torch.is_grad_enabled()))
        return torch.zeros_like(x)


def _act(disc=None, **kw) -> AdversarialConsistencyLoss:
    ct = ConsistencyLoss(EDMSchedule(), Curriculum.for_method("ct", 8), l2,
                         condition=lambda batch: {"class_labels": batch["labels"]})
    return AdversarialConsistencyLoss(ct, disc if disc is not None else Discriminator(8, 1, 3, width=8), **kw)


def _batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"images": torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, "labels": torch.randint(0, 3, (n,), generator=g)}


def _student():
    torch.manual_seed(0)
    return EDMDenoiser(tiny_unet(dropout=0.0), scalings=cm_scalings)


def test_the_generator_trains_on_the_first_half_and_the_discriminator_gets_no_gradient_from_it():
    """training_step (train_cifar10.py:179-210): the generator's loss is a function of the first half only; the
    discriminator is frozen while it is built (toggle_optimizer), so its backward leaves D without gradients."""
    act, model, batch = _act(), _student(), _batch()
    other = {k: v.clone() for k, v in batch.items()}
    other["images"][8:] = -other["images"][8:]                  # a different second half
    values = []
    for b in (batch, other):
        torch.manual_seed(1)
        value, _ = act(model, b)
        values.append(value)
    assert torch.equal(values[0], values[1])
    values[0].backward()
    assert all(p.grad is None for p in act.discriminator.parameters())
    assert any(p.grad is not None for p in model.parameters())
    assert torch.equal(act._pending[0]["images"], batch["images"][8:])     # the second half waits for D's step


def test_the_discriminator_step_draws_fresh_fakes_from_the_updated_student_on_every_micro_batch():
    """discriminator_fake_loss (train_cifar10.py:241-253): after the generator's step, each kept half gives its first
    quarter as fresh fakes (the student under no_grad) and its second as reals; with 2 micro-batches both reach D."""
    act, student = _act(_Linear()), _Zero()
    for seed in (0, 1):
        act._pending.append(halves(_batch(16, seed))[1])
    act.after_step(student, 3)                                   # not an R1 step (2 mod 16)
    assert student.calls == [(4, False), (4, False)]
    # fakes are 0 so D(fake) = 0 contributes no gradient; the reals give −λ/2·Σ_parts mean σ(−⟨w, x⟩)·x
    w = act.discriminator.w
    expected = torch.zeros_like(w)
    for seed in (0, 1):
        reals = halves(halves(_batch(16, seed))[1])[1]["images"]
        expected -= (torch.sigmoid(-(reals * w.detach()).flatten(1).sum(1))[:, None, None, None] * reals).mean(0) / 2
    assert torch.allclose(w.grad, act.gan_weight * expected, atol=1e-6)


def test_r1_is_the_closed_form_on_a_linear_discriminator_on_interval_steps_not_scaled():
    """r1_panelty (train_cifar10.py:125-131): γ/2·mean‖∇_x D‖², on the steps whose 0-based index is a multiple of
    r1_interval, not multiplied by the interval (the old fewstep R1 was 16× too strong)."""
    act, student = _act(_Linear(), r1_gamma=10.0, r1_interval=4), _Zero()
    seen = {}
    for step in range(1, 7):                                      # after_step's step is the count done: 0-based = step − 1
        w = act.discriminator.w.detach().clone()
        act._pending.append(halves(_batch(8, step))[1])
        act.after_step(student, step)
        seen[step - 1] = act._d_logs.get("r1")
        if step - 1 in (0, 4):
            assert seen[step - 1] == pytest.approx(10.0 / 2 * w.square().sum().item(), rel=1e-5)
    assert [k for k, v in seen.items() if v is not None] == [0, 4]


def test_adaptive_augmentation_follows_the_references_rule():
    """update_r1_ema_and_aug_p (train_cifar10.py:433-441): EMA 0.93 of R1; p ± B·interval/length; clamped."""
    ada = AdaptiveAugment(target=1.0, length=1000.0, r1_ema=0.0)
    ada.update(100.0, images_per_step=10, interval=5)            # EMA 7.0 > 1: up by 10·5/1000
    assert ada.r1_ema == pytest.approx(7.0) and ada.p == pytest.approx(0.05)
    ada.update(0.0, 10, 5)                                       # EMA 6.51 still > 1: up again
    assert ada.p == pytest.approx(0.1)
    low = AdaptiveAugment(p=0.02, target=1.0, length=1000.0, r1_ema=0.0)
    low.update(0.0, 10, 5)
    assert low.p == 0.0                                          # clamped at 0
    act, student = _act(_Linear(), r1_interval=1, augment=AdaptiveAugment(target=-1.0, length=64.0)), _Zero()
    act._pending.append(halves(_batch(16))[1])
    act.after_step(student, 1)                                   # R1 > −1: p rises by 16 loaded images · 1 / 64
    assert act.augment.p == pytest.approx(0.25)


def test_gan_weight_of_sigma_is_the_references_edm_weight():
    """loss_func_g with consistency_loss_weight='edm' (train_cifar10.py:137-142) takes
    get_scalings_for_boundary_condition's loss_weight (models/consistency_wrapper.py:58)."""
    act = _act(weighting="edm")
    sigma, sd = torch.tensor([0.002, 0.5, 1.0, 80.0]), 0.5
    assert torch.allclose(act.weight(sigma), (sigma**2 + sd**2) / (sigma * sd) ** 2)
    assert torch.equal(_act().weight(sigma), torch.ones(4))


def test_the_discriminator_learns_to_tell_real_from_fake():
    """On a toy (reals: bright left half; the student's fakes: bright right half) D's own steps separate them."""
    torch.manual_seed(0)

    class Right(torch.nn.Module):
        def forward(self, x, sigma, **cond):
            out = -torch.ones_like(x)
            out[..., 4:] = 1
            return out

    act = _act(Discriminator(8, 1, 3, width=8), d_lr=2e-3, r1_gamma=0.0)
    reals = -torch.ones(64, 1, 8, 8)
    reals[..., :4] = 1
    for step in range(1, 41):
        act._pending.append({"images": reals[:16], "labels": torch.randint(0, 3, (16,))})
        act.after_step(Right(), step)
    labels, sigma = torch.randint(0, 3, (16,)), torch.full((16,), 0.5)
    with torch.no_grad():
        d_real = act.discriminator(reals[:16], sigma, class_labels=labels)
        d_fake = act.discriminator(Right()(reals[:16], sigma), sigma, class_labels=labels)
    assert d_real.min() > 0.5 and d_fake.max() < -0.5, (d_real, d_fake)


def test_act_trains_with_radam_and_the_feature_distance_by_default(tmp_path):
    """The CLI's ACT is the reference's: RAdam β = (0, 0.99) and a perceptual distance (the feature network's)."""
    from fewstep.cli import main
    from fewstep.models.folders import load_model

    argv = ["train", "--method", "act", "--dataset", "digits", "--width", "8", "--steps", "2", "--batch", "8",
            "--distance", "l2", "--out", str(tmp_path / "m"), "--work-dir", str(tmp_path / "w"), "--no-progress"]
    assert main(argv) == 0
    config = load_model(tmp_path / "m").config.training["config"]
    assert config["optimizer"] == "radam" and list(config["adam_betas"]) == [0.0, 0.99]
    from fewstep.methods.consistency import ConsistencySettings, resolved_distance
    assert resolved_distance(ConsistencySettings(method="act")) == "features"
    assert resolved_distance(ConsistencySettings(method="act", distance="l2")) == "l2"


def test_act_without_a_feature_network_says_what_to_do(tmp_path, capsys):
    """The digits ship no feature network: ACT's default distance is refused in one line naming the ways out."""
    from fewstep.cli import main

    code = main(["train", "--method", "act", "--dataset", "digits", "--steps", "1", "--batch", "8",
                 "--out", str(tmp_path / "m"), "--work-dir", str(tmp_path / "w"), "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0 and "train-classifier --instance" in err and "--distance" in err and "Traceback" not in err
    assert not (tmp_path / "m").exists()
