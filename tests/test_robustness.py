"""Nothing lost, nothing let in: bad input on every subcommand is one line and leaves nothing behind, a
user's folder is never destroyed, an overwrite killed at any moment leaves the old or the new folder,
non-finite weights are never saved, one run per work folder, only safetensors, images read as meant."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_cli, save_pixel_model, tiny_setup, tiny_unet
from PIL import Image

from fewstep.core.schedules import EDMSchedule
from fewstep.errors import FewstepError, TrainingDiverged
from fewstep.models.config import ModelConfig
from fewstep.models.folders import load_model, shipped_models_dir
from fewstep.training import TrainConfig, train
from fewstep.training.runs import WorkDirLock

MODELS = shipped_models_dir()


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    """A scratch folder with a tiny model, a user's folder with a file in it, and bad inputs."""
    root = tmp_path_factory.mktemp("bad")
    torch.manual_seed(0)
    config = ModelConfig(schedule=asdict(EDMSchedule()), image_size=8, channels=1, class_names=["a", "b", "c"],
                         dataset="digits")
    save_pixel_model(root / "tiny", tiny_unet(), config)
    (root / "mine").mkdir()
    (root / "mine" / "thesis.txt").write_text("years of work")
    (root / "afile").write_text("not a folder")
    (root / "text.png").write_text("not an image")
    Image.new("1", (5000, 4000)).save(root / "huge.png")            # 20M pixels: refused before decoding
    (root / "broken.json").write_text("{not json")
    for name, raw in {"wrongtype": {"image_size": "big"}, "banana": {"kind": "banana"},
                      "boolnum": {"default_steps": True}, "nanscale": {"default_guidance_scale": float("nan")},
                      "badlist": {"class_names": "abc"}, "badgrid": {"sampling_sigmas": {"2": ["x"]}}}.items():
        folder = root / name
        folder.mkdir()
        good = json.loads((root / "tiny" / "fewstep.json").read_text())
        (folder / "fewstep.json").write_text(json.dumps({**good, **raw}).replace("NaN", "NaN"))
        os.symlink(root / "tiny" / "unet", folder / "unet")
    (root / "pickle-lora").mkdir()
    torch.save({"w": torch.zeros(1)}, root / "pickle-lora" / "pytorch_lora_weights.bin")
    return root


def _cases(p: Path):
    t, s = str(p / "tiny"), str(p / "out.png")
    sd = str(MODELS / "emoji-sd")
    return [
        (["sample", "--model", t, "--guidance-scale", "inf", "--out", s], "--guidance-scale"),
        (["sample", "--model", t, "--guidance-scale", "nan", "--out", s], "--guidance-scale"),
        (["sample", "--model", t, "--seed", str(2**70), "--out", s], "seed"),
        (["sample", "--model", t, "--scale", "100000", "--out", s], "--allow-large"),
        (["sample", "--model", t, "--steps", "1000000", "--out", s], "--allow-large"),
        (["sample", "--model", t, "--sigmas", "80,nan", "--out", s], "noise levels"),
        (["sample", "--model", str(p / "afile"), "--out", s], "is not a model: not a safetensors checkpoint"),
        (["sample", "--model", t, "--out", str(p / "mine")], "folder"),
        (["sample", "--model", sd, "--lora", f"{MODELS / 'emoji-lcm-lora'}:nan", "--out", s], "finite"),
        (["sample", "--model", sd, "--lora", str(p / "pickle-lora"), "--out", s], "pickle"),
        (["edit", "--task", "denoise", "--model", t, "--dataset", "digits", "--num", "100000", "--out", s], "--allow-large"),
        (["edit", "--task", "denoise", "--model", t, "--dataset", "digits", "--noise-sigma", "nan", "--out", s], "sigma"),
        (["edit", "--task", "img2img", "--model", t, "--dataset", "digits", "--strength", "2", "--out", s], "strength"),
        (["edit", "--task", "denoise", "--model", t, "--input", str(p / "text.png"), "--out", s], "cannot read image"),
        (["edit", "--task", "denoise", "--model", t, "--input", str(p / "huge.png"), "--out", s], "pixels"),
        (["edit", "--task", "denoise", "--model", t, "--input", str(p / "mine"), "--out", s], "is a folder"),
        (["eval", "--model", t, "--num", "1"], "at least 4"),
        (["eval", "--model", t, "--num", "3"], "at least 4"),
        (["eval", "--model", t, "--guidance-scale", "inf"], "--guidance-scale"),
        (["eval", "--model", t, "--save-sigmas"], "--tune-sigmas"),
        (["eval", "--model", t, "--json", str(p / "nowhere" / "e.json")], "does not exist"),
        *[(["sample", "--model", str(p / bad), "--out", s], why) for bad, why in
          (("wrongtype", "image_size"), ("banana", "kind"), ("boolnum", "default_steps"),
           ("nanscale", "default_guidance_scale"), ("badlist", "class_names"), ("badgrid", "sampling_sigmas"))],
        *[(["train", "--method", "ct", "--out", str(p / "o"), "--steps", "1", *flag], name) for flag, name in
          ((["--lr", "nan"], "--lr"), (["--lr", "-1"], "--lr"), (["--lr", "inf"], "--lr"), (["--ema", "2"], "--ema"),
           (["--label-dropout", "2"], "--label-dropout"), (["--label-dropout", "-0.1"], "--label-dropout"),
           (["--target-ema", "1.5"], "--target-ema"), (["--augment", "2"], "--augment"))],
        (["train", "--method", "ct", "--out", ".", "--steps", "1"], "current folder"),
        (["train", "--method", "ct", "--out", str(p / "mine"), "--steps", "1"], "not a fewstep output"),
        (["train", "--method", "ct", "--out", str(p / "afile" / "x"), "--steps", "1"], "writable"),
        (["distill", "--method", "guided", "--teacher", t, "--out", str(p / "o"), "--min-guidance-scale", "nan"],
         "--min-guidance-scale"),
        (["lora", "merge", "--base", sd, "--lora", str(MODELS / "emoji-lcm-lora"), "--out", str(p / "mine")],
         "not a fewstep output"),
        (["bench", "--only", "guided", "--reuse", str(p / "missing.json")], "no report"),
        (["bench", "--only", "guided", "--reuse", str(p / "broken.json")], "not a fewstep bench report"),
        (["bench", "--render-only", "--reuse", str(p / "broken.json"), "--markdown", str(p / "no" / "B.md")],
         "does not exist"),
        (["demo", "--out", str(p / "afile")], "is a file"),
    ]


