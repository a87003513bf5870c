"""Sampling as diffusers users expect (issue 15, "Sampling habits"): a negative prompt and a non-square size that
give StableDiffusion(XL)Pipeline's images, a prompts file, a batch size that never changes an image, one PNG per
image at native resolution with how it was made in its metadata, and the seed → image rule."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import run_cli, save_tiny_sdxl, tiny_digits_models
from PIL import Image

from fewstep.errors import FewstepError
from fewstep.models.folders import load_model
from fewstep.sampling.generate import generate, generate_latent

PROMPTS = ["red apple", "grinning face"]
NEGATIVE = "green apple"


def _pipe(folder, cls: str = "StableDiffusionPipeline"):
    """diffusers' pipeline of ``folder`` with the scheduler that is fewstep's "euler" on its trailing grid."""
    import diffusers
    from diffusers import EulerDiscreteScheduler

    pipe = getattr(diffusers, cls).from_pretrained(folder)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    return pipe


def _theirs(pipe, seed: int = 3, negative_prompt: str | None = None, **kwargs) -> torch.Tensor:
    negative = None if negative_prompt is None else [negative_prompt] * len(PROMPTS)   # diffusers: a list for a list
    out = pipe(PROMPTS, negative_prompt=negative, num_inference_steps=4, guidance_scale=3.0, output_type="pt",
               generator=torch.Generator().manual_seed(seed), **kwargs).images
    return (out * 2 - 1).clamp(-1, 1)


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    """A random-weight SDXL-format folder with SDXL's default force_zeros_for_empty_prompt."""
    return save_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl", force_zeros=True)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tiny_digits_models(root)
    return root / "digits-teacher"


# --- the negative prompt and the size, against diffusers ----------------------------------------------------
def test_negative_prompt_gives_stable_diffusion_pipelines_images(tiny_sd):
    model = load_model(tiny_sd)
    ours = generate_latent(model, PROMPTS, steps=4, sampler="euler", guidance_scale=3.0, seed=3,
                           negative_prompt=NEGATIVE)
    theirs = _theirs(_pipe(tiny_sd), negative_prompt=NEGATIVE, height=32, width=32)
    assert torch.allclose(ours, theirs, atol=3e-3), (ours - theirs).abs().max()
    plain = generate_latent(model, PROMPTS, steps=4, sampler="euler", guidance_scale=3.0, seed=3)
    assert (plain - ours).abs().max() > 2e-2          # the negative prompt replaced the empty one
    each = generate_latent(model, PROMPTS, steps=4, sampler="euler", guidance_scale=3.0, seed=3,
                           negative_prompt=[NEGATIVE, ""])   # one per image: the empty one is no negative prompt
    assert torch.allclose(each[0], ours[0], atol=1e-5) and torch.allclose(each[1], plain[1], atol=1e-5)


def test_non_square_size_gives_stable_diffusion_pipelines_images(tiny_sd):
    model = load_model(tiny_sd)
    ours = generate_latent(model, PROMPTS, steps=4, sampler="euler", guidance_scale=3.0, seed=3, height=32, width=48,
                           negative_prompt=NEGATIVE)
    assert ours.shape == (2, 3, 32, 48)
    theirs = _theirs(_pipe(tiny_sd), negative_prompt=NEGATIVE, height=32, width=48)
    assert torch.allclose(ours, theirs, atol=3e-3), (ours - theirs).abs().max()


def test_sdxl_negative_prompt_and_size_give_the_sdxl_pipelines_images(tiny_sdxl):
    """The negative prompt's own hidden states and pooled embedding replace force_zeros' zeros, and the time ids
    are the requested size's (original = target = 32×48, no crop), as StableDiffusionXLPipeline does."""
    model = load_model(tiny_sdxl)
    assert model.conditioner.force_zeros
    assert model.conditioner(["red apple"], size=(32, 48))["time_ids"].tolist() == [[32, 48, 0, 0, 32, 48]]
    pipe = _pipe(tiny_sdxl, "StableDiffusionXLPipeline")
    for size, negative in (((32, 48), NEGATIVE), ((32, 48), None), ((32, 32), NEGATIVE)):
        ours = generate_latent(model, PROMPTS, steps=4, sampler="euler", guidance_scale=3.0, seed=5,
                               negative_prompt=negative, height=size[0], width=size[1])
        theirs = _theirs(pipe, seed=5, negative_prompt=negative, height=size[0], width=size[1])
        assert torch.allclose(ours, theirs, atol=3e-3), (size, negative, (ours - theirs).abs().max())


def test_sizes_that_cannot_be_sampled_are_refused(tiny_sd, digits):
    model = load_model(tiny_sd)                       # VAE factor 4
    with pytest.raises(FewstepError, match="width 30 not a multiple of 4"):
        generate_latent(model, PROMPTS, steps=1, height=32, width=30)
    pixel = load_model(digits)
    with pytest.raises(FewstepError, match="pixel model of 16×16 images only"):
        generate(pixel, [1], steps=1, height=32)
    assert generate(pixel, [1], steps=1, height=16, width=16).shape == (1, 1, 16, 16)   # its own size is fine
    with pytest.raises(FewstepError, match="img2img keeps their size"):
        generate_latent(model, ["red apple"], steps=2, init_images=torch.zeros(1, 3, 32, 32), strength=0.5, width=48)


