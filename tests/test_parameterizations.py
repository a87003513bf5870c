"""The parameterization registry: each noise space against its diffusers scheduler as the oracle, and the
σ-space conversions between them (DESIGN.md §2)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SCMScheduler

from fewstep.core.flow import FlowDenoiser, FlowSchedule, flow_sigma, flow_t
from fewstep.core.parameterizations import PARAMETERIZATIONS, SPACES, consistency_of, parameterization
from fewstep.core.schedules import EDMSchedule, VPSchedule
from fewstep.core.solvers import euler_step
from fewstep.core.trigflow import TrigFlowDenoiser, TrigFlowSchedule
from fewstep.objectives.base import weighted_mse


class Constant(torch.nn.Module):
    """A backbone that returns a fixed output and records the time it was given."""

    def __init__(self, out: torch.Tensor) -> None:
        super().__init__()
        self.out, self.seen = out, None

    def forward(self, x, t, **cond):
        self.seen = (x, t)
        return self.out


def test_every_space_is_registered_once_with_its_scheduler_and_consistency_form():
    assert set(SPACES) == {"edm", "vp", "flow", "trigflow"}
    assert set(PARAMETERIZATIONS) == {"edm", "cm", "vp", "lcm", "tcd", "flow", "trigflow", "trigflow-edm"}
    assert {n: consistency_of(n).name for n in SPACES} == {"edm": "cm", "vp": "lcm", "flow": "flow",
                                                            "trigflow": "trigflow"}
    assert SPACES["flow"].diffusers_scheduler == "FlowMatchEulerDiscreteScheduler"
    assert SPACES["trigflow"].consistency_scheduler == "SCMScheduler"
    with pytest.raises(ValueError, match="unknown parameterization 'rf'.*flow"):
        parameterization("rf")


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 4, 28])
def test_flow_grid_is_flow_match_euler_schedulers(shift, steps):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    schedule = FlowSchedule(shift=shift)
    t = flow_t(schedule.grid(steps).double())
    ref = scheduler.sigmas.double()
    assert len(t) == len(ref)
    assert ref[0] == 1 and abs(t[0] - 1) <= 1e-5                     # t = 1 is σ = ∞: the grid stops at t_max
    torch.testing.assert_close(t[1:], ref[1:], atol=1e-6, rtol=0)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_euler_step_in_sigma_space_is_flow_match_euler_step(shift):
    """x_{t'} = x_t + (t' − t)·v (FlowMatchEulerDiscreteScheduler.step) == the σ-space Euler step of
    FlowDenoiser's x̂_0, for every step of an 8-step grid, including the first (from t_max instead of 1)."""
    g = torch.Generator().manual_seed(0)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(8)
    schedule = FlowSchedule(shift=shift)
    sigmas = schedule.grid(8).double()
    x_t = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    for i, timestep in enumerate(scheduler.timesteps):
        v = torch.randn(x_t.shape, generator=g, dtype=torch.float64)
        net = Constant(v)
        sigma = sigmas[i].expand(2)
        x_sigma = x_t * (1 + sigmas[i])
        denoised = FlowDenoiser(net, schedule)(x_sigma, sigma)
        torch.testing.assert_close(net.seen[1].double(), timestep.double().expand(2), atol=1e-2, rtol=1e-5)  # t·1000
        torch.testing.assert_close(net.seen[0], x_t, atol=1e-9, rtol=1e-9)                     # the model sees x_t
        ours = euler_step(x_sigma, denoised, sigma, sigmas[i + 1].expand(2)) / (1 + sigmas[i + 1])
        ref = scheduler.step(v.float(), timestep, x_t.float()).prev_sample.double()
        torch.testing.assert_close(ours, ref, atol=1e-5 if i else 1e-4, rtol=0)
        x_t = ref


