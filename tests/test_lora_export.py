"""LoRA export for other tools (kohya/A1111/ComfyUI, diffusers, peft) and what a LoRA file says it is:
``fewstep lora export``, the safetensors metadata save_lora and the exporter write, a bare LCM-LoRA file
sampled with LCM's sampler, ``PATH[:WEIGHT][:lcm]`` for a file that says nothing (issue 15)."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
from helpers import run_cli

from fewstep.errors import FewstepError
from fewstep.models.folders import load_model as load_latent_model

PROMPTS = ["red apple", "flag: Japan"]


def fewstep_images(tiny_sd, lora, steps: int = 2) -> torch.Tensor:
    """Images of ``tiny_sd`` with ``lora`` (a path, or a spec string) fused, on the model's own sampler."""
    from fewstep.models.loras import apply_loras, parse_lora_spec
    from fewstep.sampling.generate import generate_latent

    model = apply_loras(load_latent_model(tiny_sd), [parse_lora_spec(str(lora))])
    return generate_latent(model, PROMPTS, steps=steps, seed=3)


def diffusers_images(tiny_sd, lora) -> torch.Tensor:
    """diffusers' StableDiffusionPipeline + load_lora_weights(lora) + LCMScheduler, 2 steps."""
    from diffusers import LCMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps=50)
    if lora.is_dir():
        pipe.load_lora_weights(str(lora))
    else:
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    return pipe(PROMPTS, num_inference_steps=2, guidance_scale=1.0, height=32, width=32, output_type="pt",
                generator=torch.Generator().manual_seed(3)).images


def fused(tiny_sd, lora) -> dict:
    from fewstep.models.loras import apply_loras

    return apply_loras(load_latent_model(tiny_sd), [(lora, 1.0)]).unet.state_dict()


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, worst


def test_save_lora_records_what_it_is_in_the_file(tiny_sd, tiny_lcm_lora):
    from fewstep.models.loras import LORA_FILE, metadata_info

    assert metadata_info(tiny_lcm_lora / LORA_FILE) == {
        "kind": "lcm-lora", "original_inference_steps": 50, "rank": 2, "alpha": 2.0, "base": str(tiny_sd),
        "format": "diffusers"}
    from safetensors import safe_open
    with safe_open(str(tiny_lcm_lora / LORA_FILE), framework="pt") as f:
        assert f.metadata()["format"] == "pt"               # diffusers' own entry kept


def test_kohya_export_loads_in_fewstep_and_diffusers_as_the_folder(tiny_sd, tiny_lcm_lora, tmp_path):
    """The kohya file: kohya-ss keys with α = rank, the same fused UNet in fewstep, the same images in
    diffusers' load_lora_weights (which reads kohya keys) as the fewstep folder, and a bare LCM-LoRA still."""
    from safetensors.torch import load_file

    from fewstep.models.lora_export import export_lora
    from fewstep.models.loras import LORA_FILE, metadata_info

    out = export_lora(tiny_lcm_lora, "kohya", tmp_path / "kohya.safetensors")
    state, source = load_file(out), load_file(tiny_lcm_lora / LORA_FILE)
    downs = [k for k in state if k.endswith(".lora_down.weight")]
    assert all(k.startswith("lora_unet_") and k.count(".") == (1 if k.endswith(".alpha") else 2) for k in state)
    assert len(downs) == len(source) // 2 == sum(k.endswith(".lora_up.weight") for k in state)
    assert {state[k.split(".")[0] + ".alpha"].item() for k in downs} == {2.0}
    assert any("attn1_to_q" in k for k in downs) and any("time_emb_proj" in k for k in downs)
    assert metadata_info(out) == {**metadata_info(tiny_lcm_lora / LORA_FILE), "format": "kohya"}
    assert_same_weights(fused(tiny_sd, out), fused(tiny_sd, tiny_lcm_lora))
    ours, theirs = diffusers_images(tiny_sd, tiny_lcm_lora), diffusers_images(tiny_sd, out)
    assert (ours - theirs).abs().max() <= 1e-5
    assert torch.equal(fewstep_images(tiny_sd, out), fewstep_images(tiny_sd, tiny_lcm_lora))
    bare = fewstep_images(tiny_sd, out)
    assert (bare - (ours * 2 - 1)).abs().max() <= 2e-3       # LCM's sampler: diffusers' LCMScheduler images


