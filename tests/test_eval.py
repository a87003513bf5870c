"""fewstep eval and fewstep bench on a tiny stand-in teacher, scored by the shipped digits classifier."""

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from fewstep.cli import main, shipped_models_dir
from fewstep.models import ModelConfig, save_model
from fewstep.schedules import EDMSchedule

from helpers import tiny_unet

EVAL_KEYS = {"steps", "sampler", "guidance_scale", "nfe", "fid", "kid", "kid_std", "precision", "recall",
             "cond_accuracy", "seconds_per_image"}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A models folder: a tiny untrained 'digits-teacher' beside the shipped digits classifier."""
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(shipped_models_dir() / "digits-classifier", root / "digits-classifier")
    torch.manual_seed(0)
    config = ModelConfig(schedule=asdict(EDMSchedule()), image_size=16, channels=1,
                         class_names=[str(i) for i in range(10)], dataset="digits")
    save_model(root / "digits-teacher", tiny_unet(num_classes=10, size=16), config)
    return root


def test_eval_json_contract_and_reproducibility(models, tmp_path, capsys):
    outs = []
    for name in ("a.json", "b.json"):
        code = main(["eval", "--model", str(models / "digits-teacher"), "--models", str(models), "--steps", "1,2",
                     "--num", "60", "--seed", "3", "--json", str(tmp_path / name), "--grid", str(tmp_path / "g.png")])
        assert code == 0
        outs.append(json.loads((tmp_path / name).read_text()))
    a, b = outs
    assert {"model", "dataset", "num_samples", "seed", "results"} <= set(a)
    assert a["num_samples"] == 60 and a["seed"] == 3 and a["dataset"] == "digits"
    assert [r["steps"] for r in a["results"]] == [1, 2]
    for ra, rb in zip(a["results"], b["results"]):
        assert EVAL_KEYS <= set(ra)
        assert ra["nfe"] == 2 * ra["steps"]  # DPM-Solver++ with CFG: two passes per step
        for key in EVAL_KEYS - {"seconds_per_image"}:
            assert ra[key] == rb[key], key  # same seed, same numbers
    assert (tmp_path / "g.png").exists()


def test_bench_quick_writes_tables_json_and_plots(models, tmp_path, capsys):
    md = tmp_path / "BENCHMARKS.md"
    code = main(["bench", "--quick", "--num", "40", "--models", str(models), "--out", str(tmp_path / "res"),
                 "--markdown", str(md)])
    assert code == 0
    report = json.loads((tmp_path / "res" / "bench.json").read_text())
    assert set(report["quality"]) == {f"digits-teacher/{s}" for s in ("ddim", "euler", "heun", "dpmpp-2m")}
    assert all(r["overhead"] > 0.5 for r in report["speed"])
    text = md.read_text()
    assert "Quality versus steps" in text and "sampler overhead" in text and "fewstep bench --quick" in text
    assert (tmp_path / "res" / "fid_vs_nfe.png").exists() and (tmp_path / "res" / "fid_vs_seconds.png").exists()
