"""Zero-shot editing (Song et al. 2023, Algorithm 4): the kept part of the input survives exactly,
the transforms are orthogonal, the exact oracle denoises and inpaints a finite data set, and
`fewstep edit` has help and one-line errors."""

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import run_cli as run
from helpers import save_pixel_model as save_model
from helpers import tiny_unet
from PIL import Image

from fewstep.cli import build_parser
from fewstep.core.oracle import ExactDenoiser
from fewstep.core.schedules import EDMSchedule
from fewstep.editing import constraints as C
from fewstep.editing import zero_shot as Z
from fewstep.errors import FewstepError
from fewstep.eval import editing as M
from fewstep.models.config import ModelConfig
from fewstep.models.folders import new_pixel_model
from fewstep.models.handle import Model

SIGMAS = [80.0, 5.0, 0.5]  # 3 evaluations keep the tests fast


def _config(channels: int = 1, classes: int = 3) -> ModelConfig:
    return ModelConfig(schedule=asdict(EDMSchedule()), image_size=8, channels=channels,
                       class_names=[str(i) for i in range(classes)], dataset="random")


def _tiny(channels: int = 1) -> Model:
    torch.manual_seed(0)
    return new_pixel_model(_config(channels), tiny_unet(channels=channels, dropout=0.0), Path("tiny")).eval()


def _images(n: int = 4, channels: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, channels, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_inpainting_keeps_the_known_pixels_exactly():
    model, images = _tiny(), _images()
    known = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(2)) > 0.5
    out = Z.inpaint(model, images, known, sigmas=SIGMAS, labels=[1], seed=3)
    assert torch.equal(out[known.expand_as(out)], images[known.expand_as(images)])
    assert not torch.allclose(out, images) and out.abs().max() <= 1
    half = C.half_mask(8, "bottom")
    assert half[:4].all() and not half[4:].any()
    assert torch.equal(Z.inpaint(model, images, half, sigmas=SIGMAS, seed=3), Z.inpaint(model, images, half, sigmas=SIGMAS,
                                                                                        seed=3))  # seeded


def test_colorization_keeps_luminance_exactly():
    model, images = _tiny(channels=3), _images(channels=3)
    out = Z.colorize(model, images, sigmas=SIGMAS, seed=0)
    assert (C.luminance(out) - C.luminance(images)).abs().max() < 1e-5
    assert (out - images).abs().max() > 0.1  # the colours did change


@pytest.mark.parametrize("factor", [2, 4])
def test_superres_patch_means_equal_the_low_res_input(factor):
    model, images = _tiny(), _images()
    out = Z.superres(model, images, factor, sigmas=SIGMAS, seed=0)
    assert (F.avg_pool2d(out, factor) - F.avg_pool2d(images, factor)).abs().max() < 1e-5
    assert (out - images).abs().max() > 0.1
    low_res_view = C.superresolution(factor).degrade(images)  # what the loop sees: the patch means, upsampled
    assert torch.allclose(low_res_view, F.interpolate(F.avg_pool2d(images, factor), scale_factor=factor), atol=1e-6)


@pytest.mark.parametrize("first", [C.LUMA, [1.0] * 4, [1.0] * 16])
def test_bases_are_orthogonal_with_the_kept_direction_first(first):
    q = C.orthogonal_basis(first)
    assert torch.allclose(q @ q.T, torch.eye(len(first), dtype=q.dtype), atol=1e-12)
    v = torch.tensor(first, dtype=q.dtype)
    assert torch.allclose(q[:, 0], v / v.norm(), atol=1e-12)


@pytest.mark.parametrize("constraint, channels", [(C.colorization(), 3), (C.superresolution(2), 1),
                                                  (C.superresolution(4), 3)])
def test_transforms_are_inverted_and_norm_preserving(constraint, channels):
    x = _images(channels=channels).double()
    a = constraint.A(x)
    assert torch.allclose(constraint.A_inv(a), x, atol=1e-12)
    assert torch.allclose(a.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1), atol=1e-12)  # A orthogonal


