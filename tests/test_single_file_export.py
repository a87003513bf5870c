"""Single-file export (issue 31, item 3b): ``fewstep export --single-file`` and ``fewstep lora merge ...
--single-file`` write the original-format (LDM) checkpoint of a pipeline that diffusers' own reader
(``from_single_file`` with the folder as its local config) and fewstep's ``--model FILE`` load back as the same
pipeline: the same weights exactly, the same images for the same seed; every UNet weight where ComfyUI's own map
(comfy/utils.py unet_to_diffusers, replayed in test_lora_export_tools) looks for it. Written atomically, never over
an input."""

from __future__ import annotations

import pytest
import torch
from helpers import run_cli
from safetensors import safe_open
from safetensors.torch import load_file
from test_lora_export_tools import comfy_config, comfy_unet_to_diffusers

from fewstep.errors import FewstepError
from fewstep.models.folders import load_model, shipped_models_dir
from fewstep.models.single_file import _open_clip_encoder
from fewstep.models.single_file_export import write_single_file

MODELS = shipped_models_dir()
PROMPTS = ["red apple", "flag: Japan"]


def _diffusers_images(pipe, xl: bool) -> torch.Tensor:
    size = {"height": 32, "width": 32}
    return pipe(PROMPTS, num_inference_steps=4, guidance_scale=3.0, output_type="pt", **size,
                generator=torch.Generator().manual_seed(5)).images


def _same_parts(a, b, names) -> None:
    for name in names:
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        bad = [k for k in sa if not torch.equal(sa[k], sb[k])]
        assert not bad, (name, bad[:3])


