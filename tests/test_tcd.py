"""TCD (Zheng et al. 2024): strategic stochastic sampling against diffusers' TCDScheduler as an oracle, TCD's loss,
``fewstep distill --method tcd|tcd-lora`` end to end, and a TCD LoRA in diffusers' own pipeline giving fewstep's
images (issue 27, item 3)."""

from __future__ import annotations

import pytest
import torch
from diffusers import TCDScheduler
from helpers import run_cli
from test_parity import SD, TOL, RandomNet, vp_to_sigma_space

from fewstep.core.denoisers import VPDenoiser
from fewstep.core.schedules import VPSchedule, append_zero, lcm_timesteps
from fewstep.core.solvers import sample_tcd, tcd_timestep_s

PROMPTS = ["red apple", "flag: Japan"]


@pytest.fixture
def x_T():
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_tcd_grid_is_tcd_schedulers(steps):
    ref = TCDScheduler(**SD, original_inference_steps=50)
    ref.set_timesteps(steps)
    assert lcm_timesteps(steps, 50, 1000).tolist() == ref.timesteps.tolist()


@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_tcd_sampler_matches_tcd_scheduler(x_T, steps, gamma):
    """sample_tcd = diffusers' TCDScheduler loop with eta = γ, step noise from the same generator: the same latent
    TCDScheduler hands the VAE (its last step's √ᾱ_0·x_s included)."""
    net, ours = RandomNet(), VPSchedule(**SD)
    ref = TCDScheduler(**SD, original_inference_steps=50)
    ref.set_timesteps(steps)
    x, g = x_T.clone(), torch.Generator().manual_seed(7)
    for t in ref.timesteps:
        x = ref.step(net(x, t), t, x, eta=gamma, generator=g, return_dict=False)[0]
    sigmas = append_zero(ours.sigmas[ref.timesteps])
    out = sample_tcd(VPDenoiser(net, ours, "epsilon"), vp_to_sigma_space(x_T, ours.alphas_cumprod[ref.timesteps[0]]),
                     sigmas, generator=torch.Generator().manual_seed(7), gamma=gamma, schedule=ours)
    torch.testing.assert_close(out, x, **TOL)


def test_tcd_timestep_s_is_tcd_schedulers_floor():
    """s = ⌊(1 − γ)·t_prev⌋ exactly as TCDScheduler computes it (a float32 product), at every timestep."""
    t = torch.arange(1000)
    for gamma in (0.0, 0.1, 0.3, 0.5, 0.7, 1.0):
        assert torch.equal(tcd_timestep_s(t, gamma), torch.floor((1 - gamma) * t).long())
    with pytest.raises(ValueError):
        tcd_timestep_s(t, 1.5)
