"""fewstep's step math against diffusers' schedulers as an oracle, on random inputs.

A fixed random "network" (a smooth nonlinear function of x_t and t) stands in for a UNet: the
schedulers and fewstep's σ-space samplers must produce the same trajectory to ≤ 1e-5.
"""

from functools import partial

import pytest
import torch
from diffusers import (
    CMStochasticIterativeScheduler,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    LCMScheduler,
)

from fewstep.core.denoisers import (
    EDMDenoiser,
    LCMConsistency,
    VPDenoiser,
    cm_scalings,
    edm_scalings,
    lcm_scalings,
)
from fewstep.core.schedules import (
    VPSchedule,
    append_zero,
    karras_sigmas,
    lcm_timesteps,
    spaced_timesteps,
)
from fewstep.core.solvers import (
    sample_consistency,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
)

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
# diffusers keeps ᾱ in float32, fewstep in float64: trajectories agree to 1e-5 relative (|x| reaches ~15).
TOL = dict(rtol=1e-5, atol=1e-5)


class RandomNet(torch.nn.Module):
    """out = tanh(W·x + b·t/1000) per pixel-vector: smooth, nonlinear, timestep-dependent."""

    def __init__(self, channels: int = 4, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(channels, channels, generator=g, dtype=torch.float64) / channels**0.5
        self.b = torch.randn(channels, generator=g, dtype=torch.float64)

    def forward(self, x, t, **_):
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1, 1, 1).expand(x.shape[0], 1, 1, 1)
        y = torch.einsum("oc,bchw->bohw", self.w, x.double()) + self.b.view(1, -1, 1, 1) * t / 1000
        return torch.tanh(y).to(x.dtype)


def vp_to_sigma_space(x_t, alpha_bar):
    return x_t / alpha_bar.sqrt()


def compare_deterministic(x_T, ref, sampler, prediction_type):
    """Run diffusers' scheduler loop and fewstep's sampler on the same grid; they must agree."""
    net, ours = RandomNet(), VPSchedule(**SD)
    x = x_T.clone()
    for t in ref.timesteps:
        x = ref.step(net(x, t), t, x).prev_sample
    sigmas = append_zero(ours.sigmas[ref.timesteps])
    out = sampler(VPDenoiser(net, ours, prediction_type),
                  vp_to_sigma_space(x_T, ours.alphas_cumprod[ref.timesteps[0]]), sigmas)
    torch.testing.assert_close(out, x, **TOL)


@pytest.fixture
def x_T():
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_beta_schedules_match_diffusers(kind):
    ours = VPSchedule(kind, 1000, *(0.00085, 0.012) if kind == "scaled_linear" else (1e-4, 0.02))
    ref = DDPMScheduler(beta_schedule=kind, beta_start=ours.beta_start, beta_end=ours.beta_end).alphas_cumprod
    torch.testing.assert_close(ours.alphas_cumprod.float(), ref, rtol=1e-5, atol=1e-7)


def test_sigma_timestep_conversions_roundtrip():
    s = VPSchedule(**{k: v for k, v in SD.items()})
    t = torch.tensor([0.0, 1.0, 17.25, 500.5, 998.9, 999.0], dtype=torch.float64)
    torch.testing.assert_close(s.sigma_to_t(s.t_to_sigma(t)), t, rtol=0, atol=1e-9)
    grid = torch.arange(1000)
    torch.testing.assert_close(s.sigma_to_t(s.sigmas[grid]), grid.double(), rtol=0, atol=1e-9)
    # σ is monotone in t, and ᾱ = 1/(1+σ²) inverts σ = √((1−ᾱ)/ᾱ)
    assert (s.sigmas.diff() > 0).all()
    torch.testing.assert_close(1 / (1 + s.sigmas**2), s.alphas_cumprod)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timestep_spacing_matches_diffusers(spacing):
    for n in (1, 4, 25, 50):
        ref = DDIMScheduler(**SD, timestep_spacing=spacing)
        ref.set_timesteps(n)
        assert spaced_timesteps(n, 1000, spacing).tolist() == ref.timesteps.tolist()


