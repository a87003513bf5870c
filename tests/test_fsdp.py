"""Training under accelerate's FSDP (issue 28 item 4): 2 CPU processes over gloo shard the student, its optimizer
state, EMA, target network and the teacher; the result is one process's, and the memory check knows the shards."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import caption_folder, run_cli
from safetensors.torch import load_file

from fewstep.cli import shipped_models_dir
from fewstep.errors import FewstepError
from fewstep.training import memory

ROOT = Path(__file__).parent.parent
UNET = "unet/diffusion_pytorch_model.safetensors"


def _fsdp(argv: list[str]) -> subprocess.CompletedProcess:
    """``fewstep ARGV`` under ``accelerate launch --use_fsdp --fsdp_version 2`` with 2 CPU processes (gloo)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "fewstep", *argv]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[:3000] + "\n…\n" + result.stderr[-3000:]
    return result


def _free_port() -> int:
    """A port nothing listens on now: each launch's rendezvous gets its own, so one launch's rendezvous port, still
    closing, is never the next one's (a fixed 29531 failed now and then when two launches followed closely)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cd_under_fsdp_is_the_one_process_run_and_resumes_exactly(tmp_path, capsys):
    """`fewstep distill --method cd` unchanged under FSDP on 2 processes (one micro-batch of 4 each) gives the weights
    of one process with 2 micro-batches of 4 (the same micro-batches and random numbers: only the order of the
    gradient sums differs, so they agree to float rounding, not bit for bit: Adam turns the rounding of gradients
    that are nearly 0, such as attention's key bias, into updates of up to 1e-6 here); each process held half of the student
    and of the teacher + target; a run killed after step 2 and resumed under FSDP ends bit-identical; checkpoints
    and the model folder are full tensors that load as usual."""
    teacher = shipped_models_dir() / "digits-teacher"
    argv = ["distill", "--method", "cd", "--teacher", str(teacher), "--dataset", "digits", "--steps", "4",
            "--batch", "8", "--lr", "1e-3", "--warmup", "1", "--checkpoint-every", "2", "--no-progress"]
    rc, _, err = run_cli(capsys, *argv, "--grad-accum", "2", "--out", str(tmp_path / "one"),
                         "--work-dir", str(tmp_path / "w1"))
    assert rc == 0, err
    _fsdp([*argv, "--out", str(tmp_path / "fsdp"), "--work-dir", str(tmp_path / "w2")])
    shutil.rmtree(tmp_path / "w2" / "checkpoints" / "step-0000004")           # killed after step 2's checkpoint
    _fsdp([*argv, "--out", str(tmp_path / "resumed"), "--work-dir", str(tmp_path / "w2")])

    one, fsdp = load_file(tmp_path / "one" / UNET), load_file(tmp_path / "fsdp" / UNET)
    resumed, init = load_file(tmp_path / "resumed" / UNET), load_file(teacher / UNET)
    assert one.keys() == fsdp.keys() == resumed.keys()
    moved = max(float((one[k] - init[k]).abs().max()) for k in one)
    gap = max(float((one[k] - fsdp[k]).abs().max()) for k in one)
    assert moved > 1e-3 and gap < 1e-2 * moved, (moved, gap)
    assert all(torch.equal(fsdp[k], resumed[k]) for k in fsdp), max(float((fsdp[k] - resumed[k]).abs().max()) for k in fsdp)

    for step in ("step-0000002", "step-0000004"):       # gathered: the same tensors, full shapes
        a = load_file(tmp_path / "w1" / "checkpoints" / step / "optimizer.safetensors")
        b = load_file(tmp_path / "w2" / "checkpoints" / step / "optimizer.safetensors")
        assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    for name in ("model", "ema", "objective"):
        a = load_file(tmp_path / "w1" / "checkpoints" / "step-0000002" / f"{name}.safetensors")
        b = load_file(tmp_path / "w2" / "checkpoints" / "step-0000002" / f"{name}.safetensors")
        assert a.keys() == b.keys()
        gap = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
        assert gap < 1e-2 * moved, (name, gap)

    record = json.loads((tmp_path / "fsdp" / "fewstep.json").read_text())["training"]
    shards = record["fsdp"]
    assert record["processes"] == shards["processes"] == 2
    assert shards["parameters"] == sum(v.numel() for v in one.values())
    for held, total in ((shards["held"], shards["parameters"]), (shards["other_held"], shards["other_parameters"])):
        assert sum(held) == total and all(0.45 < h / total < 0.55 for h in held), (held, total)
    assert shards["other_parameters"] == 2 * shards["parameters"]      # the teacher and the target copy

    from fewstep.models.folders import load_model
    from fewstep.sampling.generate import generate

    model = load_model(tmp_path / "fsdp")
    assert model.config.kind == "consistency"
    assert torch.isfinite(generate(model, labels=[3, 7], steps=1, seed=0)).all()


def test_lcm_lora_under_fsdp_shards_the_base_and_equals_one_process(tiny_sd, tmp_path, capsys):
    """LCM-LoRA under FSDP: the frozen base UNet, the adapters and the target adapter are one sharded module, which
    the adapters-off teacher runs too (the UNet is a unit of its own); the run is one process's with 2 micro-batches:
    the same losses and gradient norms to float rounding, and the same LoRA up to the few weights whose gradient is
    rounding noise, which Adam's first steps turn into updates of up to ±lr of either sign (the 16-channel blocks'
    time projections: the next GroupNorm, one group per channel, cancels their shift; measured: 0.35% of the
    adapters' change in norm)."""
    from fewstep.models.loras import LORA_FILE

    folder, _ = caption_folder(tmp_path / "pics", n=8)
    argv = ["distill", "--method", "lcm-lora", "--teacher", str(tiny_sd), "--dataset", str(folder), "--steps", "2",
            "--batch", "4", "--lr", "1e-2", "--warmup", "1", "--lora-rank", "2", "--no-progress"]
    rc, _, err = run_cli(capsys, *argv, "--grad-accum", "2", "--out", str(tmp_path / "one"),
                         "--work-dir", str(tmp_path / "w1"))
    assert rc == 0, err
    _fsdp([*argv, "--out", str(tmp_path / "fsdp"), "--work-dir", str(tmp_path / "w2")])
    logs = [[json.loads(line) for line in (tmp_path / w / "metrics.jsonl").read_text().splitlines()] for w in ("w1", "w2")]
    for a, b in zip(*logs, strict=True):
        assert a["step"] == b["step"] and abs(a["loss"] - b["loss"]) < 1e-5 * a["loss"]
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-5 * a["grad_norm"]
    one, fsdp = load_file(tmp_path / "one" / LORA_FILE), load_file(tmp_path / "fsdp" / LORA_FILE)
    assert one.keys() == fsdp.keys()
    moved = sum(float(v.square().sum()) for k, v in one.items() if "lora_B" in k) ** 0.5    # B starts at 0
    gap = sum(float((one[k] - fsdp[k]).square().sum()) for k in one) ** 0.5
    assert moved > 1e-2 and gap < 2e-2 * moved, (moved, gap)
    shards = json.loads((tmp_path / "fsdp" / "fewstep.json").read_text())["training"]["fsdp"]
    assert sum(shards["held"]) == shards["parameters"] and all(0.45 < h / shards["parameters"] < 0.55
                                                                for h in shards["held"])


def test_per_process_bytes_divides_what_fsdp_shards():
    n = 1_000_000_000
    assert memory.per_process_bytes(n) == memory.training_bytes(n, target=True, ema=True) == 24 * n
    assert memory.per_process_bytes(n, 4, frozen=n, frozen_dtype="bf16") == (24 * n + 2 * n) // 4
    assert memory.per_process_bytes(n, 4, frozen=n, frozen_dtype="bf16", frozen_sharded=False) == 6 * n + 2 * n
    assert memory.per_process_bytes(n, 4, ema=False, optimizer="adamw-8bit", unit=10**7) == 14 * n // 4 + 16 * 10**7
    assert memory.per_process_bytes(n, 1, unit=10**7) == 24 * n                   # nothing in flight unsharded
    fp = memory.footprint(n, frozen=n, frozen_dtype=torch.bfloat16)
    free = 8 * 2 ** 30
    k = fp.processes_for(free)
    assert fp.per_process(k) * memory.MARGIN <= free < fp.per_process(k - 1) * memory.MARGIN and k == 4
    assert memory.footprint(n, frozen=10 * n, frozen_sharded=False).processes_for(free) is None


def test_a_run_that_does_not_fit_says_how_many_fsdp_processes_would(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 8 * 2 ** 30)
    fp = memory.footprint(10 ** 9, frozen=10 ** 9, frozen_dtype="bf16")
    with pytest.raises(FewstepError) as e:
        memory.check_fits(fp, "training this UNet", "cpu")
    assert "It needs 4 processes of ≥ 8.0 GiB under FSDP" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(FewstepError) as e:
        memory.check_fits(fp, "training this UNet", "cpu", processes=2)
    assert "12.1 GiB per process" in str(e.value) and "under FSDP over 2 processes" in str(e.value)
    assert "It needs 4 processes" in str(e.value)
    memory.check_fits(fp, "training this UNet", "cpu", processes=4)                # 6.1 GiB each: fits
    with pytest.raises(FewstepError, match="4.0 GiB is free per process"):      # 2 CPU processes share the machine
        memory.check_fits(fp, "training this UNet", "cpu", processes=4, local_processes=2)


def test_wrap_units_and_refusals(monkeypatch):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from fewstep.models.folders import load_model
    from fewstep.training.sharding import block_classes, enable_fsdp, largest_unit

    den = load_model(shipped_models_dir() / "digits-teacher").denoiser
    assert block_classes(den) == ["Attention", "ResnetBlock2D", "UNet2DModel"]    # UNet2DModel names no blocks
    biggest = max(sum(p.numel() for p in m.parameters()) for m in den.modules() if type(m).__name__ == "ResnetBlock2D")
    assert biggest <= largest_unit(den) < sum(p.numel() for p in den.parameters())
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    fsdp1 = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=False)
    with pytest.raises(FewstepError, match="--fsdp_version 2"):
        enable_fsdp(fsdp1)