def test_bad_input_everywhere_is_one_line_and_leaves_nothing(place, capsys):
    before = {f: f.read_bytes() for f in place.rglob("*") if f.is_file()}
    failures = []
    for argv, fragment in _cases(place):
        code, _, err = run_cli(capsys, *argv)
        lines = [line for line in err.strip().splitlines() if not line.startswith("fewstep: warning")]
        if code != 2 or len(lines) != 1 or "Traceback" in err or fragment not in lines[0]:
            failures.append((argv, code, err[-400:]))
    assert not failures, failures
    assert not (place / "out.png").exists() and not (place / "o").exists()
    after = {f: f.read_bytes() for f in place.rglob("*") if f.is_file()}
    assert after == before                                   # the user's files (and everything else) intact


def test_existing_user_folder_is_replaced_only_with_overwrite(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "train-classifier", "--dataset", "digits", "--out", str(tmp_path / "mine"),
                           "--epochs", "1", "--no-progress")
    assert code == 2 and (tmp_path / "mine" / "notes.txt").read_text() == "mine"
    code, _, err = run_cli(capsys, "train-classifier", "--dataset", "digits", "--out", str(tmp_path / "mine"),
                           "--epochs", "1", "--no-progress", "--overwrite")
    assert code == 0, err
    assert (tmp_path / "mine" / "model.safetensors").exists()
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"    # --overwrite adds fewstep's files, keeps the user's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]            # no temporary or old copy left


WRITER = """
import sys, torch
from dataclasses import asdict
sys.path.insert(0, {tests!r})
from helpers import save_pixel_model, tiny_unet
from fewstep.core.schedules import EDMSchedule
from fewstep.models.config import ModelConfig
config = ModelConfig(schedule=asdict(EDMSchedule()), image_size=8, channels=1, class_names=["a", "b", "c"])
for i in range(10**6):
    torch.manual_seed(i % 2)
    save_pixel_model({folder!r}, tiny_unet(), config)
    print(i, flush=True)
"""