def test_diffusers_and_peft_exports_load_where_they_are_meant_to(tiny_sd, tiny_lcm_lora, tmp_path):
    import copy
    import json

    from peft import PeftModel
    from safetensors.torch import load_file

    from fewstep.models.lora_export import export_lora
    from fewstep.models.loras import LORA_FILE, metadata_info

    out = export_lora(tiny_lcm_lora / LORA_FILE, "diffusers", tmp_path / "d.safetensors")
    assert load_file(out).keys() == load_file(tiny_lcm_lora / LORA_FILE).keys()
    assert metadata_info(out)["format"] == "diffusers" and metadata_info(out)["kind"] == "lcm-lora"
    assert (diffusers_images(tiny_sd, out) - diffusers_images(tiny_sd, tiny_lcm_lora)).abs().max() <= 1e-5
    one = export_lora(tiny_lcm_lora, "peft", tmp_path / "p.safetensors")
    assert all(k.startswith("base_model.model.") and ".lora_" in k for k in load_file(one))
    folder = export_lora(tiny_lcm_lora, "peft", tmp_path / "peft")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 2 and config["peft_type"] == "LORA"
    assert load_file(folder / "adapter_model.safetensors").keys() == load_file(one).keys()
    base = load_latent_model(tiny_sd).unet
    peft_unet = PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).merge_and_unload()
    assert_same_weights(peft_unet.state_dict(), fused(tiny_sd, tiny_lcm_lora))


def test_fewstep_reads_its_own_peft_exports_with_their_alpha(tiny_sd, tiny_lcm_lora, tmp_path):
    """--lora takes peft's layout (issue 31: it was refused as "made for another base model?"): the file and the
    save_pretrained folder fuse to the same UNet as the fewstep folder, and a peft folder whose α ≠ r (α in
    adapter_config.json, none in the file) has α/r folded in."""
    import json

    from safetensors.torch import load_file, save_file

    from fewstep.models.lora_export import export_lora

    one = export_lora(tiny_lcm_lora, "peft", tmp_path / "p.safetensors")
    folder = export_lora(tiny_lcm_lora, "peft", tmp_path / "peft")
    reference = fused(tiny_sd, tiny_lcm_lora)
    assert_same_weights(fused(tiny_sd, one), reference)
    assert_same_weights(fused(tiny_sd, folder), reference)
    state = load_file(folder / "adapter_model.safetensors")          # the same ΔW as α = 4, r = 2, B halved
    scaled = tmp_path / "scaled"
    scaled.mkdir()
    save_file({k: v / 2 if k.endswith("lora_B.weight") else v for k, v in state.items()},
              str(scaled / "adapter_model.safetensors"))             # no metadata: α from the config
    config = json.loads((folder / "adapter_config.json").read_text())
    (scaled / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 2 * config["r"]}))
    assert_same_weights(fused(tiny_sd, scaled), reference)


def test_a_bare_lcm_lora_file_is_sampled_as_an_lcm(tiny_sd, tiny_lcm_lora, tmp_path):
    """The LoRA's file copied out of its folder says it is an LCM-LoRA (its metadata): LCM's sampler, the
    folder's images; with no metadata it warns once, counts as a style LoRA, and ``:lcm`` declares it."""
    from safetensors.torch import load_file, save_file

    from fewstep.models.loras import LORA_FILE, apply_loras, parse_lora_spec

    bare = tmp_path / "lcm.safetensors"
    shutil.copy2(tiny_lcm_lora / LORA_FILE, bare)
    model = apply_loras(load_latent_model(tiny_sd), [(bare, 1.0)])
    assert model.config.is_lcm and model.config.original_inference_steps == 50
    assert model.config.loras[-1]["kind"] == "lcm-lora"
    folder = fewstep_images(tiny_sd, tiny_lcm_lora)
    assert torch.equal(fewstep_images(tiny_sd, bare), folder)
    unknown = tmp_path / "downloaded.safetensors"
    save_file(load_file(bare), unknown)                       # the same weights, no metadata: says nothing
    with pytest.warns(UserWarning, match=r"treated as a style LoRA.*:lcm") as caught:
        plain = apply_loras(load_latent_model(tiny_sd), [(unknown, 1.0)])
    assert len([w for w in caught if "style LoRA" in str(w.message)]) == 1
    assert not plain.config.is_lcm and plain.config.default_sampler == "dpmpp-2m"
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # declared: no warning
        assert torch.equal(fewstep_images(tiny_sd, f"{unknown}:1:lcm"), folder)
        assert torch.equal(fewstep_images(tiny_sd, f"{unknown}:lcm"), folder)
        assert not apply_loras(load_latent_model(tiny_sd), [parse_lora_spec(f"{unknown}:0.5:style")]).config.is_lcm
    declared = parse_lora_spec(f"{unknown}:0.5:lcm")
    assert declared == (unknown, 0.5) and declared.kind == "lcm-lora" and parse_lora_spec(str(unknown)).kind is None
    with pytest.raises(FewstepError, match="records that it is kind 'lcm-lora'"):
        apply_loras(load_latent_model(tiny_sd), [parse_lora_spec(f"{bare}:style")])


