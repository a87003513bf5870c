"""A user's files are never destroyed (DESIGN.md §2, issue 31 item 2), by any subcommand.

Every case runs ``fewstep.cli.main`` on copies of the shipped models in a scratch folder: an output that is
(or lies in, or contains) one of the command's inputs, or a user's folder that merely holds a common name
(model.safetensors, state.json, model_index.json), is refused with one line before any work and every file
stays byte-identical; ``--overwrite`` puts fewstep's files in and keeps the user's; a killed run's temporaries
are cleaned by the next run; a full disk or a read-only folder is one line with the old version intact."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
from helpers import run_cli, tiny_setup
from PIL import Image

from fewstep.errors import FewstepError
from fewstep.io.atomic import MARKER, atomic_path, is_fewstep_output, remove_stale_temporaries, write_text
from fewstep.models.folders import shipped_models_dir, write_folder

MODELS = shipped_models_dir()
DEAD = 999_999_999          # no process has this id (above any pid_max)


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for a folder): what must come out unchanged."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def user_folder(path: Path, *common: str) -> Path:
    """A user's folder: notes and a photo, plus files with names fewstep's outputs also use."""
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("years of work")
    Image.new("RGB", (4, 4), (200, 30, 30)).save(path / "photo.png")
    for name in common:
        (path / name).write_text('{"_class_name": "StableDiffusionPipeline"}' if name.endswith(".json") else "mine")
    return path


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    root = tmp_path_factory.mktemp("never")
    for name in ("digits-teacher", "emoji-sd", "emoji-lcm-lora", "emoji-style-lora"):
        shutil.copytree(MODELS / name, root / name)
    user_folder(root / "user", "model.safetensors")
    user_folder(root / "user-state", "state.json")
    user_folder(root / "user-diffusers", "model_index.json")
    Image.new("L", (16, 16), 128).save(root / "digit.png")
    (root / "data" / "shots").mkdir(parents=True)
    for i in range(2):
        Image.new("L", (16, 16), 60 * i).save(root / "data" / "shots" / f"{i}.png")
    return root


def one_line(err: str) -> list[str]:
    return [line for line in err.strip().splitlines() if not line.startswith("fewstep: warning")]


def refusals(p: Path):
    t, sd, lcm, style, user = (str(p / n) for n in ("digits-teacher", "emoji-sd", "emoji-lcm-lora", "emoji-style-lora",
                                                    "user"))
    merge = ["lora", "merge", "--base", sd, "--lora", f"{lcm}:1"]
    sample = ["sample", "--model", t, "--steps", "1", "--num", "1"]
    classifier = ["train-classifier", "--epochs", "1", "--no-progress"]
    return [
        # (what, argv, fragments of the one line: the flags and the fix)
        ("distill onto its teacher", ["distill", "--method", "cd", "--teacher", t, "--out", t, "--steps", "1"],
         ("--out", "is the --teacher", "give --out a path outside it")),
        ("distill into its teacher", ["distill", "--method", "cd", "--teacher", t, "--out", f"{t}/student", "--steps",
                                      "1"], ("--out", "is inside the --teacher", "outside")),
        ("train around its teacher's folder", ["distill", "--method", "cd", "--teacher", t, "--out", str(p),
                                               "--steps", "1"], ("--out", "contains the --teacher", "outside")),
        ("lora merge onto its base", [*merge, "--out", sd], ("--out", "is the --base", "outside")),
        ("lora merge onto a user's folder with model.safetensors", [*merge, "--out", user],
         ("--out", "not a fewstep output", "--overwrite")),
        ("lora merge onto a diffusers folder fewstep did not write", [*merge, "--out", str(p / "user-diffusers")],
         ("--out", "not a fewstep output", "--overwrite")),
        ("lora merge --no-fuse onto an input LoRA", [*merge, "--lora", f"{style}:0.5", "--no-fuse", "--out", style],
         ("--out", "is the --lora", "outside")),
        ("lora merge --no-fuse onto an input LoRA, even with --overwrite",
         [*merge, "--lora", f"{style}:0.5:style", "--no-fuse", "--out", style, "--overwrite"], ("is the --lora",)),
        ("lora export over its own LoRA file", ["lora", "export", style, "--format", "kohya", "--out",
                                                f"{style}/pytorch_lora_weights.safetensors", "--overwrite"],
         ("--out", "is inside the LORA", "outside")),
        ("sample --out-dir onto its model", [*sample, "--out-dir", t], ("--out-dir", "is the --model", "outside")),
        ("sample --out-dir onto a user's folder", [*sample, "--out-dir", user],
         ("--out-dir", "not a fewstep output", "--overwrite")),
        ("sample --out into its model folder", [*sample, "--out", f"{t}/samples.png"], ("--out", "--model")),
        ("train-classifier onto a user's folder with state.json", [*classifier, "--out", str(p / "user-state")],
         ("--out", "not a fewstep output", "--overwrite")),
        ("train-classifier onto a user's folder with model.safetensors", [*classifier, "--out", user],
         ("--out", "not a fewstep output", "--overwrite")),
        ("train-classifier around its data set", [*classifier, "--dataset", str(p / "data" / "shots"), "--out",
                                                  str(p / "data")], ("--out", "contains the --dataset")),
        ("edit over its input image", ["edit", "--task", "denoise", "--model", t, "--input", str(p / "digit.png"),
                                       "--out", str(p / "digit.png")], ("--out", "is the --input")),
        ("eval --json over its model's record", ["eval", "--model", t, "--num", "4", "--json", f"{t}/fewstep.json"],
         ("--json", "is inside the --model")),
    ]


CASES = [c[0] for c in refusals(Path("."))]


@pytest.fixture
def no_work(monkeypatch):
    """Any loading of a model or data set fails the test: a refusal must come before any work. (Every fewstep
    module is imported first, so that none binds a patched loader by importing it during the test.)"""
    import importlib
    import pkgutil

    import fewstep

    for info in pkgutil.walk_packages(fewstep.__path__, "fewstep."):
        if info.name.endswith("__main__"):
            continue
        try:
            importlib.import_module(info.name)
        except ImportError:                           # an optional dependency that is not installed
            continue
    import fewstep.models.data
    import fewstep.models.folders
    import fewstep.models.lora_export
    import fewstep.models.loras

    def started(*args, **kwargs):
        raise AssertionError("work began before the refusal")

    for module, name in ((fewstep.models.folders, "load_model"), (fewstep.models.loras, "load_with_loras"),
                         (fewstep.models.data, "load_dataset"), (fewstep.models.lora_export, "export_lora")):
        monkeypatch.setattr(module, name, started)


@pytest.mark.parametrize("case", CASES)
def test_an_output_over_an_input_or_a_users_folder_is_refused_and_nothing_changes(place, capsys, no_work, case):
    _, argv, fragments = next(c for c in refusals(place) if c[0] == case)
    before = snapshot(place)
    code, _, err = run_cli(capsys, *argv)
    lines = one_line(err)
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert all(f in lines[0] for f in fragments), lines[0]
    assert snapshot(place) == before                 # every input and user file byte-identical, nothing added


def test_overwrite_puts_fewsteps_files_in_and_keeps_the_users(tmp_path, capsys):
    """--overwrite onto a user's folder: fewstep's files go in, notes.txt and photo.png stay; the next run
    removes only the files fewstep wrote last time (an --out-dir of earlier images needs --overwrite again:
    sampled images are results, not a model a re-run rebuilds)."""
    shutil.copytree(MODELS / "digits-teacher", tmp_path / "teacher")
    out = user_folder(tmp_path / "shots")
    mine = {n: (out / n).read_bytes() for n in ("notes.txt", "photo.png")}
    sample = ["sample", "--model", str(tmp_path / "teacher"), "--steps", "1", "--num", "1", "--out-dir", str(out)]
    code, _, err = run_cli(capsys, *sample, "--label", "0", "1", "2", "--overwrite")
    assert code == 0, err
    assert {n: (out / n).read_bytes() for n in mine} == mine
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "00000.png", "00001.png", "00002.png", "notes.txt",
                                                     "photo.png"]
    assert json.loads((out / MARKER).read_text())["files"] == ["00000.png", "00001.png", "00002.png"]
    (out / "later.txt").write_text("added after the first run")
    code, _, err = run_cli(capsys, *sample, "--label", "7")
    assert code == 2 and "earlier run" in err and "--overwrite" in err
    code, _, err = run_cli(capsys, *sample, "--label", "7", "--overwrite")    # one image now
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "00000.png", "later.txt", "notes.txt", "photo.png"]
    assert {n: (out / n).read_bytes() for n in mine} == mine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shots", "teacher"]   # no temporary or old copy left


def test_overwrite_train_classifier_and_lora_merge_keep_the_users_files(tmp_path, capsys):
    for name in ("emoji-sd", "emoji-lcm-lora"):
        shutil.copytree(MODELS / name, tmp_path / name)
    for out, argv in ((tmp_path / "clf", ["train-classifier", "--epochs", "1", "--no-progress"]),
                      (tmp_path / "merged", ["lora", "merge", "--base", str(tmp_path / "emoji-sd"), "--lora",
                                             str(tmp_path / "emoji-lcm-lora")])):
        user_folder(out, "model.safetensors")
        code, _, err = run_cli(capsys, *argv, "--out", str(out))
        assert code == 2 and "--overwrite" in err
        code, _, err = run_cli(capsys, *argv, "--out", str(out), "--overwrite")
        assert code == 0, err
        assert (out / "notes.txt").read_text() == "years of work" and (out / "photo.png").exists()
        assert is_fewstep_output(out)
    assert (tmp_path / "clf" / "model.safetensors").read_bytes() != b"mine"  # the colliding name is fewstep's now
    assert (tmp_path / "merged" / "unet").is_dir()


def test_folders_fewstep_wrote_before_markers_are_still_its_own(tmp_path, capsys):
    """A shipped model folder (fewstep.json, no marker) is replaced by a re-run without --overwrite; a classifier
    folder whose config.json records a fewstep command too; a config.json alone or model_index.json is not."""
    for name in ("emoji-sd", "emoji-lcm-lora", "emoji-style-lora", "digits-classifier"):
        shutil.copytree(MODELS / name, tmp_path / name)
    assert not (tmp_path / "emoji-style-lora" / MARKER).exists() and is_fewstep_output(tmp_path / "emoji-style-lora")
    assert is_fewstep_output(tmp_path / "digits-classifier")
    (tmp_path / "emoji-style-lora" / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "lora", "merge", "--no-fuse", "--base", str(tmp_path / "emoji-sd"), "--lora",
                           str(tmp_path / "emoji-lcm-lora"), "--out", str(tmp_path / "emoji-style-lora"))
    assert code == 0, err
    assert (tmp_path / "emoji-style-lora" / "notes.txt").read_text() == "mine"  # a file it cannot tell is its own
    assert json.loads((tmp_path / "emoji-style-lora" / "fewstep.json").read_text())["kind"] == "lora-set"
    plain = user_folder(tmp_path / "plain", "config.json")
    assert not is_fewstep_output(plain) and not is_fewstep_output(tmp_path / "emoji-sd" / "unet")


def test_a_killed_runs_temporaries_are_cleaned_by_the_next_run(tmp_path, capsys):
    """Temporaries named after the target and a process that is gone are removed by the next run writing the
    target (a live process's are left alone); an old version a run set aside before it was killed is put back."""
    shutil.copytree(MODELS / "digits-teacher", tmp_path / "teacher")
    out = tmp_path / "shots"
    dead = tmp_path / f".shots.tmp-{DEAD}-abcd"
    dead.mkdir()
    (dead / "00000.png").write_bytes(b"half a png")
    (tmp_path / f".shots.tmp-{DEAD}-beef").write_bytes(b"half a file")
    live = tmp_path / f".shots.tmp-{os.getppid()}-abcd"
    live.mkdir()
    other = tmp_path / f".teacher.tmp-{DEAD}-abcd"                      # another target's: not this run's business
    other.mkdir()
    code, _, err = run_cli(capsys, "sample", "--model", str(tmp_path / "teacher"), "--steps", "1", "--num", "1",
                           "--label", "3", "--out-dir", str(out))
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, "shots", "teacher"])
    # a run killed between setting the old version aside and putting the new one in: the old comes back
    shutil.rmtree(live)
    os.rename(out, tmp_path / f".shots.old-{DEAD}-abcd")
    assert remove_stale_temporaries(out) and (out / "00000.png").exists() and is_fewstep_output(out)


