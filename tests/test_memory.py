"""What full-size training on 24 GB needs (issue 15), checked on tiny pipelines: a LoRA run checkpoints only
its adapter and still resumes exactly; --ema 0 keeps no second copy of the weights; a bf16 teacher trains an
fp32 student (LCD) or fp32 adapters on its bf16 base (LCM-LoRA). The full-size numbers are measured by
bench/full_size.py, not here."""

from __future__ import annotations

import json

import torch
from helpers import run_cli, tiny_data
from safetensors.torch import load_file

from fewstep.methods.lcm import LCMSettings, distill_lcm
from fewstep.models.folders import load_model
from fewstep.models.loras import LORA_FILE
from fewstep.training import TrainConfig


def _lora_run(teacher_dir, root, steps: int, work: str, dtype=None):
    config = TrainConfig(out_dir=str(root / work), max_steps=steps, batch_size=6, lr=1e-2, progress=False,
                         checkpoint_every=2, log_every=1)
    return distill_lcm(load_model(teacher_dir, dtype=dtype), tiny_data(12), root / f"{work}-{steps}", config,
                       LCMSettings(method="lcm-lora", lora_rank=2, guidance_min=2, guidance_max=4), command="test")


def test_lora_checkpoints_hold_only_the_adapter_and_resume_exactly(tiny_sd, tmp_path):
    full = _lora_run(tiny_sd, tmp_path, 4, "a")
    _lora_run(tiny_sd, tmp_path, 2, "b")                        # stopped at 2 ...
    resumed = _lora_run(tiny_sd, tmp_path, 4, "b")              # ... and continued to 4 from its checkpoint
    ckpt = tmp_path / "b" / "checkpoints" / "step-0000002"
    held = load_file(ckpt / "model.safetensors")
    unet = load_model(tiny_sd).unet
    assert held and all(".lora_" in k and ".default." in k for k in held)
    assert sum(v.numel() for v in held.values()) < 0.2 * sum(p.numel() for p in unet.parameters())
    assert json.loads((ckpt / "state.json").read_text())["partial"] is True
    a, b = load_file(full / LORA_FILE), load_file(resumed / LORA_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ema_zero_keeps_no_copy_and_saves_the_online_weights(tiny_sd, tmp_path, capsys):
    out = tmp_path / "lcm"
    rc, _, err = run_cli(capsys, "distill", "--method", "lcd", "--teacher", str(tiny_sd), "--dataset", "emoji",
                         "--out", str(out), "--steps", "2", "--batch", "4", "--ema", "0", "--checkpoint-every", "2",
                         "--no-progress", "--work-dir", str(tmp_path / "w"))
    assert rc == 0, err
    assert load_file(tmp_path / "w" / "checkpoints" / "step-0000002" / "ema.safetensors") == {}
    saved = load_model(out).unet.state_dict()
    online = load_file(tmp_path / "w" / "checkpoints" / "step-0000002" / "model.safetensors")
    prefix = next(k for k in online if k.endswith(".conv_in.weight")).removesuffix("conv_in.weight")
    assert saved and all(torch.equal(v, online[prefix + k]) for k, v in saved.items())


def test_bf16_teacher_trains_fp32_students(tiny_sd, tmp_path):
    """LCD: the student and what it saves are fp32 under a bf16 teacher; LCM-LoRA: fp32 adapters on the bf16
    base, whose loss is the fp32 run's up to the bf16 rounding of the frozen base."""
    config = TrainConfig(out_dir=str(tmp_path / "w"), max_steps=2, batch_size=6, progress=False, checkpoint_every=2)
    out = distill_lcm(load_model(tiny_sd, dtype="bfloat16"), tiny_data(12), tmp_path / "lcm", config,
                      LCMSettings(guidance_min=2, guidance_max=4), command="test")
    lcm = load_model(out)
    assert all(p.dtype == torch.float32 for p in lcm.unet.parameters())
    assert all(p.dtype == torch.float32 for p in lcm.parts["text_encoder"].parameters())
    low, high = _lora_run(tiny_sd, tmp_path, 2, "bf16", dtype="bfloat16"), _lora_run(tiny_sd, tmp_path, 2, "fp32")
    a = load_file(low / LORA_FILE)
    assert load_file(high / LORA_FILE).keys() == a.keys()
    assert all(v.dtype == torch.float32 for v in a.values())
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)    # it trained
    loss = {d: [json.loads(line)["loss"] for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("bf16", "fp32")}
    assert abs(loss["bf16"][0] - loss["fp32"][0]) < 0.05 * loss["fp32"][0]      # the same objective, bf16-rounded


def test_teacher_dtype_is_refused_where_it_does_not_apply(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "distill", "--method", "cd", "--teacher", "models/digits-teacher", "--out",
                         str(tmp_path / "x"), "--teacher-dtype", "bf16", "--steps", "1")
    assert rc != 0 and "--teacher-dtype bf16 applies to lcd, lcf, lcm-lora, tcd and tcd-lora; --method cd holds" in err


def test_dtype_flag_samples_in_half_precision(tiny_sd, tmp_path, capsys):
    """`sample --dtype bf16` holds the pipeline in bf16 and gives the fp32 images up to bf16 rounding."""
    import numpy as np
    from PIL import Image

    images = {}
    for dtype in ("fp32", "bf16"):
        rc, _, err = run_cli(capsys, "sample", "--model", str(tiny_sd), "--prompt", "red apple", "--steps", "2",
                             "--num", "2", "--dtype", dtype, "--out-dir", str(tmp_path / dtype))
        assert rc == 0, err
        images[dtype] = np.stack([np.asarray(Image.open(p), dtype=np.float64) for p in sorted((tmp_path / dtype).glob("*.png"))])
    diff = np.abs(images["fp32"] - images["bf16"])
    assert 0 < diff.mean() < 8 and images["fp32"].std() > 1
    assert load_model(tiny_sd, dtype="bfloat16").unet.dtype == torch.bfloat16


def test_a_run_that_cannot_fit_stops_in_one_line_before_copying_the_unet(tiny_sd, tmp_path, capsys, monkeypatch):
    import fewstep.training.memory as memory

    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 1000)
    argv = ["distill", "--method", "lcd", "--teacher", str(tiny_sd), "--dataset", "emoji", "--steps", "1", "--batch",
            "4", "--no-progress"]
    rc, _, err = run_cli(capsys, *argv, "--out", str(tmp_path / "a"), "--work-dir", str(tmp_path / "wa"))
    assert rc != 0 and "needs at least" in err and "--ema 0" in err and "--no-memory-check" in err
    assert "--optimizer adamw-8bit" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "wa" / "checkpoints").exists()
    n = sum(p.numel() for p in load_model(tiny_sd).unet.parameters())
    assert memory.training_bytes(n, target=True, ema=True) == 24 * n
    assert memory.training_bytes(n, target=True, ema=False, optimizer="adamw-8bit") == 14 * n   # 2 bytes of moments
    rc, _, err = run_cli(capsys, *argv, "--out", str(tmp_path / "b"), "--work-dir", str(tmp_path / "wb"),
                         "--no-memory-check")
    assert rc == 0, err
