"""SDXL-format pipelines (issue 15): two text encoders, pooled embeddings and size/crop time ids as one more
conditioner on the one model handle. Every check is against diffusers' own StableDiffusionXLPipeline on a
tiny random SDXL folder built here."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import save_tiny_sdxl, tiny_data

from fewstep.errors import FewstepError
from fewstep.models.folders import load_model

PROMPTS = ["red apple", "grinning face"]


def _pipe_images(pipe, steps: int, guidance: float, seed: int) -> torch.Tensor:
    out = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, height=32, width=32, output_type="pt",
               generator=torch.Generator().manual_seed(seed)).images
    return (out * 2 - 1).clamp(-1, 1)


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    """A random-weight SDXL-format pipeline folder (no training)."""
    return save_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")


def test_sdxl_folder_is_a_diffusers_sdxl_pipeline(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    index = json.loads((tiny_sdxl / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and "text_encoder_2" in index
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    assert pipe.unet.config.addition_embed_type == "text_time"
    model = load_model(tiny_sdxl)
    assert "text_encoder_2" in model.parts and not model.takes_guidance


@pytest.mark.parametrize("sampler,scheduler", [("euler", "EulerDiscreteScheduler"),
                                               ("dpmpp-2m", "DPMSolverMultistepScheduler")])
def test_sdxl_teacher_gives_the_diffusers_pipeline_images(tiny_sdxl, sampler, scheduler):
    """Text-to-image with CFG: both encoders' penultimate states, TE2's pooled embedding and the time ids go
    where StableDiffusionXLPipeline puts them, so fewstep's samplers and diffusers' schedulers agree."""
    import diffusers
    from diffusers import StableDiffusionXLPipeline

    from fewstep.sampling.generate import generate_latent

    model = load_model(tiny_sdxl)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    extra = {} if sampler == "euler" else {"final_sigmas_type": "zero", "lower_order_final": True}
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config, timestep_spacing="trailing",
                                                               **extra)  # fewstep's VP grid: trailing, ends at σ=0
    ours = generate_latent(model, PROMPTS, steps=4, sampler=sampler, guidance_scale=3.0, seed=5)
    theirs = _pipe_images(pipe, 4, 3.0, 5)
    assert torch.allclose(ours, theirs, atol=3e-3), (ours - theirs).abs().max()
    assert not torch.allclose(ours, generate_latent(model, PROMPTS, steps=4, sampler=sampler, guidance_scale=1.0,
                                                    seed=5), atol=1e-2)  # the unconditional half matters


def test_sdxl_lcd_folder_runs_in_diffusers_with_lcm_scheduler(tiny_sdxl, tmp_path):
    """LCD on an SDXL teacher writes an SDXL pipeline whose LCMScheduler gives fewstep's LCM images; the
    student starts as the teacher, then trains (the loss changes the weights)."""
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    from fewstep.methods.lcm import LCMSettings, distill_lcm
    from fewstep.sampling.generate import generate_latent
    from fewstep.training import TrainConfig

    config = TrainConfig(out_dir=str(tmp_path / "work"), max_steps=2, batch_size=6, progress=False, checkpoint_every=2)
    out = distill_lcm(load_model(tiny_sdxl), tiny_data(12), tmp_path / "lcm", config,
                      LCMSettings(guidance_min=2, guidance_max=4), command="test")
    model = load_model(out)
    assert model.config.is_lcm and "text_encoder_2" in model.parts
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    assert isinstance(pipe.scheduler, LCMScheduler)
    for steps in (1, 4):
        ours = generate_latent(model, PROMPTS, steps=steps, guidance_scale=3.0, seed=2)
        theirs = _pipe_images(pipe, steps, 3.0, 2)
        assert torch.allclose(ours, theirs, atol=3e-3), (steps, (ours - theirs).abs().max())


def test_sdxl_lcm_lora_loads_in_diffusers_and_gives_the_same_images(tiny_sdxl, tmp_path):
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    from fewstep.methods.lcm import LCMSettings, distill_lcm
    from fewstep.models.loras import apply_loras
    from fewstep.sampling.generate import generate_latent
    from fewstep.training import TrainConfig

    config = TrainConfig(out_dir=str(tmp_path / "work"), max_steps=2, batch_size=6, lr=1e-2, progress=False,
                         checkpoint_every=2)
    lora = distill_lcm(load_model(tiny_sdxl), tiny_data(12), tmp_path / "lora", config,
                       LCMSettings(method="lcm-lora", lora_rank=2, guidance_min=2, guidance_max=4), command="test")
    model = apply_loras(load_model(tiny_sdxl), [(lora, 1.0)])
    assert model.config.is_lcm
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps=50)
    pipe.load_lora_weights(str(lora))
    ours = generate_latent(model, PROMPTS, steps=4, guidance_scale=1.0, seed=3)
    theirs = _pipe_images(pipe, 4, 1.0, 3)
    assert torch.allclose(ours, theirs, atol=3e-3), (ours - theirs).abs().max()


def test_sdxl_img2img_matches_the_diffusers_img2img_pipeline(tiny_sdxl):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline

    from fewstep.sampling.generate import generate_latent

    model = load_model(tiny_sdxl)
    init = tiny_data(2).images
    ours = generate_latent(model, PROMPTS, steps=4, sampler="euler", guidance_scale=3.0, seed=4, init_images=init,
                           strength=0.5)
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny_sdxl)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    latents = model.codec.encode(init)  # diffusers samples the VAE posterior, fewstep takes its mean: give latents
    theirs = pipe(PROMPTS, image=latents, strength=0.5, num_inference_steps=4, guidance_scale=3.0,
                  output_type="pt", generator=torch.Generator().manual_seed(4)).images
    theirs = (theirs * 2 - 1).clamp(-1, 1)
    assert torch.allclose(ours, theirs, atol=3e-3), (ours - theirs).abs().max()


def test_fp16_folder_loads_and_samples_in_float32(tiny_sdxl, tmp_path):
    """A folder saved in half precision (fp16-variant files only) loads, in float32 by default or in the
    dtype asked for, and samples what the float32 folder samples up to fp16 rounding."""
    from diffusers import StableDiffusionXLPipeline

    from fewstep.sampling.generate import generate_latent

    half = tmp_path / "half"
    StableDiffusionXLPipeline.from_pretrained(tiny_sdxl).to(torch.float16).save_pretrained(half, variant="fp16")
    (half / "fewstep.json").write_text((tiny_sdxl / "fewstep.json").read_text())
    model = load_model(half)
    assert model.unet.dtype == torch.float32
    assert load_model(half, dtype=torch.float16).unet.dtype == torch.float16
    a = generate_latent(model, PROMPTS, steps=2, guidance_scale=3.0, seed=1)
    b = generate_latent(load_model(tiny_sdxl), PROMPTS, steps=2, guidance_scale=3.0, seed=1)
    assert (a - b).abs().max() < 0.05


def test_refiner_and_mismatched_sdxl_folders_are_clear_errors(tiny_sdxl, tmp_path):
    import shutil

    refiner = tmp_path / "refiner"
    shutil.copytree(tiny_sdxl, refiner)
    shutil.rmtree(refiner / "text_encoder")
    shutil.rmtree(refiner / "tokenizer")
    with pytest.raises(FewstepError, match="SDXL refiner"):
        load_model(refiner)
    mixed = tmp_path / "mixed"
    shutil.copytree(tiny_sdxl, mixed)
    shutil.rmtree(mixed / "text_encoder_2")
    shutil.rmtree(mixed / "tokenizer_2")
    index = json.loads((mixed / "model_index.json").read_text())
    index.pop("text_encoder_2")
    index.pop("tokenizer_2")
    (mixed / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(FewstepError, match="SDXL's added text/time conditioning"):
        load_model(mixed)


def test_sdxl_style_lora_lcm_lora_merge_and_lcf_through_the_cli(tiny_sdxl, tmp_path, capsys):
    """On an SDXL folder as on SD: train-lora (a style LoRA), distill --method lcm-lora, lora merge of both into
    a StableDiffusionXLPipeline with LCMScheduler whose images diffusers reproduces, the same pair on the fly
    with sample --lora, and LCF from an SDXL LCD folder."""
    import numpy as np
    from diffusers import LCMScheduler, StableDiffusionXLPipeline
    from helpers import caption_folder, run_cli
    from PIL import Image

    from fewstep.sampling.generate import generate_latent

    folder, _ = caption_folder(tmp_path / "pics", n=8)
    common = ["--dataset", str(folder), "--steps", "2", "--batch", "4", "--no-progress"]
    rc, _, err = run_cli(capsys, "train-lora", "--base", str(tiny_sdxl), "--out", str(tmp_path / "style"), "--rank", "2",
                         "--work-dir", str(tmp_path / "w1"), *common)
    assert rc == 0, err
    rc, _, err = run_cli(capsys, "distill", "--method", "lcm-lora", "--teacher", str(tiny_sdxl), "--out",
                         str(tmp_path / "lcm-lora"), "--lora-rank", "2", "--work-dir", str(tmp_path / "w2"), *common)
    assert rc == 0, err
    rc, _, err = run_cli(capsys, "lora", "merge", "--base", str(tiny_sdxl), "--lora", f"{tmp_path / 'style'}:0.7",
                         "--lora", f"{tmp_path / 'lcm-lora'}:1", "--out", str(tmp_path / "merged"))
    assert rc == 0, err
    merged = load_model(tmp_path / "merged")
    assert merged.config.is_lcm and "text_encoder_2" in merged.parts
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "merged")
    assert isinstance(pipe.scheduler, LCMScheduler)
    ours = generate_latent(merged, PROMPTS, steps=4, guidance_scale=1.0, seed=5)
    assert torch.allclose(ours, _pipe_images(pipe, 4, 1.0, 5), atol=3e-3)
    images = []
    for i, model in enumerate([["--model", str(tmp_path / "merged")],
                               ["--model", str(tiny_sdxl), "--lora", f"{tmp_path / 'style'}:0.7", "--lora",
                                str(tmp_path / "lcm-lora")]]):
        rc, _, err = run_cli(capsys, "sample", *model, "--prompt", "red apple", "--steps", "2", "--num", "2",
                             "--out", str(tmp_path / f"{i}.png"))
        assert rc == 0, err
        images.append(np.asarray(Image.open(tmp_path / f"{i}.png"), dtype=float))
    assert np.abs(images[0] - images[1]).max() <= 2                     # fused = on the fly
    rc, _, err = run_cli(capsys, "distill", "--method", "lcd", "--teacher", str(tiny_sdxl), "--out", str(tmp_path / "lcd"),
                         "--work-dir", str(tmp_path / "w3"), *common)
    assert rc == 0, err
    rc, _, err = run_cli(capsys, "distill", "--method", "lcf", "--teacher", str(tmp_path / "lcd"), "--out",
                         str(tmp_path / "lcf"), "--work-dir", str(tmp_path / "w4"), *common)
    assert rc == 0, err
    lcf = load_model(tmp_path / "lcf")
    assert lcf.config.is_lcm and "text_encoder_2" in lcf.parts
    assert isinstance(StableDiffusionXLPipeline.from_pretrained(tmp_path / "lcf").scheduler, LCMScheduler)