def test_export_refuses_to_replace_without_overwrite(tiny_lcm_lora, tmp_path):
    from fewstep.models.lora_export import export_lora

    out = tmp_path / "k.safetensors"
    out.write_bytes(b"the user's file")
    with pytest.raises(FewstepError, match="exists.*--overwrite"):
        export_lora(tiny_lcm_lora, "kohya", out)
    assert out.read_bytes() == b"the user's file"
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("keep")
    with pytest.raises(FewstepError, match="exists.*--overwrite"):
        export_lora(tiny_lcm_lora, "peft", tmp_path / "theirs")
    assert (tmp_path / "theirs" / "notes.txt").read_text() == "keep"
    export_lora(tiny_lcm_lora, "kohya", out, overwrite=True)
    assert out.read_bytes() != b"the user's file" and not list(tmp_path.glob(".*tmp*"))
    export_lora(tiny_lcm_lora, "peft", tmp_path / "theirs", overwrite=True)
    assert (tmp_path / "theirs" / "notes.txt").read_text() == "keep"          # --overwrite keeps the user's files
    assert (tmp_path / "theirs" / "adapter_config.json").exists()
    with pytest.raises(FewstepError, match="must end in .safetensors"):
        export_lora(tiny_lcm_lora, "kohya", tmp_path / "folder")
    with pytest.raises(FewstepError, match="already in kohya's layout"):
        export_lora(out, "diffusers", tmp_path / "again.safetensors")


def test_cli_lora_export_and_a_declared_bare_lora(tiny_sd, tiny_lcm_lora, tmp_path, capsys):
    """``fewstep lora export``: writes, refuses to replace, replaces with --overwrite; a set keeps a bare
    file declared ``:lcm`` an LCM-LoRA."""
    from safetensors.torch import load_file, save_file

    from fewstep.models.loras import apply_loras, lora_info

    out = tmp_path / "k.safetensors"
    rc, stdout, err = run_cli(capsys, "lora", "export", str(tiny_lcm_lora), "--format", "kohya", "--out", str(out))
    assert rc == 0 and "lcm-lora" in stdout and "AUTOMATIC1111" in stdout, err
    assert any(k.startswith("lora_unet_") for k in load_file(out))
    rc, _, err = run_cli(capsys, "lora", "export", str(tiny_lcm_lora), "--format", "kohya", "--out", str(out))
    assert rc == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    rc, _, err = run_cli(capsys, "lora", "export", str(tiny_lcm_lora), "--format", "kohya", "--out", str(out),
                         "--overwrite")
    assert rc == 0, err
    rc, _, err = run_cli(capsys, "lora", "export", str(tiny_lcm_lora), "--format", "a1111", "--out", str(out))
    assert rc == 2 and "invalid choice" in err
    unknown = tmp_path / "downloaded.safetensors"
    save_file(load_file(out), unknown)                        # kohya keys, no metadata
    rc, _, err = run_cli(capsys, "lora", "merge", "--no-fuse", "--base", str(tiny_sd), "--lora", f"{unknown}:1:lcm",
                         "--out", str(tmp_path / "set"))
    assert rc == 0, err
    assert [e["kind"] for e in lora_info(tmp_path / "set")["loras"]] == ["lcm-lora"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert apply_loras(load_latent_model(tiny_sd), [(tmp_path / "set", 1.0)]).config.is_lcm
    rc, _, err = run_cli(capsys, "sample", "--model", str(tiny_sd), "--lora", f"{unknown}:lcm", "--prompt", "red apple",
                         "--steps", "2", "--num", "2", "--out", str(tmp_path / "a.png"))
    assert rc == 0 and (tmp_path / "a.png").exists(), err
