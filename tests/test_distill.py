"""fewstep distill end to end on a tiny teacher: the saved consistency model loads, keeps its boundary
condition, samples in 1-2 steps with tuned grids, and bad input gets one clear line."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import run_cli, tiny_digits_models

from fewstep.cli import main, shipped_models_dir
from fewstep.eval.evaluate import Ruler, tune_sigmas
from fewstep.models.data import load_digits
from fewstep.models.folders import load_model
from fewstep.nets.classifier import load_classifier
from fewstep.sampling.generate import generate
from fewstep.sampling.grids import sampling_grid


@pytest.fixture(scope="module")
def distilled(tmp_path_factory) -> Path:
    """A tiny 'teacher' and the CD student distilled from it in 3 steps through the CLI."""
    root = tmp_path_factory.mktemp("models")
    tiny_digits_models(root)
    code = main(["distill", "--method", "cd", "--teacher", str(root / "digits-teacher"), "--out", str(root / "digits-cd"),
                 "--work-dir", str(root / "run"), "--steps", "3", "--batch", "8", "--no-progress"])
    assert code == 0
    return root


def test_distilled_folder_is_a_consistency_model(distilled):
    model = load_model(distilled / "digits-cd")
    cfg = model.config
    assert (cfg.kind, cfg.parameterization, cfg.default_sampler, cfg.default_steps) == ("consistency", "cm", "consistency", 1)
    assert cfg.training["method"] == "cd" and cfg.training["distilled_guidance_scale"] == 2.0
    assert "fewstep distill --method cd" in cfg.training["command"]
    x = torch.randn(4, 1, 16, 16)
    out = model.denoiser(x, torch.full((4,), 0.002), class_labels=torch.arange(4))
    assert torch.equal(out, x)                                   # f(x, σmin) = x, exactly
    state = json.loads((distilled / "run" / "checkpoints" / "step-0000003" / "state.json").read_text())
    assert state["elapsed_seconds"] > 0


def test_multistep_consistency_sampling_uses_tuned_grids(distilled, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(distilled / "digits-cd", folder)
    model = load_model(folder)
    assert sampling_grid(model, 2, "consistency").tolist() == pytest.approx([80.0, 2.5152, 0.0], rel=1e-3)
    labels = torch.arange(10)
    one = generate(model, labels, steps=1, sampler="consistency")
    assert one.shape == (10, 1, 16, 16) and one.abs().max() <= 1
    assert torch.equal(generate(model, labels, steps=2, sampler="consistency", seed=3),
                       generate(model, labels, steps=2, sampler="consistency", seed=3))
    ruler = Ruler(load_classifier(distilled / "digits-classifier"), load_digits())
    grid, fid = tune_sigmas(model, ruler, steps=2, num=20, iters=2, progress=False)
    assert grid[0] == pytest.approx(80.0) and 0.002 < grid[1] < 80 and grid[2] == 0 and fid > 0
    cfg = json.loads((folder / "fewstep.json").read_text())
    cfg["sampling_sigmas"] = {"2": grid}
    (folder / "fewstep.json").write_text(json.dumps(cfg))
    assert sampling_grid(load_model(folder), 2, "consistency").tolist() == pytest.approx(grid)


def test_eval_tune_sigmas_saves_the_grid(distilled, tmp_path, capsys):
    folder = tmp_path / "m"
    shutil.copytree(distilled / "digits-cd", folder)
    assert main(["eval", "--model", str(folder), "--steps", "1,2", "--num", "20", "--tune-sigmas", "--save-sigmas",
                 "--models", str(distilled)]) == 0
    assert "best σ grid" in capsys.readouterr().out
    assert set(json.loads((folder / "fewstep.json").read_text())["sampling_sigmas"]) == {"2"}


def test_sample_cli_uses_the_models_defaults_and_chosen_levels(distilled, tmp_path, capsys):
    out = tmp_path / "s.png"
    assert main(["sample", "--model", str(distilled / "digits-cd"), "--label", "3", "--num", "2", "--out", str(out)]) == 0
    assert main(["sample", "--model", str(distilled / "digits-cd"), "--sigmas", "80,0.8", "--label", "3", "--num", "2",
                 "--out", str(out)]) == 0 and out.exists()
    code, _, err = run_cli(capsys, "sample", "--model", str(distilled / "digits-cd"), "--sigmas", "0.8,80", "--out", str(out))
    assert code == 2 and "strictly decreasing" in err


@pytest.mark.parametrize("argv, message", [
    (["--method", "cd"], "needs a teacher"),
    (["--method", "lcd", "--teacher", "TEACHER_IS_CM"], "--method lcd distils a discrete-VP teacher"),
    (["--method", "cd", "--teacher", "TEACHER_IS_CM"], "--method cd needs a classifier-free-guided diffusion teacher"),
    (["--method", "ct", "--distance", "classifier", "--classifier", "/nonexistent"], "classifier"),
    (["--method", "cd", "--teacher", "/nonexistent"], "does not exist"),
])
def test_distill_bad_input_is_one_clear_line(distilled, tmp_path, capsys, argv, message):
    argv = [str(distilled / "digits-cd") if a == "TEACHER_IS_CM" else a for a in argv]
    code = main(["distill", *argv, "--out", str(tmp_path / "o"), "--work-dir", str(tmp_path / "w"), "--steps", "1",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_cd_student_beats_its_teacher_at_one_step(tmp_path):
    """The claim of consistency distillation, on the shipped teacher: after 250 CD steps (~8 minutes on
    2 CPU cores) the 1-step student is closer to the data than the teacher's own 1-step sample."""
    from fewstep.eval.evaluate import evaluate

    models = shipped_models_dir()
    assert main(["distill", "--method", "cd", "--teacher", str(models / "digits-teacher"), "--out",
                 str(tmp_path / "cd"), "--work-dir", str(tmp_path / "run"), "--steps", "250", "--batch", "64",
                 "--lr", "1e-4", "--warmup", "100", "--no-progress"]) == 0
    teacher, student = load_model(models / "digits-teacher"), load_model(tmp_path / "cd")
    ruler = Ruler(load_classifier(models / "digits-classifier"), load_digits())
    t = evaluate(teacher, ruler, [1], "dpmpp-2m", 2.0, num=500, progress=False)[0][0]
    s = evaluate(student, ruler, [1], "consistency", 1.0, num=500, progress=False)[0][0]
    assert s.fid < 0.6 * t.fid and s.cond_accuracy >= 0.95, (s.fid, t.fid)
