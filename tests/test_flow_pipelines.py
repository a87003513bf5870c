"""FLUX- and SD3-format pipelines (issue 28): the folders diffusers' FluxPipeline / StableDiffusion3Pipeline load,
fewstep's sampling equal to theirs, LCD and LCM-LoRA on the flow ODE equal to FlowMatchLCMScheduler's sampling."""

import json

import numpy as np
import pytest
import torch
from helpers import CAPTIONS, run_cli, save_tiny_flow, tiny_data

from fewstep.models.folders import load_model
from fewstep.sampling.generate import generate_latent
from fewstep.training import TrainConfig

PROMPTS = [CAPTIONS[0], CAPTIONS[1]]
LENGTH = 16       # the tiny T5's max_sequence_length


@pytest.fixture(scope="module", params=["flux", "sd3"])
def tiny_flow(request, tmp_path_factory):
    return request.param, save_tiny_flow(tmp_path_factory.mktemp(request.param) / f"tiny-{request.param}",
                                         request.param, shift=1.0 if request.param == "flux" else 3.0)


def _pipe(folder):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(folder)


def _pipe_images(pipe, family: str, steps: int, guidance: float, seed: int, length: int = LENGTH, **kw) -> torch.Tensor:
    cfg = ({"true_cfg_scale": guidance, "negative_prompt": [""] * len(PROMPTS)} if family == "flux"
           else {"guidance_scale": guidance})
    out = pipe(PROMPTS, num_inference_steps=steps, height=32, width=32, output_type="pt", max_sequence_length=length,
               generator=torch.Generator().manual_seed(seed), **{**cfg, **kw}).images
    return (out * 2 - 1).clamp(-1, 1)


def test_flow_folder_is_its_diffusers_pipeline(tiny_flow):
    family, folder = tiny_flow
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ("FluxPipeline" if family == "flux" else "StableDiffusion3Pipeline")
    model = load_model(folder)
    assert model.config.parameterization == "flow" and model.diffusers_pipeline == index["_class_name"]
    assert model.shape == (4, 8, 8) and not model.takes_guidance


def test_flow_teacher_gives_the_diffusers_pipeline_images(tiny_flow):
    """Text-to-image with CFG: the text tokens, the pooled vector, the packing (FLUX), the timestep and the grid
    (FluxPipeline's linspace(1, 1/n, n); SD3's scheduler grid with shift 3) are where the pipelines put them."""
    family, folder = tiny_flow
    model = load_model(folder)
    ours = generate_latent(model, PROMPTS, steps=4, sampler="euler", guidance_scale=3.0, seed=5)
    theirs = _pipe_images(_pipe(folder), family, 4, 3.0, 5)
    assert torch.allclose(ours, theirs, atol=2e-3), (ours - theirs).abs().max()
    assert not torch.allclose(ours, generate_latent(model, PROMPTS, steps=4, sampler="euler", guidance_scale=1.0,
                                                    seed=5), atol=1e-2)   # the unconditional branch matters


