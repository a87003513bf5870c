"""The tiny decoder (TAESD-style ``AutoencoderTiny``): the recipe writes a folder diffusers loads as
``AutoencoderTiny`` and fewstep's ``--tiny-vae`` takes; the shipped ``emoji-tiny-vae`` stands in for
``emoji-sd``'s VAE inside diffusers' own LatentConsistencyModelPipeline with fewstep's images, stays close to
the VAE it was distilled from, and a tiny VAE that does not fit is one clear error."""

import json
import warnings

import pytest
import torch
from helpers import run_cli, tiny_data

from fewstep.methods.tiny_vae import TinyVAESettings, distill_tiny_vae
from fewstep.models.folders import load_model, shipped_models_dir
from fewstep.models.tiny_vae import with_tiny_vae
from fewstep.sampling.generate import generate
from fewstep.training import TrainConfig

MODELS = shipped_models_dir()


@pytest.fixture(scope="module")
def tiny_vae_folder(tiny_sd, tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-vae")
    config = TrainConfig(out_dir=str(root / "run"), max_steps=3, batch_size=8, warmup_steps=1, progress=False)
    return distill_tiny_vae(load_model(tiny_sd), tiny_data(), root / "tiny-vae", config,
                            TinyVAESettings(width=8, decoder_blocks=(1, 1, 0), encoder_blocks=(1, 0, 0)))


def test_recipe_writes_an_autoencoder_tiny_folder_diffusers_loads_quietly(tiny_vae_folder, tiny_sd):
    from diffusers import AutoencoderTiny
    from diffusers.utils import logging

    logging.set_verbosity_warning()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny = AutoencoderTiny.from_pretrained(tiny_vae_folder)
    assert tiny.config.scaling_factor == 1.0 and list(tiny.config.block_out_channels) == [8, 8, 8]
    info = json.loads((tiny_vae_folder / "fewstep.json").read_text())
    assert info["kind"] == "tiny-vae" and info["training"]["steps"] == 3
    model = with_tiny_vae(load_model(tiny_sd), tiny_vae_folder)
    images = generate(model, ["red apple"], num=2, steps=2, seed=0)
    assert images.shape == (2, 3, 32, 32) and images.abs().max() <= 1
    latents = model.codec.encode(images)
    assert latents.shape == (2, 4, 8, 8)


def test_sample_and_eval_take_tiny_vae(tiny_vae_folder, tiny_sd, tmp_path, capsys):
    out = tmp_path / "grid.png"
    code, stdout, err = run_cli(capsys, "sample", "--model", str(tiny_sd), "--tiny-vae", str(tiny_vae_folder),
                                "--prompt", "red apple", "--num", "2", "--steps", "2", "--out", str(out))
    assert code == 0 and out.exists(), err
    code, _, err = run_cli(capsys, "sample", "--model", str(MODELS / "digits-cd"), "--tiny-vae", str(tiny_vae_folder),
                           "--out", str(tmp_path / "x.png"))
    assert code == 2 and "pixel-space model" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "eval", "--model", str(MODELS / "emoji-lcm"), "--tiny-vae", str(tiny_sd / "vae"))
    assert code == 2 and "holds a AutoencoderKL, not an AutoencoderTiny" in err
    code, _, err = run_cli(capsys, "eval", "--model", str(MODELS / "emoji-lcm"), "--tiny-vae", str(tmp_path / "none"))
    assert code == 2 and "not an AutoencoderTiny folder" in err


def test_a_tiny_vae_for_another_pipeline_is_refused(tiny_sd, tmp_path):
    from fewstep.errors import FewstepError
    from fewstep.nets.tiny_vae import build_tiny_vae

    build_tiny_vae(4, 2, 8, (1, 0), (1, 0)).save_pretrained(tmp_path / "x2")
    with pytest.raises(FewstepError, match="made for another pipeline"):
        with_tiny_vae(load_model(tiny_sd), tmp_path / "x2")


@pytest.fixture(scope="module")
def shipped():
    if not (MODELS / "emoji-tiny-vae").is_dir():
        pytest.skip("models/emoji-tiny-vae is not there")
    return load_model(MODELS / "emoji-lcm"), MODELS / "emoji-tiny-vae"


def test_shipped_tiny_vae_runs_in_diffusers_lcm_pipeline_with_fewsteps_images(shipped):
    from diffusers import AutoencoderTiny, LatentConsistencyModelPipeline

    lcm, folder = shipped
    pipe = LatentConsistencyModelPipeline.from_pretrained(lcm.path, safety_checker=None, requires_safety_checker=False)
    pipe.vae = AutoencoderTiny.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(["red apple", "dog face"], num_inference_steps=4, guidance_scale=3.0, height=32, width=32,
                  generator=torch.Generator().manual_seed(0), output_type="pt").images * 2 - 1
    ours = generate(with_tiny_vae(lcm, folder), ["red apple", "dog face"], steps=4, guidance_scale=3.0, seed=0)
    assert (theirs - ours).abs().max() < 2e-3


def test_shipped_tiny_vae_stays_close_to_the_vae_it_was_distilled_from(shipped):
    from fewstep.models.data import load_emoji

    lcm, folder = shipped
    tiny = with_tiny_vae(lcm, folder)
    images = load_emoji().images[::37]
    latents = lcm.codec.encode(images)
    full, small = lcm.codec.decode(latents), tiny.codec.decode(latents)
    assert (full - small).abs().mean() < 0.06           # in [−1, 1] (the shipped one: 0.041; an untrained one ~0.5)
    assert (tiny.codec.encode(images) - latents).square().mean() < 0.02
