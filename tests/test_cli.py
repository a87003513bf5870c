"""The command line: --help everywhere, reproducible output, and one clear line for bad input
(exit 2, no traceback, no partial output file)."""

import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from helpers import run_cli as run
from helpers import save_pixel_model as save_model
from helpers import tiny_unet
from PIL import Image

from fewstep.cli import build_parser
from fewstep.core.schedules import EDMSchedule
from fewstep.models.config import ModelConfig
from fewstep.models.folders import load_model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = ModelConfig(schedule=asdict(EDMSchedule()), image_size=8, channels=1, class_names=["a", "b", "c"],
                         dataset="random")
    return save_model(tmp_path_factory.mktemp("models") / "tiny", tiny_unet(), config)


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in err, err
    for f in fragments:
        assert f in lines[0], lines[0]


def test_every_subcommand_has_help(capsys):
    result = subprocess.run([sys.executable, "-m", "fewstep", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "usage: fewstep" in result.stdout  # the installed entry point
    subcommands = build_parser()._subparsers._group_actions[0].choices
    assert {"demo", "train-teacher", "train-classifier", "sample", "eval", "bench"} <= set(subcommands)
    for name in subcommands:
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args([name, "--help"])
        assert exit_.value.code == 0 and "usage: fewstep " + name in capsys.readouterr().out


def test_sample_writes_reproducible_grid(tiny_model, tmp_path, capsys):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    for out in (a, b):
        code, _, _ = run(capsys, "sample", "--model", str(tiny_model), "--steps", "2", "--num", "3", "--label", "0", "2",
                         "--guidance-scale", "1.5", "--seed", "4", "--scale", "1", "--out", str(out))
        assert code == 0
    assert a.read_bytes() == b.read_bytes()
    assert Image.open(a).size == (3 * 9 + 1, 2 * 9 + 1)  # 2 labels × 3 images of 8 px, 1 px padding


@pytest.mark.parametrize("sampler", ["ddim", "euler", "heun", "dpmpp-2m", "ddpm"])
def test_every_sampler_runs_from_the_cli(tiny_model, tmp_path, capsys, sampler):
    code, out, _ = run(capsys, "sample", "--model", str(tiny_model), "--sampler", sampler, "--steps", "2",
                       "--num", "1", "--out", str(tmp_path / "s.png"))
    assert code == 0 and "wrote 3 samples" in out


@pytest.mark.parametrize("args, fragments", [
    (["--model", "{missing}"], ["does not exist"]),
    (["--label", "7"], ["label 7", "0..2"]),
    (["--steps", "0"], ["--steps", "at least 1"]),
    (["--guidance-scale", "-1"], ["--guidance-scale", "[0, 100]"]),
    (["--out", "{tmp}/no/such/dir/x.png"], ["cannot write", "does not exist"]),
    (["--sampler", "plms"], ["invalid choice"]),
])
def test_bad_input_is_one_clear_line_and_no_output(tiny_model, tmp_path, capsys, args, fragments):
    out = tmp_path / "out.png"
    args = [a.format(missing=tmp_path / "missing", tmp=tmp_path) for a in args]
    argv = ["sample", "--model", str(tiny_model), "--steps", "1", "--num", "1", "--out", str(out)] + args
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, *fragments)
    assert not out.exists() and not list(tmp_path.glob("*.png"))


def test_corrupt_model_folder_is_a_clear_error(tiny_model, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_model, bad)
    weights = bad / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code, _, err = run(capsys, "sample", "--model", str(bad), "--out", str(tmp_path / "x.png"))
    assert_one_line_error(code, err, "corrupt")
    (bad / "fewstep.json").write_text("{not json")
    code, _, err = run(capsys, "sample", "--model", str(bad), "--out", str(tmp_path / "x.png"))
    assert_one_line_error(code, err, "fewstep.json", "corrupt")
    assert not (tmp_path / "x.png").exists()


def test_saved_model_is_a_plain_diffusers_unet(tiny_model):
    """The backbone folder loads with diffusers alone, and fewstep's loader gives the same weights."""
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(tiny_model / "unet")
    ours = load_model(tiny_model).denoiser.net
    for (k, v), w in zip(unet.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(v, w), k
    assert not list(tiny_model.rglob("*.bin")) and not list(tiny_model.rglob("*.pt"))


def test_serve_backend_flags():
    """``--backend`` picks what runs the served networks (auto: ONNX Runtime); ``--no-trace`` is ``--backend eager``."""
    def parse(*flags: str) -> str:
        return build_parser().parse_args(["serve", "--model", "models/emoji-lcm", *flags]).backend

    assert parse() == "auto" and parse("--backend", "torchscript") == "torchscript" and parse("--no-trace") == "eager"
    with pytest.raises(SystemExit):
        parse("--backend", "tensorrt")