def test_slerp_endpoints_and_norms():
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, 1, 8, 8, generator=g)
    assert torch.equal(Z.slerp(z0, z1, 0.0), z0) and torch.equal(Z.slerp(z0, z1, 1.0), z1)
    z1 = z1 * (z0.flatten(1).norm(dim=1) / z1.flatten(1).norm(dim=1))[:, None, None, None]  # equal norms
    for t in (0.25, 0.5, 0.9):
        assert torch.allclose(Z.slerp(z0, z1, t).flatten(1).norm(dim=1), z0.flatten(1).norm(dim=1), rtol=1e-5)
    assert torch.allclose(Z.slerp(z0, z0, 0.3), z0)  # θ = 0 falls back to a (trivial) lerp


def test_interpolation_frames_start_and_end_at_the_one_step_samples():
    model = _tiny()
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, 1, 8, 8, generator=g)
    frames = Z.interpolate(model, z0, z1, 5, labels=[0, 2])
    assert frames.shape == (2, 5, 1, 8, 8)
    ends = Z.edit(model, None, [80.0], x=80 * torch.cat([z0, z1]), labels=[0, 2, 0, 2])
    assert torch.allclose(frames[:, 0], ends[:2], atol=1e-5) and torch.allclose(frames[:, -1], ends[2:], atol=1e-5)


def _oracle(n: int = 16) -> tuple[Model, torch.Tensor]:
    """A model whose denoiser is the exact oracle of ``n`` random images (unconditional)."""
    data = _images(n, seed=5)
    config = ModelConfig(schedule=asdict(EDMSchedule()), image_size=8, channels=1, dataset="random")
    model = new_pixel_model(config, tiny_unet(), Path("oracle"))
    model.denoiser = ExactDenoiser(data)
    return model, data


def test_denoise_with_the_exact_oracle_recovers_the_data_point():
    model, data = _oracle()
    noisy = data[3:5] + 0.3 * torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(Z.denoise(model, noisy, 0.3), data[3:5], atol=1e-4)
    assert torch.allclose(Z.denoise(model, noisy, 0.3, refine=[0.1]), data[3:5], atol=1e-4)


def test_inpainting_with_the_exact_oracle_recovers_the_data_point():
    """The posterior of a finite data set given half of one of its points is that point."""
    model, data = _oracle()
    out = Z.inpaint(model, data[:4], C.half_mask(8, "right"), sigmas=[80.0, 5.0, 1.0, 0.2], seed=0)
    assert torch.allclose(out, data[:4], atol=1e-4)


def test_bad_noise_levels_and_labels_are_clear_errors():
    model, images = _tiny(), _images()
    for sigmas in ([], [5.0, 20.0], [1.0, 0.0]):
        with pytest.raises(FewstepError, match="strictly decreasing"):
            Z.inpaint(model, images, C.half_mask(8, "top"), sigmas=sigmas)
    with pytest.raises(FewstepError, match="one label or one per image"):
        Z.inpaint(model, images, C.half_mask(8, "top"), sigmas=SIGMAS, labels=[0, 1])
    with pytest.raises(FewstepError, match="RGB"):
        Z.colorize(model, images)


def test_edit_metrics_on_the_shipped_teacher():
    """The bench's measurements run on real digits; their exactness figures hold on a real model."""
    from fewstep.cli import shipped_models_dir
    from fewstep.models.data import load_digits
    from fewstep.models.folders import load_model
    from fewstep.nets.classifier import load_classifier

    models, data = shipped_models_dir(), load_digits()
    model, classifier = load_model(models / "digits-teacher"), load_classifier(models / "digits-classifier")
    r = M.edit_metrics(model, classifier, data.images[:8], data.labels[:8])
    assert r["sigmas"] == [80.0, *Z.DEFAULT_SIGMAS] and r["colorize"] is None
    assert r["superres_4x"]["max_patch_mean_error"] < 1e-5
    assert r["denoise"]["psnr"] > r["denoise"]["noisy_psnr"] + 5
    for key in ("inpaint_bottom", "inpaint_right", "superres_4x", "stroke"):
        assert (8 * r[key]["accuracy"]).is_integer(), r[key]        # a share of the 8 images
    from fewstep.editing.constraints import half_mask
    from fewstep.eval.editing import accuracy
    inpainted = Z.inpaint(model, data.images[:8], half_mask(16, "bottom"), seed=0)
    assert r["inpaint_bottom"]["accuracy"] == accuracy(classifier, inpainted, data.labels[:8])
    # even the teacher used as a one-step denoiser beats the naive fills on these digits
    assert r["inpaint_bottom"]["accuracy"] > r["inpaint_bottom"]["baseline_accuracy"]
    assert r["superres_4x"]["accuracy"] > r["superres_4x"]["bicubic_accuracy"]
    assert 0 < r["interpolate"]["min_confidence"] <= r["interpolate"]["mean_confidence"] <= 1


