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
from fewstep.models.folders import load_model
from fewstep.sampling.generate import generate

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


# --- the loss ----------------------------------------------------------------------------------------------------
def test_trajectory_ends_lie_on_the_skipped_grid_between_0_and_t_n():
    from fewstep.objectives.trajectory import trajectory_ends

    schedule, k = VPSchedule(**SD), 20
    t_hi = torch.tensor([19, 39, 499, 999] * 500)
    s = schedule.sigma_to_t(trajectory_ends(schedule, schedule.sigmas[t_hi].float(), k).double()).round().long()
    assert ((s == 0) | ((s + 1) % k == 0)).all() and (s <= (t_hi - k).clamp(min=0)).all()
    assert (s[t_hi == 19] == 0).all() and set(s[t_hi == 999].tolist()) == {0, *range(19, 980, 20)}   # all of [0, t_n]


def test_tcd_loss_maps_both_branches_to_s_with_ddim_and_vanishes_for_an_exact_teacher():
    """TCD's loss is d(√ᾱ_s·f(x_{t+k}, t+k, s), √ᾱ_s·f⁻(x̂_t, t, s)) with f the DDIM step of the network's ε: for an
    ε-network whose PF-ODE the teacher's DDIM step follows exactly (ε constant in x and t: DDIM is exact), the
    online and target points coincide for every s, and they do not once the target's network differs."""
    from fewstep.objectives.curricula import Curriculum
    from fewstep.objectives.distances import get_distance
    from fewstep.objectives.trajectory import TrajectoryConsistencyLoss

    schedule = VPSchedule(**SD)
    eps = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))

    class Constant(torch.nn.Module):       # ε(x, t) = e, the ODE of a point mass seen through a fixed ε
        def __init__(self, shift=0.0):
            super().__init__()
            self.shift = torch.nn.Parameter(torch.tensor(shift))

        def forward(self, x, t, **_):
            return (eps + self.shift).expand_as(x)

    student = VPDenoiser(Constant(), schedule)
    teacher = VPDenoiser(Constant(), schedule)
    objective = TrajectoryConsistencyLoss(schedule, Curriculum.for_method("lcd", 10, skip=20, target_ema=0.0),
                                          get_distance("l2"), teacher=lambda cond: (teacher, cond), solver="ddim")
    batch = {"images": torch.randn(64, 4, 8, 8)}
    pair = objective.pair(student, batch)
    torch.testing.assert_close(pair.online, pair.target, rtol=1e-4, atol=1e-4)
    objective.target.net = VPDenoiser(Constant(0.5), schedule)     # a target network that differs
    assert objective.pair(student, batch).loss(get_distance("l2")) > 1e-3


# --- the methods through the CLI, and their folders in diffusers -------------------------------------------------
@pytest.fixture(scope="module")
def tiny_tcd_lora(tiny_sd, tmp_path_factory):
    """``fewstep distill --method tcd-lora`` on a tiny random pipeline, 3 steps (read-only)."""
    from helpers import caption_folder

    from fewstep.cli import main

    root = tmp_path_factory.mktemp("tcd-lora")
    folder, _ = caption_folder(root / "pics", n=8)
    assert main(["distill", "--method", "tcd-lora", "--teacher", str(tiny_sd), "--dataset", str(folder), "--out",
                 str(root / "tiny-tcd-lora"), "--steps", "3", "--batch", "4", "--lr", "1e-2", "--lora-rank", "2",
                 "--min-guidance-scale", "2", "--max-guidance-scale", "2", "--no-progress",
                 "--work-dir", str(root / "work")]) in (0, None)
    return root / "tiny-tcd-lora"


def test_cli_tcd_lora_writes_a_diffusers_lora_of_kind_tcd_lora(tiny_tcd_lora):
    from safetensors.torch import load_file

    from fewstep.models.loras import LORA_FILE, lora_info, metadata_info

    info = lora_info(tiny_tcd_lora)
    assert info["kind"] == "tcd-lora" and info["original_inference_steps"] == 50 and info["rank"] == 2
    assert metadata_info(tiny_tcd_lora / LORA_FILE)["kind"] == "tcd-lora"       # a bare copy of the file says it too
    assert any(v.abs().max() > 0 for k, v in load_file(tiny_tcd_lora / LORA_FILE).items() if "lora_B" in k)  # trained
    assert "TCDScheduler" in (tiny_tcd_lora / "README.md").read_text()


