"""``fewstep eval --images DIR --dataset NAME``: a folder of images made anywhere, scored on the same ruler as a model.
A model's own samples written as PNGs score what ``eval --model`` gives them; real images score the real floor;
labels come from metadata.jsonl or the PNG's fewstep record; wrong use is one clear line."""

from __future__ import annotations

import json

import pytest
import torch

from fewstep.cli import main
from fewstep.eval.evaluate import dataset_ruler, evaluate
from fewstep.eval.images import score_folder
from fewstep.io.images import pil_images, write_png_folder
from fewstep.models.folders import load_model, shipped_models_dir
from fewstep.sampling.outputs import image_records, png_text

MODELS = shipped_models_dir()


@pytest.fixture(scope="module")
def ruler():
    return dataset_ruler("digits", MODELS)


def test_a_models_samples_as_pngs_score_what_eval_model_gives(ruler, tmp_path):
    """The 200 1-step samples eval --model scores, written as PNGs with fewstep's records (labels inside), then
    scored as a folder: the same FID up to the PNGs' 8-bit rounding, the same accuracy."""
    model = load_model(MODELS / "digits-cd")
    (row,), samples = evaluate(model, ruler, [1], num=200, seed=0, progress=False)
    labels = torch.arange(200) % 10
    records = image_records(model, labels, 200, 0, {"steps": 1, "sampler": "consistency", "guidance_scale": 1.0},
                            (16, 16))
    write_png_folder(tmp_path / "pngs", pil_images(samples[1]), [png_text(r) for r in records])
    report = score_folder(tmp_path / "pngs", ruler)
    got = report["results"][0]
    assert report["num_samples"] == report["labelled"] == 200 and report["model"] is None
    assert abs(got["fid"] - row.fid) < 0.2 * row.fid_std          # 8-bit rounding moves FID far less than its spread
    assert got["cond_accuracy"] == pytest.approx(row.cond_accuracy, abs=0.01)
    assert got["steps"] is None and set(got) >= {"fid", "fid_std", "kid", "kid_std", "precision", "recall",
                                                  "cond_accuracy", "nfe", "seconds_per_image"}


def test_real_images_score_the_floor_and_noise_scores_far_above(ruler, tmp_path):
    idx = torch.randperm(len(ruler.data), generator=torch.Generator().manual_seed(0))[:200]
    real = tmp_path / "real"
    write_png_folder(real, pil_images(ruler.data.images[idx]), [{} for _ in range(200)])
    names = ruler.data.class_names
    (real / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{k:05d}.png", "label": names[int(c)]}) + "\n"
                                                 for k, c in enumerate(ruler.data.labels[idx])))
    noise = tmp_path / "noise"
    write_png_folder(noise, pil_images(torch.rand(200, 1, 16, 16) * 2 - 1), [{} for _ in range(200)])
    r, n = score_folder(real, ruler)["results"][0], score_folder(noise, ruler)
    assert r["cond_accuracy"] > 0.95 and n["labelled"] == 0 and n["results"][0]["cond_accuracy"] is None
    assert n["results"][0]["fid"] - r["fid"] > 10 * (r["fid_std"] + n["results"][0]["fid_std"])


def test_eval_images_cli_writes_evals_json_and_refuses_wrong_use_in_one_line(tmp_path, capsys):
    folder = tmp_path / "imgs"
    write_png_folder(folder, pil_images(torch.rand(6, 3, 40, 40) * 2 - 1), [{} for _ in range(6)])   # resized to 16²
    assert main(["eval", "--images", str(folder), "--dataset", "digits", "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["dataset"] == "digits" and report["num_samples"] == 6 and len(report["results"]) == 1
    capsys.readouterr()
    (folder / "metadata.jsonl").write_text('{"file_name": "00000.png", "label": 12}\n')
    for argv, message in (([], "--images needs --dataset"),
                          (["--dataset", "digits", "--steps", "2"], "--steps sample a model"),
                          (["--dataset", "digits", "--model", "models/digits-cd"], "give --model DIR"),
                          (["--dataset", "digits"], "label 12 is not a class of digits")):
        assert main(["eval", "--images", str(folder), *argv]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert main(["eval", "--images", str(tmp_path / "none"), "--dataset", "digits"]) != 0
    assert "does not exist" in capsys.readouterr().err