def test_overwrite_killed_at_any_moment_leaves_the_old_or_the_new_folder(tmp_path):
    """A process rewriting a model folder over and over is SIGKILLed at random moments; every time the
    folder is there and complete (one of the two versions), never missing or half-written."""
    folder = tmp_path / "model"
    code = WRITER.format(tests=str(Path(__file__).parent), folder=str(folder))
    versions = []
    for seed in (0, 1):                                     # the writer's two versions: tiny_unet() under seed 0, 1
        torch.manual_seed(seed)
        versions.append(tiny_unet().state_dict())
    rng = np.random.default_rng(0)
    for trial in range(6):
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        first = proc.stdout.readline()                      # one complete write first ("" if the writer died)
        assert first, f"the writer died before its first write: {proc.stderr.read()[-2000:]}"
        time.sleep(float(rng.uniform(0.0, 0.4)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = load_model(folder).net.state_dict()         # complete and loadable, whatever the moment was
        assert any(all(torch.equal(state[k], v) for k, v in version.items()) for version in versions), \
            f"trial {trial}: the folder holds neither version whole (a half-written or mixed folder)"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "model"]
    assert all(name.startswith(".model.") for name in leftovers)   # at most hidden temporaries, never the target


def test_non_finite_weights_are_never_checkpointed_or_saved(tmp_path):
    model, objective, data = tiny_setup()

    class Poison:                                            # the denoising loss, then NaN weights after step 2
        def __call__(self, m, batch):
            return objective(m, batch)

        def after_step(self, m, step):
            if step == 2:
                with torch.no_grad():
                    next(m.parameters()).fill_(float("nan"))

    config = TrainConfig(out_dir=str(tmp_path), max_steps=4, batch_size=8, checkpoint_every=1, progress=False)
    with pytest.raises(TrainingDiverged, match="non-finite.*step-0000001"):
        train(model, Poison(), data, config)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000001"]
    config = ModelConfig(schedule=asdict(EDMSchedule()), image_size=8, channels=1, class_names=["a", "b", "c"])
    with pytest.raises(FewstepError, match="not finite"):
        save_pixel_model(tmp_path / "m", model.net, config)
    assert not (tmp_path / "m").exists()


HOLDER = """
import sys, time
from fewstep.training.runs import WorkDirLock
with WorkDirLock({folder!r}):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_one_run_per_work_folder_and_stale_locks_are_taken_over(tmp_path):
    model, objective, data = tiny_setup()
    config = TrainConfig(out_dir=str(tmp_path), max_steps=1, batch_size=8, progress=False)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER.format(folder=str(tmp_path))], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    try:
        with pytest.raises(FewstepError, match=f"pid {proc.pid}"):
            train(model, objective, data, config)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    train(model, objective, data, config)                    # the killed holder's lock is stale: taken over
    assert not (tmp_path / ".fewstep-run.lock").exists()
    with WorkDirLock(tmp_path):
        pass


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    model, objective, data = tiny_setup()
    train(model, objective, data, TrainConfig(out_dir=str(tmp_path), max_steps=2, batch_size=8, progress=False))
    other = TrainConfig(out_dir=str(tmp_path), max_steps=3, batch_size=16, progress=False)
    with pytest.raises(FewstepError, match="batch_size: 8 → 16.*--force-resume"):
        train(model, objective, data, other)
    longer = TrainConfig(out_dir=str(tmp_path), max_steps=3, batch_size=8, progress=False)
    assert train(model, objective, data, longer).step == 3   # running longer is the same run
    forced = TrainConfig(out_dir=str(tmp_path), max_steps=4, batch_size=16, progress=False, force_resume=True)
    assert train(model, objective, data, forced).step == 4


def test_images_are_read_as_users_mean_them(tmp_path):
    from fewstep.io.images import read_png

    ramp = (np.linspace(0, 65535, 16)[None].repeat(16, 0)).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "16bit.png")                        # a 16-bit grayscale gradient
    x = read_png(tmp_path / "16bit.png", 1)
    assert x.shape == (1, 1, 16, 16) and x.min() == -1 and x.max() == 1 and len(x.unique()) == 16   # scaled, not clipped
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:4, :, :] = (255, 0, 0, 255)                                        # red top half, transparent bottom half
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    y = read_png(tmp_path / "alpha.png", 3)
    assert torch.equal(y[0, :, 6, 6], torch.ones(3)) and torch.allclose(y[0, :, 1, 1], torch.tensor([1.0, -1.0, -1.0]))
    Image.fromarray(rgba, "RGBA").convert("P").save(tmp_path / "palette.png")
    assert torch.allclose(read_png(tmp_path / "palette.png", 3)[0, :, 1, 1], torch.tensor([1.0, -1.0, -1.0]))
    tall = Image.new("L", (4, 8), 0)
    tall.paste(255, (0, 0, 4, 1))                                            # a white first row
    exif = Image.Exif()
    exif[0x0112] = 6                                                         # "rotate 90° clockwise to display"
    tall.save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    z = read_png(tmp_path / "rotated.jpg", 1)
    assert z.shape[-2:] == (4, 8) and z[0, 0, :, -1].mean() > 0.8            # the white row is now the right column