KILLED_WRITER = """
import sys, time
from fewstep.models.folders import write_folder
def write(tmp):
    (tmp / "weights.bin").write_bytes(b"x" * 1000)
    print("writing", flush=True)
    time.sleep(60)
write_folder({out!r}, write)
"""


def test_a_run_killed_mid_write_leaves_the_old_version_and_a_rerun_cleans_up(tmp_path):
    out = tmp_path / "model"
    write_folder(out, lambda tmp: (tmp / "weights.bin").write_bytes(b"old"))
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER.format(out=str(out))], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "weights.bin").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".model.tmp-")]    # its temporary is left
    write_folder(out, lambda tmp: (tmp / "weights.bin").write_bytes(b"new"))
    assert (out / "weights.bin").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# --- a full disk and a read-only folder: one line, the old version intact --------------------------------
def _disk_full(monkeypatch, after_bytes: int = 10):
    """Every safetensors write runs out of space after ``after_bytes`` bytes, as safetensors reports it."""
    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * after_bytes)
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    import fewstep.nets.classifier
    import fewstep.training.checkpoints

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    for module in (fewstep.nets.classifier, fewstep.training.checkpoints):
        monkeypatch.setattr(module, "save_file", save_file)
    try:
        import transformers.modeling_utils
        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_file)
    except (ImportError, AttributeError):
        pass


