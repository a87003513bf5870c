"""The shipped models: they load with no network, and the teacher does what README.md says."""

import json

import torch

from fewstep.classifier import accuracy, load_classifier
from fewstep.cli import main, shipped_models_dir
from fewstep.data import load_digits
from fewstep.models import load_model
from fewstep.sampling import generate

MODELS = shipped_models_dir()


def test_digits_classifier_is_accurate():
    data = load_digits()
    _, heldout = data.split(0.2, seed=0)  # the split it was trained with (train-classifier --seed 0)
    assert accuracy(load_classifier(MODELS / "digits-classifier"), heldout.images, heldout.labels) > 0.98


def test_digits_teacher_samples_classify_as_their_label():
    """The issue's bar: at 50 DPM-Solver++ steps and guidance scale 2, ≥ 95% of samples drawn for
    label c classify as c (BENCHMARKS.md has the 1,000-sample figure)."""
    model = load_model(MODELS / "digits-teacher")
    labels = torch.arange(10).repeat(10)
    images = generate(model, labels, steps=50, sampler="dpmpp-2m", guidance_scale=2.0, seed=1)
    assert accuracy(load_classifier(MODELS / "digits-classifier"), images, labels) >= 0.95


def test_one_step_teacher_is_much_worse_than_twenty_five():
    """The problem fewstep solves: the teacher's FID at 1 step is far above its FID at 25 steps."""
    from fewstep.evaluate import Ruler

    model = load_model(MODELS / "digits-teacher")
    ruler = Ruler(load_classifier(MODELS / "digits-classifier"), load_digits())
    labels = torch.arange(200) % 10
    fid = {n: ruler.fid(generate(model, labels, steps=n, guidance_scale=2.0, seed=0)) for n in (1, 25)}
    assert fid[1] > 3 * fid[25], fid


def test_demo_runs_and_writes_grid_and_table(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--per-class", "2"]) == 0
    rows = json.loads((tmp_path / "demo.json").read_text())["results"]
    assert [r["steps"] for r in rows] == [50, 4, 2, 1]
    assert rows[0]["nfe"] == 100 and rows[-1]["nfe"] == 2  # CFG: two evaluations per step
    assert (tmp_path / "demo.png").stat().st_size > 1000
    assert "cond. acc." in capsys.readouterr().out