def test_karras_grid_matches_diffusers():
    ref = CMStochasticIterativeScheduler(num_train_timesteps=40, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    ref.set_timesteps(40)
    torch.testing.assert_close(karras_sigmas(40, 0.002, 80.0, 7.0).float(), ref.sigmas[:-1], rtol=1e-5, atol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("steps", [1, 4, 10])
def test_ddim_matches_diffusers(x_T, prediction_type, steps):
    ref = DDIMScheduler(**SD, prediction_type=prediction_type, set_alpha_to_one=True, clip_sample=False,
                        timestep_spacing="trailing")
    ref.set_timesteps(steps)
    compare_deterministic(x_T, ref, sample_ddim, prediction_type)


def test_stochastic_ddpm_matches_ddim_eta_1(x_T):
    """fewstep's ancestral (DDPM) sampler = DDIMScheduler with η = 1, given the same noise draws."""
    net, ours = RandomNet(), VPSchedule(**SD)
    ref = DDIMScheduler(**SD, set_alpha_to_one=True, clip_sample=False, timestep_spacing="trailing")
    ref.set_timesteps(5)  # DDIMScheduler steps to t − T//n, which is the next grid point when n divides T
    x, g = x_T.clone(), torch.Generator().manual_seed(5)
    for t in ref.timesteps:
        z = torch.randn(x.shape, generator=g, dtype=x.dtype)
        x = ref.step(net(x, t), t, x, eta=1.0, variance_noise=z).prev_sample
    sigmas = append_zero(ours.sigmas[ref.timesteps])
    out = sample_ddpm(VPDenoiser(net, ours), vp_to_sigma_space(x_T, ours.alphas_cumprod[ref.timesteps[0]]), sigmas,
                      generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(out, x, **TOL)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [1, 2, 5, 20])
def test_dpmpp_2m_matches_diffusers(x_T, prediction_type, steps):
    ref = DPMSolverMultistepScheduler(**SD, prediction_type=prediction_type, algorithm_type="dpmsolver++",
                                      solver_order=2, solver_type="midpoint", lower_order_final=True,
                                      final_sigmas_type="zero")
    ref.set_timesteps(steps)
    compare_deterministic(x_T, ref, sample_dpmpp_2m, prediction_type)


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_lcm_multistep_matches_lcm_scheduler(x_T, steps):
    """LCM's boundary scalings + multistep consistency sampling = diffusers' LCMScheduler loop."""
    net, ours = RandomNet(), VPSchedule(**SD)
    ref = LCMScheduler(**SD, timestep_scaling=10.0, original_inference_steps=50, set_alpha_to_one=True)
    ref.set_timesteps(steps)
    assert lcm_timesteps(steps, 50, 1000).tolist() == ref.timesteps.tolist()
    x, g = x_T.clone(), torch.Generator().manual_seed(7)
    for t in ref.timesteps:
        x, denoised = ref.step(net(x, t), t, x, generator=g, return_dict=False)
    sigmas = append_zero(ours.sigmas[ref.timesteps])
    f = LCMConsistency(VPDenoiser(net, ours, "epsilon"), timestep_scaling=10.0)
    out = sample_consistency(f, vp_to_sigma_space(x_T, ours.alphas_cumprod[ref.timesteps[0]]), sigmas,
                             generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out, denoised, **TOL)


def test_lcm_scalings_match_diffusers():
    ref = LCMScheduler(**SD, timestep_scaling=10.0)
    for t in (0, 1, 19, 259, 999):
        c_skip, c_out = ref.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
        ours = lcm_scalings(torch.tensor(float(t)), 10.0)
        torch.testing.assert_close(ours[0], c_skip.float(), rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(ours[1], c_out.float(), rtol=1e-6, atol=1e-12)


def test_cm_scalings_match_diffusers_and_boundary_condition_is_exact():
    ref = CMStochasticIterativeScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5)
    sigma = torch.tensor([0.002, 0.01, 0.5, 2.0, 80.0], dtype=torch.float64)
    c_skip, c_out = ref.get_scalings_for_boundary_condition(sigma)
    ours = cm_scalings(sigma, 0.5, 0.002)
    torch.testing.assert_close(ours[0], c_skip)
    torch.testing.assert_close(ours[1], c_out)
    # f(x, σmin) = x exactly, whatever the network outputs
    f = EDMDenoiser(lambda x, c, **_: torch.randn_like(x) * 1e3, scalings=partial(cm_scalings, sigma_min=0.002))
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    assert torch.equal(f(x, torch.full((3,), 0.002, dtype=torch.float64)), x)
    # the EDM preconditioning is the σmin = 0 case
    for a, b in zip(edm_scalings(sigma), cm_scalings(sigma, 0.5, 0.0)):
        torch.testing.assert_close(a, b)


def test_cm_multistep_matches_cm_scheduler(x_T):
    """Song et al.'s multistep sampler (x + √(σ'² − σmin²)·z) = CMStochasticIterativeScheduler."""
    class CMNet(torch.nn.Module):  # diffusers' CM pipeline feeds t = 1000·¼·ln σ; EDMDenoiser feeds ¼·ln σ
        def __init__(self):
            super().__init__()
            self.inner = RandomNet()

        def forward(self, x, c_noise, **_):
            return self.inner(x, 1000 * c_noise)

    net = CMNet()
    ref = CMStochasticIterativeScheduler(num_train_timesteps=40, sigma_min=0.002, sigma_max=80.0)
    ref.set_timesteps(timesteps=[39, 22, 10])
    x, g = x_T.clone() * ref.sigmas[0].double(), torch.Generator().manual_seed(3)
    for t in ref.timesteps:
        x = ref.step(net(ref.scale_model_input(x, t), t / 1000), t, x, generator=g).prev_sample
    f = EDMDenoiser(net, 0.5, scalings=partial(cm_scalings, sigma_min=0.002))
    out = sample_consistency(f, x_T.clone() * ref.sigmas[0].double(), ref.sigmas.double(),
                             generator=torch.Generator().manual_seed(3), sigma_end=0.002)
    torch.testing.assert_close(out, x, **TOL)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_vp_adapter_on_real_unets_matches_diffusers_loop(prediction_type):
    """VPDenoiser around real diffusers UNets (text-conditional and class-conditional) reproduces the
    scheduler loop that calls the UNet directly, as a diffusers pipeline does."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    torch.manual_seed(0)
    cond_unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                     block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=12,
                                     attention_head_dim=4,
                                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()
    class_unet = UNet2DModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                             block_out_channels=(8, 16), norm_num_groups=4, num_class_embeds=3,
                             down_block_types=("DownBlock2D", "DownBlock2D"),
                             up_block_types=("UpBlock2D", "UpBlock2D")).eval()
    ours = VPSchedule(**SD)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    for unet, cond in ((cond_unet, {"encoder_hidden_states": torch.randn(2, 5, 12)}),
                       (class_unet, {"class_labels": torch.tensor([0, 2])})):
        ref = DDIMScheduler(**SD, prediction_type=prediction_type, set_alpha_to_one=True, clip_sample=False,
                            timestep_spacing="trailing")
        ref.set_timesteps(4)
        x = x_T.clone()
        with torch.no_grad():
            for t in ref.timesteps:
                x = ref.step(unet(x, t, **cond).sample, t, x).prev_sample
        out = sample_ddim(VPDenoiser(unet, ours, prediction_type),
                          x_T / ours.alphas_cumprod[ref.timesteps[0]].sqrt().float(),
                          append_zero(ours.sigmas[ref.timesteps]).float(), extra_args=cond)
        torch.testing.assert_close(out, x, rtol=1e-4, atol=1e-4)


def test_heun_is_euler_plus_the_scaled_change_of_the_x0_estimate():
    """The identity behind "Heun at 2–4 steps" (BENCHMARKS.md): Heun's step in σ space is Euler's plus
    (r − 1)/2 · (D(x_euler; σ') − D(x; σ)), r = σ/σ', so a few-step grid's large ratios amplify how much
    successive x0-estimates disagree."""
    from fewstep.core.solvers import ddim_step, heun_step

    g = torch.Generator().manual_seed(0)
    net = RandomNet(channels=2)

    def den(x, sigma, **_):
        return net(x, sigma * 10).to(x.dtype)

    x = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64) * 17.5
    sigma, sigma_next = torch.full((3,), 17.5, dtype=torch.float64), torch.full((3,), 2.5, dtype=torch.float64)
    d = den(x, sigma)
    euler = ddim_step(x, d, sigma, sigma_next)
    expected = euler + (17.5 / 2.5 - 1) / 2 * (den(euler, sigma_next) - d)
    torch.testing.assert_close(heun_step(den, x, d, sigma, sigma_next), expected)