def test_a_negative_prompt_without_an_unconditional_branch_is_refused(tiny_sd, digits):
    """diffusers silently ignores negative_prompt for an LCM (guidance as an input) or at guidance ≤ 1."""
    from fewstep.nets.guided import w_conditioned_unet

    model = load_model(tiny_sd)
    lcm = model.derive(net=w_conditioned_unet(model.unet, 64), config=model.replace_config(
        parameterization="lcm", kind="consistency", default_sampler="consistency", guidance_range=[1.0, 8.0]))
    assert lcm.takes_guidance
    with pytest.raises(FewstepError, match="takes the guidance scale as an input.*diffusers ignores"):
        generate_latent(lcm, PROMPTS, steps=2, guidance_scale=4.0, negative_prompt=NEGATIVE)
    with pytest.raises(FewstepError, match="guidance scale 1 there is no unconditional branch"):
        generate_latent(model, PROMPTS, steps=2, guidance_scale=1.0, negative_prompt=NEGATIVE)
    with pytest.raises(FewstepError, match="one negative prompt or one per image"):
        generate_latent(model, PROMPTS, steps=2, negative_prompt=["a", "b", "c"])
    with pytest.raises(FewstepError, match="not a text-to-image pipeline"):
        generate(load_model(digits), [1], steps=1, negative_prompt=NEGATIVE)


# --- batch size and seeds ---------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["euler", "ddpm"])
def test_batch_size_never_changes_an_image(tiny_sd, sampler):
    """--batch-size splits the network and VAE calls only: the same images, for a stochastic sampler too."""
    model = load_model(tiny_sd)
    prompts = ["red apple", "grinning face", "flag: Japan"]
    whole = generate_latent(model, prompts, steps=3, sampler=sampler, guidance_scale=3.0, seed=1,
                            negative_prompt=NEGATIVE)
    rows = []
    hook = model.unet.register_forward_pre_hook(lambda m, args: rows.append(len(args[0])))
    try:
        split = generate_latent(model, prompts, steps=3, sampler=sampler, guidance_scale=3.0, seed=1,
                                negative_prompt=NEGATIVE, network_batch=2)
    finally:
        hook.remove()
    assert rows == [4, 2] * 3                         # 2 images and their 2 negative-prompt twins, then 1 + 1
    assert torch.allclose(split, whole, atol=1e-5, rtol=0), (split - whole).abs().max()   # float32 rounding only


def test_batch_size_on_a_pixel_model_and_the_cli(digits, tmp_path, capsys):
    model = load_model(digits)
    labels = torch.tensor([0, 3, 5, 7, 9])
    whole = generate(model, labels, steps=3, sampler="heun", guidance_scale=2.0, seed=2)
    assert torch.allclose(generate(model, labels, steps=3, sampler="heun", guidance_scale=2.0, seed=2, network_batch=2),
                          whole, atol=1e-5, rtol=0)
    outs = []
    for batch in ([], ["--batch-size", "1"]):
        outs.append(tmp_path / f"s{len(outs)}")
        rc, _, err = run_cli(capsys, "sample", "--model", str(digits), "--steps", "2", "--label", "1", "4",
                             "--num", "2", "--out-dir", str(outs[-1]), *batch)
        assert rc == 0, err
    pixels = [[np.array(Image.open(p)) for p in sorted(out.glob("*.png"))] for out in outs]
    assert len(pixels[0]) == 4 and all((a == b).all() for a, b in zip(*pixels))   # the same 8-bit images


def test_image_i_is_the_same_in_a_shorter_run(tiny_sd, digits):
    """The documented seed rule: image i's start noise is the i-th block of the seed's stream, so with a
    deterministic sampler the first k images of a run are a k-image run's."""
    model = load_model(tiny_sd)
    long = generate_latent(model, ["red apple"] * 3, steps=2, sampler="euler", guidance_scale=3.0, seed=9)
    short = generate_latent(model, ["red apple"] * 2, steps=2, sampler="euler", guidance_scale=3.0, seed=9)
    assert torch.allclose(long[:2], short, atol=1e-6) and not torch.allclose(long[0], long[1], atol=1e-2)
    pixel = load_model(digits)
    assert torch.allclose(generate(pixel, [4, 2], steps=2, seed=9)[0], generate(pixel, [4], steps=2, seed=9)[0],
                          atol=1e-5)


# --- the CLI: prompts file, per-image PNGs, metadata, refusals -----------------------------------------------
def _sample(capsys, tiny_sd, *argv):
    return run_cli(capsys, "sample", "--model", str(tiny_sd), "--steps", "2", "--sampler", "euler",
                   "--guidance-scale", "3", *argv)


