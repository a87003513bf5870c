""""Open house": a noise space and a method are registrations. Flow matching end to end through the CLI (a
flow teacher trained, distilled by the shared CD recipe, sampled in one step), and a method registered from a
test that `fewstep distill` lists and dispatches with no other change."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from helpers import run_cli

from fewstep.cli import main
from fewstep.core.flow import FlowDenoiser
from fewstep.methods.registry import METHODS, Method, register
from fewstep.models.folders import load_model
from fewstep.sampling.generate import generate
from fewstep.sampling.grids import sampling_grid


@pytest.fixture(scope="module")
def flow_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    common = ["--work-dir", str(root / "runs"), "--batch", "8", "--no-progress", "--steps", "2"]
    assert main(["train-teacher", "--dataset", "digits", "--parameterization", "flow", "--width", "8",
                 "--out", str(root / "teacher"), *common]) == 0
    assert main(["distill", "--method", "cd", "--teacher", str(root / "teacher"), "--solver", "euler",
                 "--num-scales", "6", "--out", str(root / "cd"), "--work-dir", str(root / "runs-cd"),
                 "--batch", "8", "--no-progress", "--steps", "2"]) == 0
    return root


def test_a_flow_teacher_is_a_velocity_model_sampled_on_the_flow_grid(flow_models):
    teacher = load_model(flow_models / "teacher")
    assert (teacher.config.kind, teacher.config.parameterization, teacher.config.default_sampler) == \
        ("diffusion", "flow", "euler")
    assert isinstance(teacher.denoiser, FlowDenoiser)
    grid = sampling_grid(teacher, 4)
    t = grid / (1 + grid)
    assert t.tolist() == pytest.approx([0.99999, 0.667, 0.334, 0.001, 0.0], abs=1e-4)   # FlowMatchEuler's
    images = generate(teacher, torch.tensor([1, 2]), steps=4, seed=0)
    assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()


def test_cd_of_a_flow_teacher_is_a_flow_consistency_model(flow_models):
    student = load_model(flow_models / "cd")
    cfg = student.config
    assert (cfg.kind, cfg.parameterization, cfg.default_sampler, cfg.default_steps) == ("consistency", "flow",
                                                                                       "consistency", 1)
    assert student.sigma_end == 0.0 and cfg.schedule == load_model(flow_models / "teacher").config.schedule
    x = torch.randn(3, 1, 16, 16)
    torch.testing.assert_close(student.denoiser(x, torch.zeros(3), class_labels=torch.arange(3)), x)  # f(x, 0) = x
    one = generate(student, torch.tensor([0, 5]), steps=1, sampler="consistency", seed=1)
    two = generate(student, torch.tensor([0, 5]), steps=2, sampler="consistency", seed=1)
    assert one.shape == two.shape == (2, 1, 16, 16) and not torch.equal(one, two)


@dataclass
class EchoSettings:
    method: str = "echo"
    label_dropout: float = 0.1
    skip: int = 20


def test_a_registered_method_is_listed_checked_and_dispatched(tmp_path, capsys):
    calls = []

    def recipe(teacher, data, out, config, settings, command):
        calls.append((teacher.path.name, data.name, settings, config.max_steps, command))
        return None

    register(Method("echo", "a test method", EchoSettings, recipe, teacher="models/digits-teacher",
                    options=("consistency", "latent"), family="tests"))
    try:
        code, out, _ = run_cli(capsys, "distill", "--help")
        assert code == 0 and "echo (a test method)" in " ".join(out.split())
        code, _, err = run_cli(capsys, "distill", "--method", "echo", "--out", str(tmp_path / "o"))
        assert code == 2 and "--method echo needs a teacher" in err
        code, _, _ = run_cli(capsys, "distill", "--method", "echo", "--teacher", "models/digits-teacher", "--skip", "10",
                             "--out", str(tmp_path / "o"), "--work-dir", str(tmp_path / "w"), "--steps", "7")
        assert code == 0 and len(calls) == 1
        teacher, data, settings, steps, command = calls[0]
        assert (teacher, data, steps) == ("digits-teacher", "digits", 7)
        assert settings == EchoSettings(method="echo", label_dropout=0.1, skip=10) and "--method echo" in command
    finally:
        del METHODS["echo"]


def test_lcd_is_the_same_recipe_on_a_pixel_vp_teacher(tmp_path):
    """LCD = CD on a VP model with a skipping step and a w input: a pixel VP teacher gives a pixel LCM that takes
    the guidance scale and samples on the skipped grid."""
    common = ["--batch", "8", "--no-progress", "--steps", "2"]
    assert main(["train-teacher", "--dataset", "digits", "--parameterization", "vp", "--width", "8",
                 "--out", str(tmp_path / "vp"), "--work-dir", str(tmp_path / "r1"), *common]) == 0
    assert main(["distill", "--method", "lcd", "--teacher", str(tmp_path / "vp"), "--skip", "50",
                 "--min-guidance-scale", "1", "--max-guidance-scale", "3", "--out", str(tmp_path / "lcm"),
                 "--work-dir", str(tmp_path / "r2"), *common]) == 0
    lcm = load_model(tmp_path / "lcm")
    assert (lcm.config.kind, lcm.config.parameterization, lcm.config.original_inference_steps) == ("consistency", "lcm", 20)
    assert lcm.takes_guidance and lcm.diffusers_pipeline is None and lcm.codec.pixels
    grid = sampling_grid(lcm, 2)
    assert torch.allclose(grid[:2], lcm.schedule.sigmas[torch.tensor([999, 499])].float())   # LCMScheduler's grid
    images = generate(lcm, torch.tensor([1, 2]), steps=2, guidance_scale=2.0, seed=0)
    assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()


def test_every_shipped_kind_of_model_fits_the_three_protocols():
    from fewstep.models.protocols import Backbone, Codec, Conditioner

    for name in ("digits-teacher", "emoji-sd", "emoji-sdxl", "emoji-lcm"):
        model = load_model(f"models/{name}")
        assert isinstance(model.conditioner, Conditioner) and isinstance(model.codec, Codec), name
        assert isinstance(model.backbone, Backbone), name
        assert model.unet is model.backbone        # the old name still works
    assert load_model("models/emoji-sd").diffusers_pipeline == "StableDiffusionPipeline"
    assert load_model("models/emoji-sdxl").diffusers_pipeline == "StableDiffusionXLPipeline"
    assert load_model("models/emoji-lcm").diffusers_pipeline == "LatentConsistencyModelPipeline"
    assert load_model("models/digits-teacher").diffusers_pipeline is None