@pytest.mark.parametrize("name", ["emoji-sd", "emoji-sdxl"])
def test_single_file_loads_in_diffusers_and_fewstep_as_the_folder(name, tmp_path, capsys):
    """The acceptance test: the shipped pipeline exported by the CLI, read by diffusers' from_single_file(file,
    config=folder, local_files_only=True): every part's weights equal the folder's and the images are the folder's
    (≤ 2/255; in fact equal); fewstep's --model FILE --config FOLDER samples the folder's images."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from fewstep.sampling.generate import generate_latent

    folder, out = MODELS / name, tmp_path / f"{name}.safetensors"
    rc, stdout, err = run_cli(capsys, "export", "--single-file", "--model", str(folder), "--out", str(out))
    assert rc == 0 and "AUTOMATIC1111" in stdout, err
    with safe_open(str(out), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert meta["fewstep_format"] == "ldm-single-file" and meta["fewstep_source"] == str(folder)
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner."))
               for k in keys)

    xl = name == "emoji-sdxl"
    unet = load_model(folder).unet
    written, right = load_file(out), comfy_unet_to_diffusers(comfy_config(dict(unet.config)))
    assert all(torch.equal(written["model.diffusion_model." + v], unet.state_dict()[k])      # where ComfyUI looks
               for k, v in right.items() if k in unet.state_dict())
    cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
    extra = {} if xl else {"safety_checker": None, "requires_safety_checker": False}
    reference = cls.from_pretrained(folder, **extra)
    if xl:
        # from_single_file picks a text encoder's converter by width; emoji-sdxl's two encoders are both 64 wide, so
        # it would fill text_encoder_2 with text_encoder's weights. Its second encoder is read here with diffusers'
        # own convert_open_clip_checkpoint, as fewstep's reader does (single_file._open_clip_encoder).
        extra["text_encoder_2"] = _open_clip_encoder(out, folder, torch.float32)
    single = cls.from_single_file(str(out), config=str(folder), local_files_only=True, **extra)
    _same_parts(reference, single, ("unet", "vae", "text_encoder") + (("text_encoder_2",) if xl else ()))
    ours, theirs = _diffusers_images(reference, xl), _diffusers_images(single, xl)
    assert (ours - theirs).abs().max() <= 2 / 255

    model = load_model(folder)
    loaded = load_model(out, config=folder)
    assert loaded.config.prediction_type == model.config.prediction_type
    assert torch.equal(generate_latent(loaded, PROMPTS, steps=2, guidance_scale=3.0, seed=3),
                       generate_latent(model, PROMPTS, steps=2, guidance_scale=3.0, seed=3))


def test_lora_merge_single_file_is_the_merged_pipeline_in_one_file(tmp_path, capsys):
    """``lora merge --single-file``: the LCM-LoRA fused into emoji-sd, as one file, holds the merged folder's
    weights (read by fewstep and diffusers), says it is an LCM, and fewstep samples it as one."""
    from fewstep.sampling.generate import generate_latent

    base, lora = MODELS / "emoji-sd", MODELS / "emoji-lcm-lora"
    merged, out = tmp_path / "merged", tmp_path / "merged.safetensors"
    rc, _, err = run_cli(capsys, "lora", "merge", "--base", str(base), "--lora", f"{lora}:1.0", "--out", str(merged))
    assert rc == 0, err
    rc, stdout, err = run_cli(capsys, "lora", "merge", "--base", str(base), "--lora", f"{lora}:1.0",
                              "--single-file", "--out", str(out))
    assert rc == 0 and "LCM" in stdout, err
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["fewstep_kind"] == "lcm"
    folder, single = load_model(merged), load_model(out, config=merged)
    _same_parts(folder, single, ("unet",))
    assert torch.equal(single.parts["vae"].state_dict()["decoder.conv_out.bias"],
                       folder.parts["vae"].state_dict()["decoder.conv_out.bias"])
    assert single.config.is_lcm
    assert torch.equal(generate_latent(single, PROMPTS, steps=2, seed=3),
                       generate_latent(folder, PROMPTS, steps=2, seed=3))
    base_unet = load_model(base).unet.state_dict()
    assert any(not torch.equal(v, single.unet.state_dict()[k]) for k, v in base_unet.items())   # the LoRA is in


def test_dtype_and_what_is_refused(tmp_path, capsys):
    """--dtype fp16 writes fp16 weights; an existing file needs --overwrite (and is left as it was without);
    an output that is an input, a pixel model, an LCD LCM (guidance embedding) and a non-.safetensors name are
    refused in one line, before anything is written."""
    sd = MODELS / "emoji-sd"
    half = tmp_path / "half.safetensors"
    rc, _, err = run_cli(capsys, "export", "--single-file", "--model", str(sd), "--out", str(half), "--dtype", "fp16")
    assert rc == 0, err
    assert {v.dtype for v in load_file(half).values()} == {torch.float16}
    before = half.read_bytes()
    rc, _, err = run_cli(capsys, "export", "--single-file", "--model", str(sd), "--out", str(half))
    assert rc == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert half.read_bytes() == before
    rc, _, err = run_cli(capsys, "export", "--single-file", "--model", str(half), "--config", str(sd), "--out",
                         str(half), "--overwrite")
    assert rc == 2 and "an input of this command" in err and half.read_bytes() == before
    rc, _, err = run_cli(capsys, "export", "--single-file", "--model", str(sd), "--out", str(half), "--overwrite")
    assert rc == 0 and load_file(half)["first_stage_model.decoder.conv_out.bias"].dtype == torch.float32, err
    assert not list(tmp_path.glob(".*tmp*"))
    for model, match in ((MODELS / "digits-teacher", "pixel model"),
                         (MODELS / "emoji-lcm", "guidance-scale embedding")):
        rc, _, err = run_cli(capsys, "export", "--single-file", "--model", str(model), "--out",
                             str(tmp_path / "x.safetensors"))
        assert rc == 2 and match in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    rc, _, err = run_cli(capsys, "export", "--single-file", "--model", str(sd), "--out", str(tmp_path / "x.ckpt"))
    assert rc == 2 and "must end in .safetensors" in err
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "x.ckpt").exists()
    rc, _, err = run_cli(capsys, "lora", "merge", "--base", str(sd), "--lora", str(MODELS / "emoji-lcm-lora"),
                         "--no-fuse", "--single-file", "--out", str(tmp_path / "y.safetensors"))
    assert rc == 2 and "choose one" in err
    with pytest.raises(FewstepError, match="exists"):
        write_single_file(load_model(sd), half)


def test_a_full_disk_is_one_line_and_keeps_the_old_file(tmp_path, capsys, monkeypatch):
    """Out of space halfway through the file: one line, the previous file intact, no temporary left."""
    from test_never_destroy import _disk_full, one_line

    out = tmp_path / "sd.safetensors"
    rc, _, err = run_cli(capsys, "export", "--single-file", "--model", str(MODELS / "emoji-sd"), "--out", str(out))
    assert rc == 0, err
    before = out.read_bytes()
    with monkeypatch.context() as m:
        _disk_full(m)
        rc, _, err = run_cli(capsys, "lora", "merge", "--base", str(MODELS / "emoji-sd"), "--lora",
                             str(MODELS / "emoji-lcm-lora"), "--single-file", "--out", str(out), "--overwrite")
    lines = one_line(err)
    assert rc == 2 and len(lines) == 1 and "no space left" in lines[0].lower(), err
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["sd.safetensors"]


@pytest.mark.parametrize("name,kind", [("sd-v1-5", "v1"), ("sdxl-base", "xl_base")])
def test_full_size_files_are_what_diffusers_infers_and_converts(name, kind):
    """The published SD 1.5 and SDXL architectures (built on the meta device: shapes, no weights): diffusers' type
    inference names the written file's type, fewstep picks the shipped config for it, and diffusers' converters
    (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint,
    convert_open_clip_checkpoint) give back every weight of every part under its diffusers name and shape."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from fewstep.models.ldm_keys import (
        CLIP_XL_1,
        clip_to_original,
        open_clip_to_original,
        unet_to_original,
        vae_to_original,
    )
    from fewstep.models.single_file import CONFIGS, SHIPPED, _check_config_fits, checkpoint_type

    folder = CONFIGS / name
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2")) \
            if kind == "xl_base" else None
    file = {**unet_to_original(unet.state_dict(), unet.config), **vae_to_original(vae.state_dict(), vae.config)}
    file.update(clip_to_original(text.state_dict(), CLIP_XL_1) if text_2 is not None
                else clip_to_original(text.state_dict()))
    if text_2 is not None:
        file.update(open_clip_to_original(text_2.state_dict()))
    assert checkpoint_type(folder, file) == kind and SHIPPED[kind] == name
    assert _check_config_fits(folder, file, folder) == (kind == "xl_base")

    def same(converted: dict, module: torch.nn.Module) -> None:
        want = {k: tuple(v.shape) for k, v in module.state_dict().items() if "position_ids" not in k}
        assert {k: tuple(v.shape) for k, v in converted.items()} == want

    same(convert_ldm_unet_checkpoint(file, dict(unet.config)), unet)
    same(convert_ldm_vae_checkpoint(file, dict(vae.config)), vae)
    prefix = CLIP_XL_1 if text_2 is not None else "cond_stage_model.transformer."
    clip = convert_ldm_clip_checkpoint({k: v for k, v in file.items() if k.startswith(prefix)}, prefix)
    same({k.removeprefix("text_model."): v for k, v in clip.items()}, text)   # transformers 5: no text_model.
    if text_2 is not None:
        same(convert_open_clip_checkpoint(text_2, file, prefix="conditioner.embedders.1.model."), text_2)