def _full_disk_cases(p: Path):
    sd, lcm, style = str(p / "emoji-sd"), str(p / "emoji-lcm-lora"), str(p / "emoji-style-lora")
    train = ["train", "--method", "ct", "--dataset", "digits", "--batch", "4", "--width", "8", "--checkpoint-every",
             "1", "--no-progress", "--out", str(p / "ct"), "--work-dir", str(p / "work")]
    return [
        # (what, argv that writes the old version, argv that runs out of space, what must stay)
        ("lora merge", ["lora", "merge", "--no-fuse", "--base", sd, "--lora", lcm, "--out", str(p / "merged")],
         ["lora", "merge", "--base", sd, "--lora", lcm, "--out", str(p / "merged")], p / "merged"),
        ("lora export", ["lora", "export", style, "--format", "kohya", "--out", str(p / "style.safetensors")],
         ["lora", "export", style, "--format", "kohya", "--out", str(p / "style.safetensors"), "--overwrite"],
         p / "style.safetensors"),
        ("train-classifier", ["train-classifier", "--epochs", "1", "--no-progress", "--out", str(p / "clf")],
         ["train-classifier", "--epochs", "1", "--no-progress", "--out", str(p / "clf")], p / "clf"),
        ("a training checkpoint", [*train, "--steps", "1"], [*train, "--steps", "2", "--force-resume"],
         p / "work" / "checkpoints" / "step-0000001"),
    ]


