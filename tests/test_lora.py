"""LCM-LoRA and LoRA arithmetic: diffusers' LoRA format, kohya loading, merging, bad input."""

from __future__ import annotations

import pytest
import torch
from helpers import CAPTIONS, TINY, caption_folder

from fewstep.errors import FewstepError
from fewstep.models.folders import load_model as load_latent_model


def test_lcm_lora_is_a_small_diffusers_lora_that_trained(tiny_sd, tiny_lcm_lora):
    from safetensors.torch import load_file

    from fewstep.models.loras import LORA_FILE, lora_info

    info = lora_info(tiny_lcm_lora)
    assert info["kind"] == "lcm-lora" and info["original_inference_steps"] == 50
    assert info["trainable_parameters"] < 0.1 * info["base_parameters"]
    state = load_file(tiny_lcm_lora / LORA_FILE)
    assert all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in state)
    up = [v for k, v in state.items() if "lora_B" in k]
    assert up and any(v.abs().max() > 0 for v in up)                             # B left zero-init: it trained
    assert any("time_emb_proj" in k for k in state) and any("conv1" in k for k in state)


def test_lcm_lora_target_is_a_second_adapter_that_equals_an_ema_copy(tiny_sd):
    """LCM-LoRA's EMA target network lives on the one UNet as a second adapter: the same losses, step by
    step, as the separate EMA copy consistency models use, while the objective holds only LoRA weights."""
    import copy

    from fewstep.nets.lora import EMAAdapter, add_lora, lora_parameters
    from fewstep.objectives.consistency import ConsistencyLoss, EMACopy
    from fewstep.objectives.curricula import Curriculum
    from fewstep.objectives.distances import get_distance

    teacher = load_latent_model(tiny_sd)
    torch.manual_seed(0)
    add_lora(teacher.unet, 2)
    base_size = sum(p.numel() for p in teacher.unet.parameters())
    unets = [copy.deepcopy(teacher.unet) for _ in range(2)]
    targets = [EMACopy(), EMAAdapter(unets[1])]
    batch = {"images": torch.randn(6, 4, 8, 8), "prompt_embeds": teacher.conditioner.encode(CAPTIONS[:6])}
    losses = []
    for unet, target in zip(unets, targets):
        lcm = teacher.replace_config(kind="consistency", parameterization="lcm")
        student = teacher.derive(net=unet.train(), config=lcm).denoiser   # LCM's scalings over the LoRA'd UNet
        objective = ConsistencyLoss(teacher.schedule, Curriculum.for_method("lcd", 10, skip=100, target_ema=0.5),
                                    get_distance("l2"), condition=teacher.conditioner.training_condition(0.0),
                                    target=target)
        opt = torch.optim.SGD(lora_parameters(unet, "default"), lr=0.5)
        torch.manual_seed(1)
        run = []
        for step in range(1, 4):
            loss, _ = objective(student, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            objective.after_step(student, step)
            run.append(loss.item())
        losses.append(run)
        held = sum(v.numel() for k, v in objective.state_dict().items() if k.startswith("target."))
        assert held >= base_size if isinstance(target, EMACopy) else held < base_size / 5
    assert losses[0][0] > 0 and losses[0][2] != losses[0][0]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-7)
    assert not any(".target." in k for k in targets[1].remove(unets[1]).state_dict())


def test_lcm_lora_gives_diffusers_images_with_lcm_scheduler(tiny_sd, tiny_lcm_lora):
    """fewstep (LoRA fused into the base) and diffusers (StableDiffusionPipeline + load_lora_weights +
    LCMScheduler) agree for the same seed."""
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from fewstep.models.loras import apply_loras
    from fewstep.sampling.generate import generate_latent

    model = apply_loras(load_latent_model(tiny_sd), [(tiny_lcm_lora, 1.0)])
    assert model.config.is_lcm and not model.takes_guidance
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps=50)
    pipe.load_lora_weights(str(tiny_lcm_lora))
    for steps in (1, 4):
        ours = generate_latent(model, ["red apple", "flag: Japan"], steps=steps, guidance_scale=1.0, seed=3)
        theirs = pipe(["red apple", "flag: Japan"], num_inference_steps=steps, guidance_scale=1.0, height=32, width=32,
                      output_type="pt", generator=torch.Generator().manual_seed(3)).images * 2 - 1
        assert torch.allclose(ours, theirs.clamp(-1, 1), atol=2e-3), (steps, (ours - theirs).abs().max())