def test_flow_loss_is_the_velocity_loss():
    """‖D − x_0‖²/c_out² = ‖v̂ − (ε − x_0)‖²: the denoising loss of a flow model is rectified flow's."""
    g = torch.Generator().manual_seed(1)
    x0, eps, v = (torch.randn(4, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0.1, 0.4, 0.7, 0.95], dtype=torch.float64)
    sigma = flow_sigma(t)
    model = FlowDenoiser(Constant(v), FlowSchedule())
    denoised = model(x0 + sigma.view(-1, 1, 1, 1) * eps, sigma)
    torch.testing.assert_close(weighted_mse(model, denoised, x0, sigma).double(),
                               (v - (eps - x0)).square().mean(), rtol=1e-6, atol=0)


def test_flow_training_times_are_shifted_logit_normal():
    torch.manual_seed(0)
    t = flow_t(FlowSchedule(shift=3.0).sample_sigmas(20000).double())
    u = torch.logit(t.clamp(1e-6, 1 - 1e-6))                      # shift 3 moves the logit-normal's mean by ln 3
    assert abs(u.mean().item() - math.log(3)) < 0.05 and abs(u.std().item() - 1) < 0.05


def test_trigflow_denoiser_is_scm_schedulers_x0_and_renoise():
    """SCMScheduler.step: pred_x0 = cos(s)·x_t − sin(s)·σ_d·F, then x = cos(t)·x0 + sin(t)·σ_d·z — fewstep's
    TrigFlowDenoiser in σ space (x_σ = x_t/cos s) and the consistency re-noise x0 + σ'·z."""
    schedule = TrigFlowSchedule()
    sd = schedule.sigma_data
    scheduler = SCMScheduler(sigma_data=sd)
    scheduler.set_timesteps(2, max_timesteps=math.atan(80 / sd), intermediate_timesteps=1.3)
    g = torch.Generator().manual_seed(2)
    x_t = torch.randn(2, 3, 8, 8, generator=g) * sd
    F = torch.randn(x_t.shape, generator=g)
    s = scheduler.timesteps[0]
    sigma = schedule.t_to_sigma(s).float().expand(2)
    net = Constant(F)
    ours = TrigFlowDenoiser(net, schedule)(x_t / torch.cos(s), sigma)
    out = scheduler.step(sd * F, s, x_t, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours, out.pred_original_sample, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(net.seen[0], x_t / sd, atol=1e-5, rtol=1e-5)      # the network sees x_t/σ_d
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(3)) * sd
    t = scheduler.timesteps[1]
    sigma_next = schedule.t_to_sigma(t).float()
    renoised = (out.pred_original_sample + sigma_next * z / sd) * torch.cos(t)                # σ-space x0 + σ'·z, back to x_t
    torch.testing.assert_close(renoised, out.prev_sample, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(schedule.grid(2)[1], sigma_next, atol=1e-4, rtol=1e-5)   # its 2-step grid


def test_trigflow_scalings_are_edm_preconditioning_with_f_flipped():
    from fewstep.core.denoisers import edm_scalings

    sigma = torch.tensor([0.01, 0.5, 3.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in = TrigFlowDenoiser(torch.nn.Identity(), TrigFlowSchedule()).scalings(sigma)
    e_skip, e_out, e_in = edm_scalings(sigma)
    for ours, edm in ((c_skip, e_skip), (-c_out, e_out), (c_in, e_in)):
        torch.testing.assert_close(ours, edm, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("schedule", [EDMSchedule(), VPSchedule("scaled_linear", beta_start=0.00085, beta_end=0.012),
                                      FlowSchedule(shift=3.0), TrigFlowSchedule()], ids=lambda s: type(s).__name__)
def test_model_time_and_sigma_convert_both_ways(schedule):
    sigma = torch.tensor([0.05, 0.3, 1.0, 4.0, 10.0], dtype=torch.float64)
    torch.testing.assert_close(schedule.t_to_sigma(schedule.sigma_to_t(sigma)).double(), sigma, rtol=1e-4, atol=0)
    levels = schedule.consistency_levels(torch.arange(6), 6)
    assert (levels.diff() > 0).all()                                  # increasing, σmin … σmax
    grid = schedule.sampling_grid(4)
    assert grid[-1] == 0 and (grid.diff() < 0).all() and len(grid) == 5