@pytest.mark.parametrize("case", ["lora merge", "lora export", "train-classifier", "a training checkpoint"])
def test_a_full_disk_is_one_line_and_keeps_the_old_version(tmp_path, capsys, monkeypatch, case):
    for name in ("emoji-sd", "emoji-lcm-lora", "emoji-style-lora"):
        (tmp_path / name).symlink_to(MODELS / name)       # read only: nothing is written into them
    _, first, full, kept = next(c for c in _full_disk_cases(tmp_path) if c[0] == case)
    code, _, err = run_cli(capsys, *first)
    assert code == 0, err
    before, listing = snapshot(kept) if kept.is_dir() else kept.read_bytes(), sorted(kept.parent.iterdir())
    with monkeypatch.context() as m:
        _disk_full(m)
        code, _, err = run_cli(capsys, *full)
    lines = one_line(err)
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("fewstep: error: no space left on device writing ") and "MB free" in lines[0], lines
    assert (snapshot(kept) if kept.is_dir() else kept.read_bytes()) == before
    assert sorted(kept.parent.iterdir()) == listing                     # the temporary is gone


def test_a_full_disk_in_a_plain_write_is_one_line(tmp_path, monkeypatch):
    path = write_text(tmp_path / "report.json", "old\n")

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(FewstepError, match=r"^no space left on device writing .*report.json: .* MB free there \(the "
                                           r"existing one is unchanged\)"):
        write_text(path, "new\n")
    monkeypatch.undo()
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_a_full_disk_that_does_not_name_its_file_names_the_outputs(tmp_path):
    from fewstep.io.atomic import io_error_message

    message = io_error_message(OSError(errno.ENOSPC, "No space left on device"), None, writing=False,
                               outputs={"--out": str(tmp_path / "o"), "--work-dir": str(tmp_path / "w")})
    assert message.startswith("no space left on device while writing the outputs: --out ") and "--work-dir" in message
    assert "MB free" in message and io_error_message(ValueError("a bug"), tmp_path) is None