# --- the command line ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_model(tmp_path_factory.mktemp("models") / "tiny", tiny_unet(), _config())


def _png(path: Path, size: int, value: int = 255) -> Path:
    arr = np.zeros((size, size), dtype=np.uint8)
    arr[: size // 2] = value
    Image.fromarray(arr).save(path)
    return path


def test_edit_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["edit", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "usage: fewstep edit" in out and "Algorithm 4" in out and "--mask-half" in out


def test_edit_writes_a_reproducible_grid(tiny_model, tmp_path, capsys):
    image, mask = _png(tmp_path / "in.png", 8, 200), _png(tmp_path / "mask.png", 8)
    outs = [tmp_path / "a.png", tmp_path / "b.png"]
    for out in outs:
        code, stdout, err = run(capsys, "edit", "--task", "inpaint", "--model", str(tiny_model), "--input", str(image),
                                str(image), "--mask", str(mask), "--sigmas", "80,2", "--seed", "1", "--scale", "1",
                                "--out", str(out))
        assert code == 0, err
    assert outs[0].read_bytes() == outs[1].read_bytes() and "3 rows of 2 images" in stdout
    assert Image.open(outs[0]).size == (110 + 2 * 9 + 1, 3 * (9 + 1) + 0)  # 3 rows of 2 8-px images, label margin
    code, stdout, _ = run(capsys, "edit", "--task", "interpolate", "--model", str(tiny_model), "--num", "2",
                          "--frames", "3", "--out", str(tmp_path / "i.png"))
    assert code == 0 and "2 rows of 3 images" in stdout
    code, _, err = run(capsys, "edit", "--task", "superres", "--factor", "2", "--model", str(tiny_model), "--input",
                       str(_png(tmp_path / "low.png", 4)), "--sigmas", "80,1", "--out", str(tmp_path / "s.png"))
    assert code == 0, err  # a low-res input is upsampled to the model's size


@pytest.mark.parametrize("args, fragments", [
    (["--task", "paint", "--input", "{img}"], ["invalid choice", "paint"]),
    (["--task", "inpaint", "--input", "{tmp}/missing.png"], ["missing.png", "does not exist"]),
    (["--task", "inpaint"], ["needs --input"]),
    (["--task", "inpaint", "--input", "{img}", "--mask", "{small}"], ["4x4", "8x8"]),
    (["--task", "superres", "--input", "{small}", "--factor", "4"], ["4x4", "8x8 or 2x2"]),
    (["--task", "colorize", "--input", "{img}"], ["RGB"]),
    (["--task", "denoise", "--input", "{img}", "--mask-half", "top"], ["--mask", "inpaint only"]),
    (["--task", "stroke", "--input", "{img}", "--sigmas", "1,5"], ["strictly decreasing"]),
    (["--task", "inpaint", "--input", "{img}", "--label", "7"], ["label 7", "0..2"]),
])
def test_edit_bad_input_is_one_clear_line_and_no_output(tiny_model, tmp_path, capsys, args, fragments):
    img, small = _png(tmp_path / "img.png", 8), _png(tmp_path / "small.png", 4)
    out = tmp_path / "out.png"
    argv = ["edit", "--model", str(tiny_model), "--out", str(out)]
    argv += [a.format(img=img, small=small, tmp=tmp_path) for a in args]
    code, _, err = run(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "error" in lines[0] and "Traceback" not in err, err
    for f in fragments:
        assert f in lines[0], lines[0]
    assert not out.exists()
