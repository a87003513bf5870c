"""The shared trainer: exact resume, multi-process DDP, divergence handling, checkpoints and logs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_setup
from safetensors.torch import load_file

from fewstep.errors import FewstepError, TrainingDiverged
from fewstep.training import TrainConfig, latest_checkpoint, train

HERE = Path(__file__).parent


def config(tmp: Path, **kw) -> TrainConfig:
    base = dict(out_dir=str(tmp), max_steps=6, batch_size=8, grad_accum=2, lr=1e-3, warmup_steps=2,
                checkpoint_every=3, keep_checkpoints=2, log_every=1, ema_decay=0.9, progress=False)
    return TrainConfig(**{**base, **kw})


class Kill(Exception):
    pass


def killing(objective, at_call: int):
    """The objective, raising (as a SIGKILL would stop the loop) on its ``at_call``-th call."""
    calls = {"n": 0}

    def wrapped(model, batch):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise Kill()
        return objective(model, batch)
    return wrapped


def _has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


OPTIMIZERS = ["adamw", "adamw-fused",
              pytest.param("adamw-8bit", marks=pytest.mark.skipif(not _has_bitsandbytes(),
                                                                  reason="bitsandbytes is not installed"))]


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_killed_and_resumed_run_equals_uninterrupted(tmp_path, optimizer):
    model, objective, data = tiny_setup()
    full = train(model, objective, data, config(tmp_path / "a", optimizer=optimizer))

    model, objective, data = tiny_setup()
    with pytest.raises(Kill):  # dies in step 5 (micro-batch 9), after the checkpoint at step 3
        train(model, killing(objective, 9), data, config(tmp_path / "b", optimizer=optimizer))
    assert latest_checkpoint(tmp_path / "b" / "checkpoints").name == "step-0000003"
    model, objective, data = tiny_setup(model_seed=123)  # fresh weights: everything must come from the checkpoint
    resumed = train(model, objective, data, config(tmp_path / "b", optimizer=optimizer))

    assert resumed.step == full.step == 6
    for a, b in ((full.model, resumed.model), (full.ema, resumed.ema)):
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
    log = lambda d: [json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log("b")] == list(range(1, 7))
    assert [r["loss"] for r in log("a")] == pytest.approx([r["loss"] for r in log("b")], abs=1e-6)


def test_the_fused_optimizer_is_adamw_and_8bit_without_bitsandbytes_is_one_clear_error(tmp_path):
    runs = {}
    for name in ("adamw", "adamw-fused"):
        model, objective, data = tiny_setup()
        runs[name] = train(model, objective, data, config(tmp_path / name, optimizer=name)).model
    for p, q in zip(runs["adamw"].parameters(), runs["adamw-fused"].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4)     # the same update in one kernel (float order)
    model, objective, data = tiny_setup()
    with pytest.raises(FewstepError, match="unknown optimizer 'sgd'"):
        train(model, objective, data, config(tmp_path / "sgd", optimizer="sgd"))
    if not _has_bitsandbytes():
        with pytest.raises(FewstepError, match="pip install bitsandbytes"):
            train(model, objective, data, config(tmp_path / "8bit", optimizer="adamw-8bit"))


@pytest.mark.skipif(not _has_bitsandbytes(), reason="bitsandbytes is not installed")
def test_8bit_adam_resumes_exactly_with_its_shared_quantization_maps(tmp_path):
    """Tensors of 4,096 elements or more get 8-bit moments, whose quantization maps bitsandbytes shares between
    parameters (a full-size UNet's first checkpoint once failed on them)."""
    def setup(seed: int = 0):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))
        data = {"x": torch.randn(32, 64, generator=torch.Generator().manual_seed(0))}
        return model, lambda m, batch: ((m(batch["x"]) - batch["x"]).square().mean(), {}), data
    full = train(*setup(), config(tmp_path / "a", optimizer="adamw-8bit"))
    model, objective, data = setup()
    with pytest.raises(Kill):
        train(model, killing(objective, 9), data, config(tmp_path / "b", optimizer="adamw-8bit"))
    resumed = train(*setup(seed=1), config(tmp_path / "b", optimizer="adamw-8bit"))
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_a_checkpoint_older_than_a_setting_resumes_with_its_default(tmp_path):
    model, objective, data = tiny_setup()
    with pytest.raises(Kill):
        train(model, killing(objective, 9), data, config(tmp_path))
    state_file = latest_checkpoint(tmp_path / "checkpoints") / "state.json"
    state = json.loads(state_file.read_text())
    del state["config"]["optimizer"]                      # written before --optimizer existed
    state_file.write_text(json.dumps(state))
    model, objective, data = tiny_setup()
    assert train(model, objective, data, config(tmp_path)).step == 6
    model, objective, data = tiny_setup()
    with pytest.raises(FewstepError, match="optimizer"):  # but another optimizer is another run
        train(model, objective, data, config(tmp_path, max_steps=9, optimizer="adamw-fused"))


def test_checkpoints_are_safetensors_json_and_pruned(tmp_path):
    model, objective, data = tiny_setup()
    train(model, objective, data, config(tmp_path, max_steps=9))
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["step-0000006", "step-0000009"]  # last 2 kept, no temporary folders left
    files = sorted(p.name for p in (tmp_path / "checkpoints" / "step-0000009").iterdir())
    assert files == [".fewstep-output", "ema.safetensors", "model.safetensors", "optimizer.safetensors", "state.json"]
    state = json.loads((tmp_path / "checkpoints" / "step-0000009" / "state.json").read_text())
    assert state["step"] == 9 and state["config"]["batch_size"] == 8
    assert load_file(tmp_path / "checkpoints" / "step-0000009" / "model.safetensors")


def test_nan_loss_stops_cleanly_and_keeps_last_good_checkpoint(tmp_path):
    model, objective, data = tiny_setup()
    calls = {"n": 0}

    def poisoned(m, batch):
        calls["n"] += 1
        loss, logs = objective(m, batch)
        return (loss * float("nan") if calls["n"] > 8 else loss), logs  # step 5 diverges

    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 4.*step-0000003"):
        train(model, poisoned, data, config(tmp_path))
    good = load_file(tmp_path / "checkpoints" / "step-0000003" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in good.values())
    assert all(torch.isfinite(p).all() for p in model.parameters())  # no update was applied


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    model, objective, data = tiny_setup()
    train(model, objective, data, config(tmp_path, max_steps=3))
    (tmp_path / "checkpoints" / "step-0000003" / "model.safetensors").write_bytes(b"not a safetensors file")
    model, objective, data = tiny_setup()
    with pytest.raises(FewstepError, match="cannot resume from checkpoint"):
        train(model, objective, data, config(tmp_path))


def test_batch_must_split_over_accumulation(tmp_path):
    model, objective, data = tiny_setup()
    with pytest.raises(FewstepError, match="divisible"):
        train(model, objective, data, config(tmp_path, batch_size=7))


def test_two_process_ddp_keeps_ranks_identical(tmp_path):
    """Real 2-process DDP on CPU (DESIGN.md §7): both ranks end with bit-identical weights, which
    differ from the initial ones (gradients really were all-reduced and applied)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", "29517", str(HERE / "ddp_script.py"), str(tmp_path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    world = json.loads((tmp_path / "world.json").read_text())
    assert world == {"0": 2, "1": 2}
    r0, r1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    init = load_file(tmp_path / "init.safetensors")
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    assert any(not torch.equal(r0[k], init[k]) for k in r0)