@pytest.mark.parametrize("steps, gamma", [(1, 0.3), (2, 0.0), (4, 0.3), (4, 1.0)])
def test_tcd_lora_gives_diffusers_images_with_tcd_scheduler(tiny_sd, tiny_tcd_lora, steps, gamma):
    """The acceptance test: fewstep (LoRA fused, TCD's sampler by the LoRA's kind) and diffusers
    (StableDiffusionPipeline + load_lora_weights + TCDScheduler, eta = γ) give the same images for the same seed."""
    from diffusers import StableDiffusionPipeline

    from fewstep.models.loras import apply_loras
    from fewstep.sampling.generate import generate_latent

    model = apply_loras(load_model(tiny_sd), [(tiny_tcd_lora, 1.0)])
    assert model.config.default_sampler == "tcd" and model.config.parameterization == "tcd"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(tiny_tcd_lora))
    ours = generate(model, PROMPTS, steps=steps, guidance_scale=1.0, seed=3, eta=gamma)
    theirs = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=1.0, eta=gamma, height=32, width=32,
                  output_type="pt", generator=torch.Generator().manual_seed(3)).images * 2 - 1
    assert (ours - theirs.clamp(-1, 1)).abs().max() <= 2 / 255 * 2, (ours - theirs).abs().max()   # 2/255 in [0, 1]
    if gamma == 0.3:     # the default γ
        torch.testing.assert_close(generate_latent(model, PROMPTS, steps=steps, guidance_scale=1.0, seed=3), ours)


def test_cli_sample_with_a_tcd_lora_uses_tcds_sampler(tiny_sd, tiny_tcd_lora, tmp_path, capsys):
    """``fewstep sample --model BASE --lora TCD-LORA --steps 4`` runs TCD's γ sampler (its kind decides), and
    records γ; --eta changes the images, a bad --gamma is one clear line."""
    import json

    import numpy as np
    from PIL import Image
    from test_cli import assert_one_line_error

    def sample(out, *extra):
        return run_cli(capsys, "sample", "--model", str(tiny_sd), "--lora", str(tiny_tcd_lora), "--prompt", "red apple",
                       "--steps", "4", "--num", "2", "--out-dir", str(out), *extra)

    rc, _, err = sample(tmp_path / "a")
    assert rc == 0, err
    record = json.loads(Image.open(tmp_path / "a" / "00000.png").text["fewstep"])
    assert record["sampler"] == "tcd" and record["eta"] == 0.3, record
    assert sample(tmp_path / "b", "--eta", "0.3")[0] == 0 and sample(tmp_path / "c", "--gamma", "0.9")[0] == 0
    pixels = {d: np.asarray(Image.open(tmp_path / d / "00001.png"), dtype=float) for d in "abc"}
    assert np.array_equal(pixels["a"], pixels["b"]) and not np.array_equal(pixels["a"], pixels["c"])
    for bad in ("1.5", "-0.1"):
        code, _, err = sample(tmp_path / "d", "--gamma", bad)
        assert_one_line_error(code, err, "--eta/--gamma")
    assert not (tmp_path / "d").exists()


def test_eta_with_another_sampler_or_space_is_one_clear_line(tiny_sd, tmp_path, capsys):
    rc, _, err = run_cli(capsys, "sample", "--model", str(tiny_sd), "--prompt", "red apple", "--steps", "2", "--num",
                         "1", "--sampler", "ddim", "--eta", "0.5", "--out", str(tmp_path / "x.png"))
    assert rc != 0 and len(err.strip().splitlines()) == 1 and "--sampler tcd" in err, err


def test_cli_tcd_full_model_runs_in_stable_diffusion_pipeline_with_tcd_scheduler(tiny_sd, tmp_path, capsys):
    """``fewstep distill --method tcd``: a w-conditioned ε UNet saved as a StableDiffusionPipeline folder with
    TCDScheduler; ``fewstep sample --model <it> --steps 4`` uses TCD's sampler by default, and diffusers' pipeline
    (which feeds the w-embedding as timestep_cond) gives the same images."""
    from diffusers import StableDiffusionPipeline
    from helpers import caption_folder

    folder, _ = caption_folder(tmp_path / "pics", n=8)
    rc, out, err = run_cli(capsys, "distill", "--method", "tcd", "--teacher", str(tiny_sd), "--dataset", str(folder),
                           "--out", str(tmp_path / "tcd"), "--steps", "2", "--batch", "4", "--no-progress",
                           "--min-guidance-scale", "2", "--max-guidance-scale", "5", "--work-dir", str(tmp_path / "w"))
    assert rc == 0, err
    model = load_model(tmp_path / "tcd")
    assert model.config.default_sampler == "tcd" and model.takes_guidance and model.config.guidance_range == [2, 5]
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "tcd")
    assert type(pipe.scheduler).__name__ == "TCDScheduler" and pipe.unet.config.time_cond_proj_dim
    rc, _, err = run_cli(capsys, "sample", "--model", str(tmp_path / "tcd"), "--prompt", "red apple", "--steps", "4",
                         "--num", "1", "--out", str(tmp_path / "s.png"))
    assert rc == 0, err
    for steps, gamma in ((2, 0.3), (4, 0.0)):
        ours = generate(model, PROMPTS, steps=steps, guidance_scale=3.0, seed=5, eta=gamma)
        theirs = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=3.0, eta=gamma, height=32, width=32,
                      output_type="pt", generator=torch.Generator().manual_seed(5)).images * 2 - 1
        assert (ours - theirs.clamp(-1, 1)).abs().max() <= 4 / 255, (ours - theirs).abs().max()