def test_kohya_layout_loads_to_the_same_model(tiny_sd, tiny_lcm_lora, tmp_path):
    """The same adapter renamed to kohya/A1111 keys (lora_unet_…, lora_down/lora_up, .alpha) gives the same weights."""
    from safetensors.torch import load_file, save_file

    from fewstep.models.loras import LORA_FILE, apply_loras

    state = load_file(tiny_lcm_lora / LORA_FILE)
    kohya = {}
    for k, v in state.items():
        for marker, kind in ((".lora_A.", "down"), (".lora.down.", "down"), (".lora_B.", "up"), (".lora.up.", "up")):
            if marker in k:
                module = k[len("unet."):k.index(marker)]
                break
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.lora_{kind}.weight"] = v
        kohya[f"{name}.alpha"] = torch.tensor(float(v.shape[0] if kind == "down" else v.shape[1]))
    save_file(kohya, tmp_path / "kohya.safetensors")
    a = apply_loras(load_latent_model(tiny_sd), [(tiny_lcm_lora, 1.0)]).unet.state_dict()
    b = apply_loras(load_latent_model(tiny_sd), [(tmp_path / "kohya.safetensors", 1.0)]).unet.state_dict()
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_weights_scale_the_acceleration_vector(tiny_sd, tiny_lcm_lora):
    from fewstep.models.loras import apply_loras

    base = load_latent_model(tiny_sd).unet.state_dict()
    full = apply_loras(load_latent_model(tiny_sd), [(tiny_lcm_lora, 1.0)]).unet.state_dict()
    half = apply_loras(load_latent_model(tiny_sd), [(tiny_lcm_lora, 0.5)]).unet.state_dict()
    changed = [k for k in base if not torch.equal(base[k], full[k])]
    assert any("attn1.to_q" in k for k in changed) and any("conv1" in k for k in changed)  # every part loaded
    for k in changed:   # θ + 0.5·τ is halfway between θ and θ + τ
        assert torch.allclose(half[k], (base[k] + full[k]) / 2, atol=1e-5)


def test_lora_for_another_base_model_fails_before_any_weight_changes(tiny_lcm_lora, tmp_path):
    from helpers import save_pipeline

    from fewstep.models.loras import apply_loras
    from fewstep.nets.unets import (
        build_cond_unet,
        build_text_encoder,
        build_tokenizer,
        build_vae,
    )

    other = TINY.__class__(**{**TINY.__dict__, "unet_channels": (32, 32, 64)})
    tok = build_tokenizer(CAPTIONS, other.vocab_size, other.max_length)
    folder = save_pipeline(tmp_path / "other", build_cond_unet(other), build_vae(other), build_text_encoder(other, tok),
                           tok, {"kind": "diffusion"})
    model = load_latent_model(folder)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    with pytest.raises(FewstepError, match="does not fit|another base model"):
        apply_loras(model, [(tiny_lcm_lora, 1.0)])
    after = model.unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_lora_specs_are_checked(tiny_lcm_lora, tmp_path):
    from fewstep.models.loras import parse_lora_spec

    assert parse_lora_spec(f"{tiny_lcm_lora}:0.5") == (tiny_lcm_lora, 0.5)
    assert parse_lora_spec(str(tiny_lcm_lora)) == (tiny_lcm_lora, 1.0)
    with pytest.raises(FewstepError, match="not a number"):
        parse_lora_spec(f"{tiny_lcm_lora}:strong")
    with pytest.raises(FewstepError, match="does not exist"):
        parse_lora_spec(f"{tmp_path / 'missing'}:1")


