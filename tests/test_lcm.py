"""Latent consistency models: the SD-format pipeline, LCD/LCF, LCM sampling and diffusers parity."""

from __future__ import annotations

import math

import pytest
import torch

from fewstep.consistency_losses import Curriculum
from fewstep.data import ImageData
from fewstep.errors import FewstepError
from fewstep.schedules import VPSchedule, lcm_timesteps
from fewstep.sd import SD_SCHEDULER, TinySDConfig, load_latent_model

CAPTIONS = ["grinning face", "red apple", "thumbs up: medium skin tone", "flag: Japan", "green apple", "smiling cat"]
TINY = TinySDConfig(vae_channels=(8, 16, 16), vocab_size=300, max_length=16, text_width=32, text_layers=1,
                    unet_channels=(16, 32, 32), head_dim=16)


def tiny_data(n: int = 24) -> ImageData:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % len(CAPTIONS)
    images = (torch.rand(len(CAPTIONS), 3, 32, 32, generator=g) * 2 - 1)[labels]
    return ImageData(images, labels % 3, ["faces", "food", "flags"], "tiny", [CAPTIONS[i] for i in labels])


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """A random-weight SD-format pipeline folder (no training): a stand-in teacher."""
    from fewstep.sd import build_cond_unet, build_text_encoder, build_tokenizer, build_vae, save_pipeline

    torch.manual_seed(0)
    tok = build_tokenizer(CAPTIONS, TINY.vocab_size, TINY.max_length)
    folder = tmp_path_factory.mktemp("sd") / "tiny-sd"
    return save_pipeline(folder, build_cond_unet(TINY), build_vae(TINY), build_text_encoder(TINY, tok), tok,
                         {"kind": "diffusion", "dataset": "tiny", "default_steps": 4})


@pytest.fixture(scope="module")
def tiny_lcm(tiny_sd, tmp_path_factory):
    from fewstep.lcm import LCMSettings, distill_lcm
    from fewstep.train import TrainConfig

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

    from fewstep.latent_sampling import generate_latent

    model = load_latent_model(tiny_lcm)
    assert model.is_lcm and model.info["original_inference_steps"] == 50
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
    from fewstep.guided import guidance_scale_embedding
    from fewstep.lcm import student_unet

    teacher = load_latent_model(tiny_sd)
    student = student_unet(teacher.unet, 64)
    x, t, c = torch.randn(3, 4, 8, 8), torch.tensor([999, 500, 19]), torch.randn(3, TINY.max_length, TINY.text_width)
    ref = teacher.unet(x, t, encoder_hidden_states=c).sample
    for w in (0.0, 3.0, 11.0):
        out = student(x, t, encoder_hidden_states=c, timestep_cond=guidance_scale_embedding(torch.full((3,), w), 64)).sample
        assert torch.allclose(out, ref, atol=1e-5)