def test_flow_grids_are_the_schedulers():
    """FlowSchedule's times are FlowMatchEulerDiscreteScheduler's: its own grid (SD3), FluxPipeline's base grid
    with a static shift, and a dynamic (resolution-dependent) shift as the static shift it equals."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from fewstep.core.flow import FlowSchedule

    for config, base, mu in (({"shift": 3.0}, "scheduler", None), ({"shift": 1.0}, "flux", None),
                             ({"use_dynamic_shifting": True}, "flux", 1024)):
        scheduler = FlowMatchEulerDiscreteScheduler(**config)
        sigmas = None if base == "scheduler" else np.linspace(1.0, 1 / 6, 6)
        extra = {"mu": calculate_shift(mu)} if mu else {}
        scheduler.set_timesteps(6, sigmas=sigmas, **extra)
        ours = FlowSchedule.from_diffusers_config({"_class_name": "FlowMatchEulerDiscreteScheduler", **config}, base,
                                                  mu).times(6)
        np.testing.assert_allclose(ours, scheduler.sigmas[:-1].numpy(), atol=1e-6)


@pytest.mark.parametrize("method", ["lcm-lora", "lcd"])
def test_flow_lcm_runs_in_diffusers_with_flow_match_lcm_scheduler(tiny_flow, method, tmp_path):
    """LCM-LoRA and LCD on the flow ODE: the adapter loads in the family's pipeline with FlowMatchLCMScheduler (the
    full LCD folder is saved with it) and gives fewstep's images; a FLUX LCD student takes the guidance scale in
    FLUX's own guidance embedding (FluxPipeline's guidance_scale), an SD3 one distils one scale."""
    from diffusers import FlowMatchLCMScheduler

    from fewstep.methods.lcm import LCMSettings, distill_lcm
    from fewstep.models.loras import load_with_loras

    family, folder = tiny_flow
    config = TrainConfig(out_dir=str(tmp_path / "work"), max_steps=2, batch_size=6, lr=1e-2, progress=False,
                         checkpoint_every=2)
    scale = (2.0, 4.0) if family == "flux" or method == "lcm-lora" else (3.0, 3.0)
    out = distill_lcm(load_model(folder), tiny_data(12), tmp_path / "out", config,
                      LCMSettings(method=method, lora_rank=2, guidance_min=scale[0], guidance_max=scale[1]),
                      command="test")
    if method == "lcm-lora":
        ours_model = load_with_loras(folder, [str(out)])
        pipe = _pipe(folder)
        pipe.scheduler = FlowMatchLCMScheduler.from_config(pipe.scheduler.config)
        pipe.load_lora_weights(out)
        kw = {"true_cfg_scale": 1.0} if family == "flux" else {"guidance_scale": 1.0}
        guidance = 1.0
    else:
        ours_model = load_model(out)
        pipe = _pipe(out)
        assert isinstance(pipe.scheduler, FlowMatchLCMScheduler)
        guidance = 3.0
        if family == "flux":
            assert pipe.transformer.config.guidance_embeds and ours_model.takes_guidance
            kw = {"guidance_scale": guidance, "true_cfg_scale": 1.0}
        else:
            assert not ours_model.takes_guidance
            kw, guidance = {"guidance_scale": 1.0}, 1.0
    assert ours_model.config.kind == "consistency" and ours_model.config.default_sampler == "consistency"
    # Both pipelines call scheduler.step without their generator: FlowMatchLCMScheduler's re-noising comes from
    # torch's global RNG. So the global RNG is seeded for them, and fewstep's step noise (FLUX: drawn on packed
    # latents) comes from a generator of that seed; the initial latents come from `generator` in both.
    base_noise = ours_model.step_noise
    ours_model.step_noise = lambda g: base_noise(torch.Generator().manual_seed(11))
    for steps in (1, 4):
        ours = generate_latent(ours_model, PROMPTS, steps=steps, guidance_scale=guidance, seed=3)
        torch.manual_seed(11)
        theirs = _pipe_images(pipe, family, steps, 1.0, 3, **kw)
        assert torch.allclose(ours, theirs, atol=2e-3), (steps, (ours - theirs).abs().max())


def test_flow_variants_and_tcd_are_refused(tiny_flow, tmp_path, capsys):
    import shutil

    family, folder = tiny_flow
    fill = tmp_path / "fill"
    shutil.copytree(folder, fill)
    index = json.loads((fill / "model_index.json").read_text())
    (fill / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxFillPipeline"}))
    rc, _, err = run_cli(capsys, "sample", "--model", str(fill), "--prompt", "a", "--out", str(tmp_path / "x.png"))
    assert rc != 0 and "FLUX Fill" in err and "Traceback" not in err
    rc, _, err = run_cli(capsys, "distill", "--method", "tcd-lora", "--teacher", str(folder), "--dataset", "emoji",
                         "--out", str(tmp_path / "t"), "--steps", "1")
    assert rc != 0 and "FlowMatchLCMScheduler" in err


def test_flow_img2img_matches_the_diffusers_img2img_pipeline(tiny_flow):
    """img2img: the same start level (diffusers' flow pipelines round t_start = ⌊N − N·strength⌋: 8 steps at 0.6
    run 5, where the UNet pipelines run 4), the flow's re-noising t·ε + (1 − t)·x_0 and the same noise."""
    from diffusers import FluxImg2ImgPipeline, StableDiffusion3Img2ImgPipeline

    family, folder = tiny_flow
    model = load_model(folder)
    init = tiny_data(2).images
    ours = generate_latent(model, PROMPTS, steps=8, sampler="euler", guidance_scale=3.0, seed=4, init_images=init,
                           strength=0.6)
    cls = FluxImg2ImgPipeline if family == "flux" else StableDiffusion3Img2ImgPipeline
    latents = model.codec.encode(init)  # diffusers samples the VAE posterior, fewstep takes its mean: give latents
    theirs = _pipe_images(cls.from_pretrained(folder), family, 8, 3.0, 4, image=latents, strength=0.6)
    assert torch.allclose(ours, theirs, atol=2e-3), (ours - theirs).abs().max()


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_train_teacher_writes_a_flow_pipeline(family, tiny_sd, tmp_path, capsys):
    """`train-teacher --family flux|sd3` (2 steps on the emoji, another pipeline's VAE): the folder is the family's
    diffusers pipeline, with a shifted VAE and a T5 tokenizer learned from the captions."""
    out = tmp_path / family
    rc, _, err = run_cli(capsys, "train-teacher", "--dataset", "emoji", "--family", family,
                         "--vae-from", str(tiny_sd), "--out", str(out), "--work-dir", str(tmp_path / "w"),
                         "--steps", "2", "--batch", "4", "--no-progress")
    assert rc == 0, err
    model = load_model(out)
    assert model.config.parameterization == "flow" and model.codec.shift_factor != 0
    assert model.conditioner.pipeline == ("FluxPipeline" if family == "flux" else "StableDiffusion3Pipeline")
    assert type(model.parts["tokenizer_2" if family == "flux" else "tokenizer_3"]).__name__.startswith("T5")
    rc, _, err = run_cli(capsys, "train-teacher", "--dataset", "emoji", "--family", family,
                         "--out", str(tmp_path / "x"), "--steps", "1")
    assert rc != 0 and "--vae-from" in err


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_shipped_flow_teachers_and_lcm_loras_give_diffusers_images(family):
    """models/emoji-flux and emoji-sd3 run in FluxPipeline / StableDiffusion3Pipeline, and with FlowMatchLCMScheduler
    their shipped LCM-LoRAs, giving fewstep's images (the issue's "done when")."""
    from diffusers import FlowMatchLCMScheduler

    from fewstep.cli import shipped_models_dir
    from fewstep.models.loras import load_with_loras

    folder = shipped_models_dir() / f"emoji-{family}"
    lora = shipped_models_dir() / f"emoji-{family}-lcm-lora"
    length = load_model(folder).conditioner.lengths[-1]
    ours = generate_latent(load_model(folder), PROMPTS, steps=4, sampler="euler", guidance_scale=3.0, seed=5)
    theirs = _pipe_images(_pipe(folder), family, 4, 3.0, 5, length)
    assert torch.allclose(ours, theirs, atol=2e-3), (ours - theirs).abs().max()
    accel = load_with_loras(folder, [str(lora)])
    assert accel.config.kind == "consistency"
    base_noise = accel.step_noise
    accel.step_noise = lambda g: base_noise(torch.Generator().manual_seed(11))   # the pipelines' global-RNG noise
    ours = generate_latent(accel, PROMPTS, steps=4, guidance_scale=1.0, seed=3)
    pipe = _pipe(folder)
    pipe.scheduler = FlowMatchLCMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(lora)
    torch.manual_seed(11)
    kw = {"true_cfg_scale": 1.0} if family == "flux" else {"guidance_scale": 1.0}
    theirs = _pipe_images(pipe, family, 4, 1.0, 3, length, **kw)
    assert torch.allclose(ours, theirs, atol=2e-3), (ours - theirs).abs().max()


def test_sd3_without_t5_is_diffusers_sd3_without_t5(tmp_path):
    """An SD3 folder without text_encoder_3 (as diffusers allows): the T5 tokens are zeros of the joint attention
    width, 256 of them (StableDiffusion3Pipeline's default max_sequence_length), and the images are the pipeline's."""
    import shutil

    folder = save_tiny_flow(tmp_path / "sd3", "sd3", shift=3.0)
    for part in ("text_encoder_3", "tokenizer_3"):
        shutil.rmtree(folder / part)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "text_encoder_3": [None, None],
                                                         "tokenizer_3": [None, None]}))
    model = load_model(folder)
    assert "text_encoder_3" not in model.parts
    ours = generate_latent(model, PROMPTS, steps=4, sampler="euler", guidance_scale=3.0, seed=5)
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    theirs = _pipe_images(pipe, "sd3", 4, 3.0, 5, length=256)
    assert torch.allclose(ours, theirs, atol=2e-3), (ours - theirs).abs().max()
