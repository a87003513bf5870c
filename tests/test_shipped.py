"""The shipped models: they load with no network, and the teacher does what README.md says."""

import json

import torch

from fewstep.cli import main, shipped_models_dir
from fewstep.models.data import load_digits
from fewstep.models.folders import load_model
from fewstep.nets.classifier import accuracy, load_classifier
from fewstep.sampling.generate import generate

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
    from fewstep.eval.evaluate import Ruler

    model = load_model(MODELS / "digits-teacher")
    ruler = Ruler(load_classifier(MODELS / "digits-classifier"), load_digits())
    labels = torch.arange(200) % 10
    fid = {n: ruler.fid(generate(model, labels, steps=n, guidance_scale=2.0, seed=0)) for n in (1, 25)}
    assert fid[1] > 3 * fid[25], fid


def test_cd_model_in_one_step_beats_the_teacher_in_one_step():
    """The shipped consistency-distilled model: one network evaluation, samples of the asked label, and
    closer to the data than the teacher's one-step (two-evaluation) sample (BENCHMARKS.md: 1,000 samples)."""
    from fewstep.eval.evaluate import Ruler

    teacher, student = load_model(MODELS / "digits-teacher"), load_model(MODELS / "digits-cd")
    ruler = Ruler(load_classifier(MODELS / "digits-classifier"), load_digits())
    labels = torch.arange(200) % 10
    cd = generate(student, labels, steps=1, sampler="consistency", guidance_scale=1.0, seed=0)
    fid_teacher = ruler.fid(generate(teacher, labels, steps=1, guidance_scale=2.0, seed=0))
    assert ruler.fid(cd) < 0.5 * fid_teacher
    assert accuracy(ruler.classifier, cd, labels) >= 0.95


def test_cd_model_infers_the_label_of_half_a_digit():
    """Label-free inpainting's first step: the model's own reconstruction error of the known half
    picks the right class for most digits (BENCHMARKS.md: 200 digits)."""
    from fewstep.editing.constraints import half_mask
    from fewstep.editing.zero_shot import infer_labels

    data = load_digits()
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:30]
    guess = infer_labels(load_model(MODELS / "digits-cd"), data.images[idx], half_mask(16, "bottom"), repeats=2)
    assert (guess == data.labels[idx]).float().mean() >= 0.7


def test_shipped_consistency_models_keep_the_boundary_condition_and_their_recipe():
    for name in ("digits-cd", "digits-ct", "digits-ict", "digits-act"):
        model = load_model(MODELS / name)
        x = torch.randn(3, 1, 16, 16)
        assert torch.equal(model.denoiser(x, torch.full((3,), 0.002), class_labels=torch.arange(3)), x)
        assert model.config.training["command"].startswith("fewstep ") and model.config.training["wall_seconds"] > 0


def test_demo_runs_and_writes_grid_and_table(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--per-class", "2"]) == 0
    rows = json.loads((tmp_path / "demo.json").read_text())["results"]
    expected = [("digits-teacher", 50), ("digits-teacher", 4), ("digits-teacher", 2), ("digits-teacher", 1),
                ("digits-cd", 1), ("digits-cd", 2), ("digits-progressive", 4), ("digits-progressive", 2)]
    if (MODELS / "emoji-lcm").is_dir():
        expected += [("emoji-sd", 25), ("emoji-sd", 4), ("emoji-lcm", 4), ("emoji-lcm", 2), ("emoji-lcm", 1),
                     ("emoji-sd+emoji-lcm-lora", 4)]
    if (MODELS / "emoji-progressive").is_dir():
        expected += [("emoji-progressive", 4), ("emoji-progressive", 2)]
    assert [(r["model"], r["steps"]) for r in rows] == expected
    assert rows[0]["nfe"] == 100 and rows[3]["nfe"] == 2  # CFG: two evaluations per step
    assert rows[4]["nfe"] == 1                            # the CD student: guidance built in, one evaluation
    assert rows[6]["nfe"] == 4                            # the progressive student: s an input, one per step
    assert all(r["nfe"] == r["steps"] for r in rows if r["model"] == "emoji-lcm")  # LCM: s an input too
    assert all(r["nfe"] == r["steps"] and r["guidance_scale"] == 1 for r in rows if "lcm-lora" in r["model"])
    assert all(r["nfe"] == r["steps"] for r in rows if r["model"] == "emoji-progressive")   # s an input
    assert (tmp_path / "demo.png").stat().st_size > 1000
    assert "cond. acc." in capsys.readouterr().out
