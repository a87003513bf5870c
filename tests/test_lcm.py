"""Latent consistency models: the SD-format pipeline, LCD/LCF, LCM sampling and diffusers parity."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import CAPTIONS, TINY, caption_folder, tiny_data

from fewstep.core.schedules import VPSchedule, lcm_timesteps
from fewstep.errors import FewstepError
from fewstep.models.folders import SD_SCHEDULER
from fewstep.models.folders import load_model as load_latent_model
from fewstep.objectives.curricula import Curriculum


@pytest.fixture(scope="module")
def tiny_lcm(tiny_sd, tmp_path_factory):
    from fewstep.methods.lcm import LCMSettings, distill_lcm
    from fewstep.training import TrainConfig

    root = tmp_path_factory.mktemp("lcm")
    config = TrainConfig(out_dir=str(root / "work"), max_steps=3, batch_size=8, progress=False, checkpoint_every=3)
    return distill_lcm(load_latent_model(tiny_sd), tiny_data(), root / "tiny-lcm", config,
                       LCMSettings(guidance_min=2, guidance_max=6), command="test")


def test_teacher_folder_runs_in_stable_diffusion_pipeline(tiny_sd):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    out = pipe(["red apple"], num_inference_steps=2, height=32, width=32, output_type="np")
    assert out.images.shape == (1, 32, 32, 3)


def test_lcm_folder_gives_diffusers_images_for_the_same_seed(tiny_lcm):
    """fewstep's LCM sampler and diffusers' LatentConsistencyModelPipeline + LCMScheduler agree."""
    from diffusers import LatentConsistencyModelPipeline

    from fewstep.sampling.generate import generate_latent

    model = load_latent_model(tiny_lcm)
    assert model.config.is_lcm and model.config.original_inference_steps == 50
    prompts = ["red apple", "grinning face"]
    for steps in (1, 2, 4):
        ours = generate_latent(model, prompts, steps=steps, guidance_scale=4.0, seed=7)
        pipe = LatentConsistencyModelPipeline.from_pretrained(tiny_lcm)
        theirs = pipe(prompts, num_inference_steps=steps, guidance_scale=4.0, height=32, width=32, output_type="pt",
                      generator=torch.Generator().manual_seed(7)).images * 2 - 1
        assert torch.allclose(ours, theirs.clamp(-1, 1), atol=2e-3), (steps, (ours - theirs).abs().max())


def test_lcm_grid_matches_lcm_scheduler_for_img2img_strengths():
    from diffusers import LCMScheduler

    sched = LCMScheduler.from_config({**SD_SCHEDULER, "original_inference_steps": 50})
    for steps, strength in [(1, 1.0), (4, 1.0), (4, 0.5), (2, 0.3), (8, 1.0)]:
        sched.set_timesteps(steps, strength=strength)
        assert lcm_timesteps(steps, 50, 1000, strength).tolist() == sched.timesteps.tolist()


def test_skipping_step_pairs_are_k_apart_on_the_skipped_grid():
    schedule = VPSchedule.from_diffusers_config(SD_SCHEDULER)
    for k in (1, 5, 20, 50):
        lo, hi = Curriculum.for_method("lcd", 10, skip=k).sample_pairs(20000, 0, schedule)
        t_hi = schedule.sigma_to_t(hi.double()).round().long()
        t_lo = schedule.sigma_to_t(lo.double()).round().long()
        assert set(t_hi.tolist()) <= set(range(k - 1, 1000, k)) and len(set(t_hi.tolist())) == 1000 // k
        assert torch.equal(t_lo, (t_hi - k).clamp(min=0))


def test_student_starts_as_the_teacher_for_every_guidance_scale(tiny_sd):
    from fewstep.core.guidance import guidance_scale_embedding
    from fewstep.nets.guided import w_conditioned_unet

    teacher = load_latent_model(tiny_sd)
    student = w_conditioned_unet(teacher.unet, 64)
    x, t, c = torch.randn(3, 4, 8, 8), torch.tensor([999, 500, 19]), torch.randn(3, TINY.max_length, TINY.text_width)
    ref = teacher.unet(x, t, encoder_hidden_states=c).sample
    for w in (0.0, 3.0, 11.0):
        out = student(x, t, encoder_hidden_states=c, timestep_cond=guidance_scale_embedding(torch.full((3,), w), 64)).sample
        assert torch.allclose(out, ref, atol=1e-5)


def test_captioned_sets_from_metadata_jsonl_and_webdataset_shards_agree(tmp_path):
    from fewstep.models.data import load_captioned

    folder, shard = caption_folder(tmp_path / "pics")
    a, b = load_captioned(str(folder), 32), load_captioned(str(shard), 32)
    assert a.images.shape == (12, 3, 32, 32) and a.captions == b.captions == [CAPTIONS[i % 6] for i in range(12)]
    assert torch.equal(a.images, b.images)
    (folder / "metadata.jsonl").write_text('{"file_name": "0.png"}\n')
    with pytest.raises(FewstepError, match="no caption field"):
        load_captioned(str(folder), 32)


def test_cli_lcd_then_sample_and_img2img(tiny_sd, tmp_path, capsys):
    from helpers import run_cli

    folder, _ = caption_folder(tmp_path / "pics")
    out = tmp_path / "lcm"
    run_cli(capsys, "distill", "--method", "lcd", "--teacher", str(tiny_sd), "--dataset", str(folder), "--out", str(out),
            "--steps", "2", "--batch", "4", "--solver", "dpm-solver++", "--skip", "50", "--no-progress",
            "--work-dir", str(tmp_path / "work"))
    model = load_latent_model(out)
    assert model.config.is_lcm and model.config.original_inference_steps == 20
    assert model.config.training["config"]["extra"]["solver"] == "dpm-solver++"
    from PIL import Image

    rc, _, _ = run_cli(capsys, "sample", "--model", str(out), "--prompt", "red apple", "--prompt", "flag: Japan",
                       "--steps", "2", "--num", "3", "--out", str(tmp_path / "s.png"))
    assert rc == 0 and (tmp_path / "s.png").exists()
    Image.open(folder / "0.png").resize((32, 32)).save(tmp_path / "in.png")
    rc, _, err = run_cli(capsys, "edit", "--task", "img2img", "--model", str(out), "--input", str(tmp_path / "in.png"),
                         "--prompt", "green apple", "--prompt", "red apple", "--steps", "2", "--strength", "0.6",
                         "--out", str(tmp_path / "e.png"))
    assert rc == 0 and Image.open(tmp_path / "e.png").size[0] > Image.open(tmp_path / "e.png").size[1], err
    rc, _, err = run_cli(capsys, "edit", "--task", "img2img", "--model", str(out), "--input", str(folder / "0.png"),
                         "--out", str(tmp_path / "bad.png"))
    assert rc != 0 and "40x40" in err and not (tmp_path / "bad.png").exists()


@pytest.mark.parametrize("argv, message", [
    (["distill", "--method", "lcd", "--teacher", "models/digits-teacher", "--out", "X"], "--method lcd distils a discrete-VP teacher"),
    (["distill", "--method", "lcd", "--out", "X"], "needs a teacher: --teacher"),
])
def test_cli_bad_teacher_is_one_clear_line(argv, message, capsys):
    from helpers import run_cli

    rc, _, err = run_cli(capsys, *argv)
    assert rc != 0 and message in err and len(err.strip().splitlines()) == 1


def test_mismatched_pipeline_parts_and_bad_settings_are_clear_errors(tiny_sd, tmp_path):
    import json
    import shutil

    from fewstep.methods.lcm import LCMSettings, check_settings

    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd, broken)
    cfg = json.loads((broken / "vae" / "config.json").read_text())
    (broken / "vae" / "config.json").write_text(json.dumps({**cfg, "latent_channels": 8}))
    with pytest.raises(FewstepError, match="latents but the UNet takes"):
        load_latent_model(broken)
    for bad, match in [(LCMSettings(solver="heun"), "unknown teacher solver"), (LCMSettings(skip=30), "must divide"),
                       (LCMSettings(guidance_min=5, guidance_max=2), "guidance range")]:
        with pytest.raises(FewstepError, match=match):
            check_settings(bad, 1000)


def test_long_prompts_are_truncated_with_a_warning(tiny_sd):
    model = load_latent_model(tiny_sd)
    with pytest.warns(UserWarning, match="truncated"):
        ids = model.conditioner.tokenize(["red apple " * 40])
    assert ids.shape == (1, TINY.max_length)


def test_second_order_teacher_steps_beat_ddim_on_the_exact_gaussian_ode():
    """One skipping step of DPM-Solver-2 / DPM-Solver++(2S) against the closed-form PF-ODE of Gaussian
    data (x_0 ~ N(0, s²): x(σ') = x·√(s² + σ'²)/√(s² + σ²)): second order is far closer than DDIM."""
    from fewstep.core.solvers import ode_step

    s = 0.5
    def denoiser(x, sigma):
        return x * s**2 / (s**2 + sigma.reshape(-1, 1) ** 2)
    x, sigma, sigma_next = torch.randn(64, 2, dtype=torch.float64) * math.sqrt(s**2 + 4.0), torch.full((64,), 2.0,
                                                                                                        dtype=torch.float64), torch.full((64,), 1.0, dtype=torch.float64)
    exact = x * math.sqrt(s**2 + 1.0) / math.sqrt(s**2 + 4.0)
    err = {name: (ode_step(name, denoiser, x, sigma, sigma_next) - exact).abs().max().item()
           for name in ("ddim", "dpm-solver", "dpm-solver++", "heun")}
    assert err["dpm-solver"] < err["ddim"] / 5 and err["dpm-solver++"] < err["ddim"] / 5, err


def test_latent_eval_scores_caption_classes_and_counts_cfg_passes(tiny_sd, tiny_lcm):
    from fewstep.eval.evaluate import Ruler, eval_prompts
    from fewstep.eval.evaluate import evaluate as evaluate_latent
    from fewstep.nets.classifier import Classifier, ClassifierConfig

    data = tiny_data()
    prompts, labels = eval_prompts(data, 30, seed=0)
    assert len(prompts) == 30 and all(data.labels[data.captions.index(p)] == y for p, y in zip(prompts, labels.tolist()))
    torch.manual_seed(0)
    ruler = Ruler(Classifier(ClassifierConfig(channels=3, image_size=32, num_classes=3, width=8)), data)
    teacher_rows, _ = evaluate_latent(load_latent_model(tiny_sd), ruler, [2], "ddim", 3.0, num=8, progress=False)
    lcm_rows, samples = evaluate_latent(load_latent_model(tiny_lcm), ruler, [1, 2], None, 3.0, num=8, progress=False)
    assert teacher_rows[0].nfe == 4 and [r.nfe for r in lcm_rows] == [1, 2]
    assert samples[2].shape == (8, 3, 32, 32)
    from fewstep.nets.classifier import (
        accuracy,  # judged against each prompt's caption group
    )
    assert lcm_rows[0].cond_accuracy == accuracy(ruler.classifier, samples[1], eval_prompts(data, 8, seed=0)[1])


def test_lcd_runs_under_accelerate_launch_with_two_processes(tiny_sd, tmp_path):
    """`accelerate launch` (2 CPU processes, DESIGN.md §7) runs `fewstep distill --method lcd` unchanged."""
    import os
    import subprocess
    import sys

    folder, _ = caption_folder(tmp_path / "pics", n=8)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29523",
           "-m", "fewstep", "distill", "--method", "lcd", "--teacher", str(tiny_sd), "--dataset", str(folder),
           "--out", str(tmp_path / "lcm"), "--work-dir", str(tmp_path / "work"), "--steps", "2", "--batch", "4",
           "--no-progress"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    model = load_latent_model(tmp_path / "lcm")
    assert model.config.is_lcm and model.config.training["processes"] == 2
    assert json.loads((tmp_path / "work" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2


# --- the LCD loss against the exact guided PF-ODE ------------------------------------------------------
def _guided_oracle(n: int = 12):
    from fewstep.core.oracle import ExactDenoiser

    g = torch.Generator().manual_seed(0)
    data, labels = torch.randn(n, 2, generator=g, dtype=torch.float64), torch.arange(n) % 3
    return ExactDenoiser(data, labels), data, labels


class GuidedFlowMap(torch.nn.Module):
    """f*(x, σ; c, s): the CFG-guided oracle PF-ODE at each sample's own s, solved from σ down to the VP grid's
    σ_0 with 300 Heun steps (the ideal LCD student)."""

    def __init__(self, den, sigma_end: float):
        super().__init__()
        self.den, self.sigma_end = den, sigma_end

    def forward(self, x, sigma, class_labels, guidance_scale):
        from fewstep.core.guidance import CFGDenoiser
        from fewstep.core.schedules import karras_sigmas
        from fewstep.core.solvers import sample_heun

        out = x.clone()
        for s in sigma.unique():
            rows = sigma == s
            if float(s) <= self.sigma_end * (1 + 1e-6):
                continue
            null = torch.full_like(class_labels[rows], self.den.null_label)
            cfg = CFGDenoiser(self.den, guidance_scale[rows], {"class_labels": null})
            out[rows] = sample_heun(cfg, x[rows], karras_sigmas(300, self.sigma_end, float(s)),
                                    extra_args={"class_labels": class_labels[rows]})
        return out


def test_lcd_loss_vanishes_on_the_exact_guided_consistency_function():
    """The LCD pair (skipping step k = 20 on SD's grid, per-sample guidance, one teacher step) is consistent for the
    exact flow map of the guided ODE: its loss is ~1e-5 of the teacher's own one-step denoiser's, and smaller
    still with a second-order teacher step (DPM-Solver-2, DPM-Solver++(2S))."""
    from fewstep.core.guidance import CFGDenoiser
    from fewstep.objectives.consistency import ConsistencyLoss
    from fewstep.objectives.distances import l2

    den, data, labels = _guided_oracle()
    schedule = VPSchedule.from_diffusers_config(SD_SCHEDULER)

    def condition(batch):
        return {"class_labels": batch["labels"], "guidance_scale": torch.rand(len(batch["labels"]), dtype=torch.float64) * 3 + 1}

    def teacher(cond):
        null = torch.full_like(cond["class_labels"], den.null_label)
        return CFGDenoiser(den, cond["guidance_scale"], {"class_labels": null}), {"class_labels": cond["class_labels"]}

    def one_step(x, sigma, class_labels, guidance_scale):
        cfg, extra = teacher({"class_labels": class_labels, "guidance_scale": guidance_scale})
        return cfg(x, sigma, **extra)

    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, len(data), (48,), generator=g)
    batch = {"images": data[idx], "labels": labels[idx]}
    loss = {}
    for solver in ("ddim", "dpm-solver", "dpm-solver++"):
        loss_fn = ConsistencyLoss(schedule, Curriculum(name="lcm", total_steps=1, target_ema=0.0, skip=20), l2,
                                  teacher=teacher, solver=solver, condition=condition)
        torch.manual_seed(2)
        loss[solver] = loss_fn(GuidedFlowMap(den, schedule.sigma_min), batch)[0].item()
    torch.manual_seed(2)
    baseline = loss_fn(one_step, batch)[0].item()
    assert max(loss.values()) < 1e-4 * baseline, (loss, baseline)
    assert loss["dpm-solver"] < loss["ddim"] / 3 and loss["dpm-solver++"] < loss["ddim"] / 3, loss