def test_cli_style_lora_plus_lcm_lora_merge_and_sample(tiny_sd, tiny_lcm_lora, tmp_path, capsys):
    """train-lora → lora merge (style + acceleration) → an LCM pipeline that samples in 2 steps; the same
    combination on the fly with sample --lora; a non-number weight is one clear line."""
    from helpers import run_cli

    folder, _ = caption_folder(tmp_path / "pics", n=8)
    rc, _, err = run_cli(capsys, "train-lora", "--base", str(tiny_sd), "--dataset", str(folder), "--out",
                         str(tmp_path / "style"), "--rank", "2", "--steps", "2", "--batch", "4", "--no-progress",
                         "--work-dir", str(tmp_path / "work"))
    assert rc == 0, err
    rc, _, err = run_cli(capsys, "lora", "merge", "--base", str(tiny_sd), "--lora", f"{tmp_path / 'style'}:0.8",
                         "--lora", f"{tiny_lcm_lora}:1", "--out", str(tmp_path / "merged"))
    assert rc == 0, err
    merged = load_latent_model(tmp_path / "merged")
    assert merged.config.is_lcm and [d["weight"] for d in merged.config.loras] == [0.8, 1.0]
    assert not any("lora" in n for n, _ in merged.unet.named_parameters())          # fused: a plain UNet
    from diffusers import StableDiffusionPipeline
    assert type(StableDiffusionPipeline.from_pretrained(tmp_path / "merged").scheduler).__name__ == "LCMScheduler"
    rc, _, err = run_cli(capsys, "sample", "--model", str(tmp_path / "merged"), "--prompt", "red apple", "--steps", "2",
                         "--num", "2", "--out", str(tmp_path / "a.png"))
    assert rc == 0, err
    rc, _, err = run_cli(capsys, "sample", "--model", str(tiny_sd), "--lora", f"{tmp_path / 'style'}:0.8",
                         "--lora", str(tiny_lcm_lora), "--prompt", "red apple", "--steps", "2", "--num", "2",
                         "--out", str(tmp_path / "b.png"))
    assert rc == 0, err
    import numpy as np
    from PIL import Image
    assert np.abs(np.asarray(Image.open(tmp_path / "a.png"), dtype=float)
                  - np.asarray(Image.open(tmp_path / "b.png"), dtype=float)).max() <= 2   # same model, same images
    rc, _, err = run_cli(capsys, "lora", "merge", "--no-fuse", "--base", str(tiny_sd), "--lora", f"{tmp_path / 'style'}:0.8",
                         "--lora", f"{tiny_lcm_lora}:1", "--out", str(tmp_path / "set"))
    assert rc == 0 and "adapter_weights=[0.8, 1.0]" in (tmp_path / "set" / "README.md").read_text(), err
    rc, _, err = run_cli(capsys, "sample", "--model", str(tiny_sd), "--lora", str(tmp_path / "set"), "--prompt", "red apple",
                         "--steps", "2", "--num", "2", "--out", str(tmp_path / "d.png"))
    assert rc == 0 and np.abs(np.asarray(Image.open(tmp_path / "a.png"), dtype=float)
                              - np.asarray(Image.open(tmp_path / "d.png"), dtype=float)).max() <= 2, err   # the set = the merge
    from fewstep.models.loras import apply_loras
    unfused = apply_loras(load_latent_model(tiny_sd), [(tmp_path / "set", 1.0)], fuse=False)
    assert unfused.config.is_lcm and [d["weight"] for d in unfused.config.loras] == [0.8, 1.0]
    assert any("lora" in n for n, _ in unfused.unet.named_parameters())              # the adapters stay adapters
    capsys.readouterr()
    Image.new("RGB", (32, 32), "red").save(tmp_path / "in.png")
    edits = []
    for model, loras in ((tmp_path / "merged", []), (tiny_sd, ["--lora", str(tmp_path / "set")])):   # img2img too
        edits.append(tmp_path / f"e{len(edits)}.png")
        rc, _, err = run_cli(capsys, "edit", "--task", "img2img", "--model", str(model), *loras, "--input",
                             str(tmp_path / "in.png"), "--prompt", "red apple", "--steps", "2", "--strength", "0.7",
                             "--out", str(edits[-1]))
        assert rc == 0, err
    assert np.abs(np.asarray(Image.open(edits[0]), dtype=float) - np.asarray(Image.open(edits[1]), dtype=float)).max() <= 2
    rc, _, err = run_cli(capsys, "sample", "--model", str(tiny_sd), "--lora", f"{tiny_lcm_lora}:fast",
                         "--prompt", "x", "--out", str(tmp_path / "c.png"))
    assert rc == 2 and "not a number" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "c.png").exists()
