"""sCD / sCT (Lu & Song 2025): the TrigFlow conversion, the tangent (zero at an exact consistency function), the
JVP (exact = finite difference), the loss against FastGen's formula, sampling against diffusers' SCMScheduler, and
both methods end to end through the CLI."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from diffusers import SCMScheduler

from fewstep.cli import main
from fewstep.core.denoisers import append_dims
from fewstep.core.parameterizations import continuous_of, parameterization, schedule_fields
from fewstep.core.tangents import _group_norm, jvp
from fewstep.core.trigflow import TrigFlowDenoiser, TrigFlowSchedule, trigflow_F
from fewstep.models.folders import load_model, shipped_models_dir
from fewstep.nets.unets import build_unet
from fewstep.objectives.continuous import ContinuousConsistencyLoss, tangent
from fewstep.sampling.generate import generate

SD = 0.5
MU, S = 0.3, 0.4        # data x_0 ~ N(MU, S²) per element: its denoiser and consistency function are closed-form


def exact_denoiser(x, sigma, **cond):
    """D(x, σ) = E[x_0 | x_σ] of the Gaussian data."""
    s2 = append_dims(S**2 / (S**2 + sigma.double() ** 2), x.ndim).to(x.dtype)
    return MU + s2 * (x - MU)


def exact_consistency(x, sigma, **cond):
    """f(x, σ): the PF-ODE dx/dσ = (x − D)/σ keeps (x − μ)/√(s² + σ²) constant, so f maps x to μ + (x − μ)·s/√(s²+σ²)."""
    return MU + append_dims((S / (S**2 + sigma.double() ** 2).sqrt()).to(x.dtype), x.ndim) * (x - MU)


def _tangent_of(f, x_t, t, dx_dt, const=1.0):
    scale = torch.cos(t) * torch.sin(t)
    F_minus, dF = jvp(lambda x, s: trigflow_F(f, x, s, SD), (x_t, t), (append_dims(scale, x_t.ndim) * dx_dt, scale),
                      "exact")
    return tangent(F_minus, dF, x_t, dx_dt, t, SD, 1.0, const)


def test_the_tangent_vanishes_at_the_exact_consistency_function_and_not_elsewhere():
    """g = cos(t)·df/dt along the teacher's ODE: zero for the true f (the continuous consistency condition)."""
    g = torch.Generator().manual_seed(0)
    x0 = MU + S * torch.randn(8, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.linspace(0.05, 1.5, 8, dtype=torch.float64)
    z = torch.randn(x0.shape, generator=g, dtype=torch.float64) * SD
    x_t = append_dims(torch.cos(t), 4) * x0 + append_dims(torch.sin(t), 4) * z
    dx_dt = SD * trigflow_F(exact_denoiser, x_t, t, SD)        # sCD: the teacher's velocity
    assert _tangent_of(exact_consistency, x_t, t, dx_dt).abs().max() < 1e-6
    assert _tangent_of(exact_denoiser, x_t, t, dx_dt).abs().amax(dim=(1, 2, 3)).min() > 1e-2   # D is not f
    # sCT's velocity cos(t)·z − sin(t)·x0 is d/dt of the forward process, and its mean over x0 given x_t is the
    # teacher's: the conditional tangent of the exact f is zero on average, not per sample
    dx_ct = append_dims(torch.cos(t), 4) * z - append_dims(torch.sin(t), 4) * x0
    assert _tangent_of(exact_consistency, x_t, t, dx_ct).abs().max() > 1e-2


def test_trigflow_F_of_an_edm_denoiser_is_its_backbone_negated_and_of_a_trigflow_one_its_own():
    net = build_unet(8, 3, 0, width=8, dropout=0.0).eval()
    x_t, t = torch.randn(4, 3, 8, 8) * SD, torch.tensor([0.1, 0.5, 1.0, 1.5])
    sigma = SD * torch.tan(t)
    edm = parameterization("trigflow-edm").build(net, TrigFlowSchedule(), None)
    with torch.no_grad():
        raw = net(x_t / SD, (sigma.log() / 4)).sample    # EDM: c_in·x_σ = x_t/σ_d, c_noise = ¼ ln σ
        torch.testing.assert_close(trigflow_F(edm, x_t, t, SD), -raw, atol=2e-4, rtol=1e-4)
        trig = TrigFlowDenoiser(net, TrigFlowSchedule())
        torch.testing.assert_close(trigflow_F(trig, x_t, t, SD), net(x_t / SD, t).sample, atol=2e-4, rtol=1e-4)
    assert continuous_of("edm").name == "trigflow-edm" and continuous_of("trigflow").name == "trigflow"
    assert continuous_of("flow").name == "flow"


def test_the_exact_jvp_of_a_unet_with_attention_and_group_norm_is_the_finite_difference():
    torch.manual_seed(0)
    net = build_unet(8, 3, 0, width=8, dropout=0.0).eval()
    den = parameterization("trigflow-edm").build(net, TrigFlowSchedule(), None)
    x = torch.randn(2, 3, 8, 8) * SD
    t = torch.tensor([0.4, 1.1])
    v = torch.randn_like(x)

    def f(a, s):
        return trigflow_F(den, a, s, SD)

    value, exact = jvp(f, (x, t), (v, torch.ones_like(t)), "exact")
    den.double()
    _, fd = jvp(f, (x.double(), t.double()), (v.double(), torch.ones_like(t).double()), "finite-difference", eps=1e-5)
    torch.testing.assert_close(exact.double(), fd, atol=1e-3 * fd.abs().max().item(), rtol=1e-3)
    assert torch.isfinite(value).all()
    gn = torch.nn.GroupNorm(2, 4)
    torch.nn.init.normal_(gn.weight)
    y = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(_group_norm(y, 2, gn.weight, gn.bias, gn.eps), gn(y), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown JVP method"):
        jvp(f, (x, t), (v, t), "symbolic")


def test_the_loss_is_fastgens_formula():
    """ContinuousConsistencyLoss on one batch = an independent transcription of FastGen's _scm_pred_to_loss (with
    the RMS tangent norm, prior weighting 1/σ, w_φ = 0 at start)."""
    torch.manual_seed(0)
    net = build_unet(8, 3, 0, width=8, dropout=0.0)
    student = parameterization("trigflow-edm").build(net, TrigFlowSchedule(), None)
    teacher = parameterization("trigflow-edm").build(build_unet(8, 3, 0, width=8, dropout=0.0).eval(),
                                                     TrigFlowSchedule(), None)
    loss_fn = ContinuousConsistencyLoss(TrigFlowSchedule(), 100, lambda cond: (teacher, {}), tangent_warmup=4)
    loss_fn.step = 1                                                   # r = 1/4
    x0 = torch.rand(3, 3, 8, 8) * 2 - 1
    torch.manual_seed(5)
    loss, logs = loss_fn(student, {"images": x0})
    torch.manual_seed(5)                                               # the same t and z, transcribed
    sigma = (torch.randn(3) * 1.4 - 1.0).exp().clamp(0.002, 80.0)
    t = torch.atan(sigma.double() / SD).float()
    z = torch.randn_like(x0) * SD
    c, s = torch.cos(t)[:, None, None, None], torch.sin(t)[:, None, None, None]
    x_t = c * x0 + s * z
    with torch.no_grad():
        dxt_dt = SD * trigflow_F(teacher, x_t, t, SD)
    _, F_jvp = jvp(lambda a, b: trigflow_F(student, a, b, SD), (x_t, t), (c * s * dxt_dt, torch.cos(t) * torch.sin(t)))
    F_theta = trigflow_F(student, x_t, t, SD).detach()
    g = -c * c * (SD * F_theta - dxt_dt) + 0.25 * -(c * s * x_t + SD * F_jvp)
    g = g / (g.flatten(1).norm(dim=1)[:, None, None, None] * math.sqrt(1 / g[0].numel()) + 0.1)
    expected = ((1 / sigma) * (F_theta - F_theta - g).square().mean(dim=(1, 2, 3))).mean()
    torch.testing.assert_close(loss, expected, atol=1e-4, rtol=1e-4)
    assert logs["tangent_warmup"] == 0.25
    loss.backward()
    assert net.conv_in.weight.grad is not None and loss_fn.weighting.linear.bias.grad is not None


def test_two_step_sampling_is_diffusers_scm_scheduler():
    """fewstep's 2-step sampling of an sCM student = a diffusers SCMScheduler loop on the same noise, with the
    student as SCMScheduler's model (model_output = σ_d·F, sample = x_t)."""
    student = load_model(shipped_models_dir() / "digits-teacher")   # an EDM backbone as a trigflow-edm student
    schedule = TrigFlowSchedule(**{k: v for k, v in student.config.schedule.items() if k in ("sigma_min", "sigma_max",
                                                                                             "rho", "sigma_data")})
    student = student.derive(config=replace(student.config, kind="consistency", parameterization="trigflow-edm",
                                            schedule=schedule_fields(schedule), default_sampler="consistency",
                                            default_steps=1, default_guidance_scale=1.0))
    labels = torch.tensor([3, 7])
    ours = generate(student, labels, steps=2, seed=4)

    scheduler = SCMScheduler(sigma_data=SD)
    scheduler.set_timesteps(2, max_timesteps=math.atan(schedule.sigma_max / SD), intermediate_timesteps=1.3)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 1, 16, 16, generator=g) * schedule.sigma_max    # fewstep's start: z·σ_max in σ space
    t0 = scheduler.timesteps[0]
    x_t = x * torch.cos(t0)
    cond = student.conditioner(labels, "cpu")
    with torch.no_grad():
        for t in scheduler.timesteps[:-1]:
            F = trigflow_F(student.denoiser, x_t, t.expand(2), SD, **cond)
            x_t = scheduler.step(SD * F, t, x_t, generator=g).prev_sample
    # the last step's prev_sample is x̂_0 (SCMScheduler stops at t = 0); fewstep's images are clamped to [−1, 1]
    torch.testing.assert_close(ours, x_t.clamp(-1, 1), atol=2e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def scm_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("scm")
    teacher = str(shipped_models_dir() / "digits-teacher")
    for method in ("scd", "sct"):
        assert main(["distill", "--method", method, "--teacher", teacher, "--out", str(root / method),
                     "--work-dir", str(root / f"runs-{method}"), "--batch", "4", "--steps", "2",
                     "--checkpoint-every", "1", "--no-progress"]) == 0
    return root


def test_scd_and_sct_run_end_to_end_and_sample_in_one_and_two_steps(scm_models):
    for method in ("scd", "sct"):
        model = load_model(scm_models / method)
        cfg = model.config
        assert (cfg.kind, cfg.parameterization, cfg.default_sampler) == ("consistency", "trigflow-edm", "consistency")
        assert cfg.training["method"] == method
        x = torch.randn(2, 1, 16, 16)
        at_boundary = model.denoiser(x, torch.full((2,), 1e-6), class_labels=torch.arange(2))   # f(x, t → 0) → x
        torch.testing.assert_close(at_boundary, x, atol=1e-4, rtol=0)
        one = generate(model, torch.tensor([0, 5]), steps=1, seed=1)
        two = generate(model, torch.tensor([0, 5]), steps=2, seed=1)
        assert one.shape == two.shape == (2, 1, 16, 16) and not torch.equal(one, two)
    scd = load_model(scm_models / "scd").config.training["config"]["extra"]
    assert (scd["p_std"], scd["tangent_warmup"], scd["guidance_scale"]) == (1.4, 1, 2.0)


def test_a_resumed_scd_run_equals_an_uninterrupted_one(scm_models, tmp_path):
    """The weighting network and its optimizer are in the checkpoint: 2 steps at once = 1 step, then resume."""
    teacher = str(shipped_models_dir() / "digits-teacher")
    args = ["distill", "--method", "scd", "--teacher", teacher, "--batch", "4", "--checkpoint-every", "1",
            "--no-progress", "--work-dir", str(tmp_path / "runs")]
    assert main([*args, "--steps", "1", "--out", str(tmp_path / "half")]) == 0
    assert main([*args, "--steps", "2", "--out", str(tmp_path / "resumed")]) == 0
    a, b = load_model(scm_models / "scd").net.state_dict(), load_model(tmp_path / "resumed").net.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_scd_refuses_a_latent_teacher_in_one_line(tiny_sd, capsys):
    assert main(["distill", "--method", "scd", "--teacher", str(tiny_sd), "--out", "x", "--steps", "1"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "latent pipeline" in err[0]