def _read_only(monkeypatch, folder: Path, code: int = errno.EROFS):
    """Writes under ``folder`` fail as on a read-only file system (chmod does not stop root, who runs the tests)."""
    import builtins
    import io

    folder = folder.resolve()

    def inside(path) -> bool:
        try:
            return Path(os.fsdecode(path)).resolve().is_relative_to(folder)
        except (TypeError, ValueError):
            return False

    def refuse(path):
        raise OSError(code, os.strerror(code), os.fsdecode(path))

    real_open, real_mkdir, real_replace, real_rename = builtins.open, os.mkdir, os.replace, os.rename

    def open_(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and inside(file):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        if inside(path):
            refuse(path)
        return real_mkdir(path, *args, **kwargs)

    def moving(real):
        def move(src, dst, *args, **kwargs):
            if inside(src) or inside(dst):
                refuse(dst)
            return real(src, dst, *args, **kwargs)
        return move

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)
    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "replace", moving(real_replace))
    monkeypatch.setattr(os, "rename", moving(real_rename))


def test_demo_into_a_read_only_folder_is_one_line(tmp_path, capsys, monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    (models / "digits-classifier").symlink_to(MODELS / "digits-classifier")
    ro = tmp_path / "ro"
    ro.mkdir()
    _read_only(monkeypatch, ro)
    code, _, err = run_cli(capsys, "demo", "--models", str(models), "--out", str(ro / "demo"))
    lines = one_line(err)
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "read-only" in lines[0] and str(ro) in lines[0]
    assert list(ro.iterdir()) == []


def test_eval_save_sigmas_into_a_read_only_model_folder_is_one_line(tmp_path, capsys, monkeypatch):
    import fewstep.eval.evaluate

    model = tmp_path / "digits-cd"
    shutil.copytree(MODELS / "digits-cd", model)
    before = snapshot(model)
    # the search itself is not under test (it takes minutes): its answer is
    monkeypatch.setattr(fewstep.eval.evaluate, "tune_sigmas", lambda *a, **k: ([80.0, 0.8], 1.0))
    _read_only(monkeypatch, model)
    code, _, err = run_cli(capsys, "eval", "--model", str(model), "--steps", "2", "--num", "4", "--tune-sigmas",
                           "--save-sigmas", "--models", str(MODELS))
    lines = one_line(err)
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "read-only" in lines[0] and "fewstep.json" in lines[0]
    monkeypatch.undo()
    assert snapshot(model) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod 0o555; the monkeypatched tests cover it")
def test_a_chmod_read_only_folder_is_one_line(tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        code, _, err = run_cli(capsys, "train-classifier", "--epochs", "1", "--no-progress", "--out", str(out / "c"))
        assert code == 2 and len(one_line(err)) == 1 and "writable" in err, err
    finally:
        out.chmod(0o755)


def test_checkpoints_prune_only_fewsteps_own(tmp_path):
    """keep_checkpoints removes old checkpoint folders fewstep wrote, never a user's folder named like one."""
    from fewstep.training import TrainConfig, train

    mine = user_folder(tmp_path / "checkpoints" / "step-0000000", "state.json")
    model, objective, data = tiny_setup()
    train(model, objective, data, TrainConfig(out_dir=str(tmp_path), max_steps=3, batch_size=8, checkpoint_every=1,
                                              keep_checkpoints=1, progress=False))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000000", "step-0000003"]
    assert (mine / "notes.txt").read_text() == "years of work"
    assert json.loads((tmp_path / "checkpoints" / "step-0000003" / MARKER).read_text())["kind"] == "checkpoint"


def test_atomic_file_write_into_an_input_is_refused(tmp_path):
    from fewstep.io.atomic import protect_inputs, writing_into

    model = tmp_path / "model"
    model.mkdir()
    (model / "fewstep.json").write_text("{}")
    with protect_inputs([(model, "--model")]):
        with pytest.raises(FewstepError, match="is inside the --model folder"), \
                atomic_path(model / "fewstep.json") as tmp:
            tmp.write_text("replaced")
        with pytest.raises(FewstepError, match="is the --model folder"), atomic_path(model, directory=True):
            pass
        with writing_into(model / "fewstep.json"):                # the one write a command is for
            write_text(model / "fewstep.json", '{"updated": true}')
    assert json.loads((model / "fewstep.json").read_text()) == {"updated": True}