def test_prompts_file_and_out_dir_write_one_png_per_image_with_its_record(tiny_sd, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# my prompts\nred apple\n\n   \nsmiling cat, café ☕\n  # indented comment\n", encoding="utf-8")
    rc, out, err = _sample(capsys, tiny_sd, "--prompts-file", str(prompts), "--num", "2", "--seed", "7",
                           "--negative-prompt", NEGATIVE, "--height", "32", "--width", "48", "--out-dir", "imgs")
    assert rc == 0, err
    assert not (tmp_path / "samples.png").exists()    # --out-dir alone writes no grid
    files = sorted((tmp_path / "imgs").glob("*.png"))
    assert [f.name for f in files] == ["00000.png", "00001.png", "00002.png", "00003.png"]
    model = load_model(tiny_sd)
    expected = generate_latent(model, ["red apple"] * 2 + ["smiling cat, café ☕"] * 2, steps=2, sampler="euler",
                               guidance_scale=3.0, seed=7, negative_prompt=NEGATIVE, height=32, width=48)
    for i, f in enumerate(files):
        im = Image.open(f)
        assert im.size == (48, 32)                      # native: no upscaling
        got = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1
        assert (got - expected[i]).abs().max() <= 1 / 127.5 + 1e-6
        record = json.loads(im.text["fewstep"])
        assert record["prompt"] == ("red apple" if i < 2 else "smiling cat, café ☕")
        assert record["negative_prompt"] == NEGATIVE and record["seed"] == 7 and record["index"] == i
        assert (record["steps"], record["sampler"], record["guidance_scale"]) == (2, "euler", 3.0)
        assert (record["width"], record["height"], record["model"]) == (48, 32, str(tiny_sd))
        assert "--prompts-file" in record["command"]
    params = Image.open(files[2]).text["parameters"].splitlines()
    assert params[0] == "smiling cat, café ☕" and params[1] == f"Negative prompt: {NEGATIVE}"
    assert params[2].startswith("Steps: 2, Sampler: euler, CFG scale: 3, Seed: 7, Image index: 2, Size: 48x32, ")


def test_grid_and_out_dir_together_and_overwriting(tiny_sd, tmp_path, capsys):
    grid, folder = tmp_path / "grid.png", tmp_path / "imgs"
    args = ("--prompt", "red apple", "--num", "3", "--out", str(grid), "--out-dir", str(folder))
    rc, out, err = _sample(capsys, tiny_sd, *args)
    assert rc == 0 and "wrote 3 samples to" in out and "wrote 3 images to" in out, err
    assert Image.open(grid).size == (4 * (3 * 33 + 1), 4 * 34)   # the grid, upscaled 4× as before
    assert [Image.open(p).size for p in sorted(folder.glob("*.png"))] == [(32, 32)] * 3
    before = (folder / "00000.png").read_bytes()
    rc, _, err = _sample(capsys, tiny_sd, *args, "--seed", "1")
    assert rc == 2 and "--out-dir" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert (folder / "00000.png").read_bytes() == before       # refused before any work: nothing touched
    rc, _, err = _sample(capsys, tiny_sd, *args, "--seed", "1", "--overwrite")
    assert rc == 0, err
    assert (folder / "00000.png").read_bytes() != before


def test_pixel_model_out_dir_records_the_label(digits, tmp_path, capsys):
    rc, _, err = run_cli(capsys, "sample", "--model", str(digits), "--steps", "1", "--label", "3", "--num", "1",
                         "--out-dir", str(tmp_path / "d"), "--scale", "8")
    assert rc == 0, err
    im = Image.open(tmp_path / "d" / "00000.png")
    assert im.size == (16, 16) and im.mode == "L"
    record = json.loads(im.text["fewstep"])
    assert record["label"] == 3 and record["class_name"] == "3" and "prompt" not in record
    assert im.text["parameters"].startswith("label 3 (3)\nSteps: 1, ")


@pytest.mark.parametrize("argv,fragment", [
    (["--prompt", "a", "--prompts-file", "p.txt"], "not both"),
    (["--prompts-file", "missing.txt"], "does not exist"),
    (["--prompts-file", "empty.txt"], "has no prompts"),
    (["--height", "30"], "height 30 not a multiple of 4"),
    (["--height", "4096"], "--allow-large"),
    (["--guidance-scale", "1", "--negative-prompt", "x"], "no unconditional branch"),
    (["--num", "1500", "--prompt", "a", "--prompt", "b"], "3,000 images"),
])
def test_cli_refusals_are_one_line(tiny_sd, tmp_path, capsys, monkeypatch, argv, fragment):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("a\n")
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    rc, _, err = run_cli(capsys, "sample", "--model", str(tiny_sd), "--steps", "1", *argv)
    assert rc == 2 and fragment in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "samples.png").exists()


def test_pixel_model_cli_refuses_another_size(digits, tmp_path, capsys):
    rc, _, err = run_cli(capsys, "sample", "--model", str(digits), "--steps", "1", "--width", "32",
                         "--out", str(tmp_path / "x.png"))
    assert rc == 2 and "pixel model of 16×16 images only" in err and not (tmp_path / "x.png").exists()