def test_shipped_tcd_lora_in_diffusers_gives_fewstep_samples_images(tmp_path, capsys):
    """The acceptance test on the shipped models: ``fewstep sample --model models/emoji-sd --lora
    models/emoji-tcd-lora --steps 4`` (TCD's sampler, γ 0.3, by the LoRA's kind) and diffusers'
    StableDiffusionPipeline + load_lora_weights + TCDScheduler (eta 0.3) give the same 8-bit images, ≤ 2/255 apart."""
    import numpy as np
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from fewstep.models.folders import shipped_models_dir

    models = shipped_models_dir()
    if not (models / "emoji-tcd-lora").is_dir():
        pytest.skip("models/emoji-tcd-lora is not trained here")
    rc, _, err = run_cli(capsys, "sample", "--model", str(models / "emoji-sd"), "--lora", str(models / "emoji-tcd-lora"),
                         "--steps", "4", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--num", "2", "--seed", "3",
                         "--out-dir", str(tmp_path / "ours"))
    assert rc == 0, err
    ours = np.stack([np.asarray(Image.open(tmp_path / "ours" / f"{i:05d}.png"), dtype=int) for i in range(4)])
    pipe = StableDiffusionPipeline.from_pretrained(models / "emoji-sd")
    pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(models / "emoji-tcd-lora"))
    theirs = pipe([p for p in PROMPTS for _ in range(2)], num_inference_steps=4, guidance_scale=1.0, eta=0.3, height=32,
                  width=32, output_type="np", generator=torch.Generator().manual_seed(3)).images
    theirs = np.round(theirs * 255).astype(int)
    assert np.abs(ours - theirs).max() <= 2, np.abs(ours - theirs).max()


def test_bench_tcd_claims_are_decided_beyond_the_spread_and_name_what_was_tried(tmp_path):
    """The TCD claims compare TCD-LoRA at γ 0.3 with LCM-LoRA beyond the spread, and where TCD does not win they
    name the best TCD point measured (the γ sweep, the ablation's variants when its JSON is there)."""
    import json
    from types import SimpleNamespace

    from fewstep.bench import tcd as bench_tcd

    def row(n, f, eta=None):
        return {"steps": n, "fid": f, "fid_std": 0.05, "cond_accuracy": 0.7, "cond_accuracy_std": 0.01,
                **({} if eta is None else {"eta": eta})}
    info = {"rank": 4, "training": {"command": "c", "steps": 600, "config": {"batch_size": 64, "lr": 1e-3,
                                                                           "extra": {"target_ema": 0.95}}}}
    gamma = {"0.3": [row(2, 1.6, 0.3), row(4, 1.0, 0.3), row(8, 0.6, 0.3)], "1": [row(4, 0.85, 1.0), row(8, 0.7, 1.0)]}
    report = SimpleNamespace(tcd={"command": "bench", "num": 10, "seed": 0, "spread": "bootstrap", "guidance_scale": 1.0,
                                  "lcm_lora": info, "tcd_lora": info, "gamma": gamma,
                                  "quality": {"emoji-lcm-lora/consistency": [row(2, 1.4), row(4, 0.9), row(8, 0.8)],
                                              "emoji-tcd-lora/tcd": gamma["0.3"]}})
    eight, four = bench_tcd.claims(report)
    assert eight[-1] == "holds"                                       # 0.6 vs 0.8, spread 0.07
    assert four[-1].startswith("does not hold; best TCD point tried at 4 steps: γ 1, FID 0.850")
    (tmp_path / bench_tcd.ABLATION).write_text(json.dumps({"command": "a", "budget": "b", "num": 10, "seed": 0, "runs": [
        {"name": "mu0", "target_ema": 0.0, "lr": 1e-3, "rows": [row(4, 0.7, 0.3)]}]}))
    four = bench_tcd.claims(report, tmp_path)[1]
    assert "mu0, γ 0.3, FID 0.700" in four[-1] and "TCD better beyond the spread" in four[-1]
    text = "\n".join(bench_tcd.section(report, tmp_path))
    assert "| mu0 | 0 | 0.001 |" in text and "0.700 ± 0.050" in text


def test_a_bare_tcd_lora_file_declared_with_tcd_samples_with_tcds_sampler(tiny_sd, tiny_tcd_lora, tmp_path):
    """A TCD-LoRA file that says nothing (no fewstep.json, no metadata: downloaded) is declared PATH:WEIGHT:tcd and
    then sampled with TCD's sampler, as the folder is."""
    from safetensors.torch import load_file, save_file

    from fewstep.models.loras import LORA_FILE, load_with_loras

    bare = tmp_path / "tcd.safetensors"
    save_file(load_file(tiny_tcd_lora / LORA_FILE), bare)
    model = load_with_loras(tiny_sd, [f"{bare}:1:tcd"])
    assert model.config.default_sampler == "tcd" and model.config.loras[0]["kind"] == "tcd-lora"
    folder = load_with_loras(tiny_sd, [str(tiny_tcd_lora)])
    torch.testing.assert_close(generate(model, PROMPTS, steps=2, seed=1), generate(folder, PROMPTS, steps=2, seed=1))
