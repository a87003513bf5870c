"""fewstep eval and fewstep bench on a tiny stand-in teacher, scored by the shipped digits classifier."""

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from helpers import save_pixel_model as save_model
from helpers import tiny_digits_models, tiny_unet

from fewstep.cli import main, shipped_models_dir
from fewstep.models.config import ModelConfig

EVAL_KEYS = {"steps", "sampler", "guidance_scale", "nfe", "fid", "kid", "kid_std", "precision", "recall",
             "cond_accuracy", "seconds_per_image", "fid_std", "precision_std", "recall_std", "cond_accuracy_std"}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A models folder: a tiny untrained 'digits-teacher' beside the shipped digits classifier."""
    root = tmp_path_factory.mktemp("models")
    config = tiny_digits_models(root)
    # a stand-in "distilled" model, so bench's per-model rows and matched-quality speedups run
    student = ModelConfig(**{**asdict(config), "kind": "consistency", "parameterization": "cm", "default_sampler": "euler"})
    save_model(root / "digits-student", tiny_unet(num_classes=10, size=16), student)
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
    assert a["num_samples"] == 60 and a["seed"] == 3 and a["dataset"] == "digits" and "bootstrap" in a["spread"]
    assert [r["steps"] for r in a["results"]] == [1, 2]
    for ra, rb in zip(a["results"], b["results"]):
        assert EVAL_KEYS <= set(ra)
        assert ra["nfe"] == 2 * ra["steps"]  # DPM-Solver++ with CFG: two passes per step
        assert ra["fid_std"] > 0 and ra["precision_std"] >= 0 and ra["cond_accuracy_std"] >= 0  # spreads
        for key in EVAL_KEYS - {"seconds_per_image"}:
            assert ra[key] == rb[key], key  # same seed, same numbers
    assert (tmp_path / "g.png").exists()


def test_bench_quick_writes_tables_json_and_plots(models, tmp_path, capsys):
    md = tmp_path / "BENCHMARKS.md"
    code = main(["bench", "--quick", "--num", "40", "--models", str(models), "--out", str(tmp_path / "res"),
                 "--markdown", str(md)])
    assert code == 0
    report = json.loads((tmp_path / "res" / "bench.json").read_text())
    assert set(report["quality"]) == {f"digits-teacher/{s}" for s in ("ddim", "euler", "heun", "dpmpp-2m")} | {
        "digits-student/euler"}
    assert [r["steps"] for r in report["quality"]["digits-student/euler"]] == [1, 2, 4]
    assert all(r["overhead"] > 0.5 for r in report["speed"])
    assert {r["model"] for r in report["speed"]} == {"digits-teacher", "digits-student"}
    assert len(report["speedup"]) == 3  # one per student row, matched or not
    text = md.read_text()
    assert "Quality versus steps" in text and "sampler overhead" in text and "fewstep bench --quick" in text
    assert "Zero-shot editing" in text and set(report["editing"]) == {"digits-teacher"}
    assert report["costs"]["digits-student"]["method"] == "consistency"

    # a second run reuses the teacher's quality rows from the first (same sample count and seed)
    code = main(["bench", "--quick", "--num", "40", "--models", str(models), "--out", str(tmp_path / "res2"),
                 "--no-markdown", "--reuse", str(tmp_path / "res" / "bench.json")])
    assert code == 0 and "reused from" in capsys.readouterr().out
    again = json.loads((tmp_path / "res2" / "bench.json").read_text())
    assert again["quality"]["digits-teacher/heun"] == report["quality"]["digits-teacher/heun"]
    assert (tmp_path / "res" / "fid_vs_nfe.png").exists() and (tmp_path / "res" / "fid_vs_seconds.png").exists()

    # --only digits: quality again where a reused row has no spread (a report from before spreads), the timings kept
    for row in again["quality"]["digits-teacher/heun"]:
        del row["fid_std"]
    (tmp_path / "res2" / "bench.json").write_text(json.dumps(again))
    code = main(["bench", "--only", "digits", "--quick", "--num", "40", "--models", str(models), "--out",
                 str(tmp_path / "res3"), "--markdown", str(tmp_path / "B3.md"), "--reuse", str(tmp_path / "res2" / "bench.json")])
    out = capsys.readouterr().out
    assert code == 0 and "digits-teacher/ddim: reused" in out and "digits-teacher/heun: reused" not in out
    third = json.loads((tmp_path / "res3" / "bench.json").read_text())
    assert third["speed"] == again["speed"] and third["command"] == again["command"]
    assert all("fid_std" in r for r in third["quality"]["digits-teacher/heun"])
    assert "measured again, with spreads, by `fewstep bench --only digits" in (tmp_path / "B3.md").read_text()


def test_ruler_on_real_digits_orders_corruptions():
    """With the shipped classifier's features: the data scores FID ≈ 0 against itself, and FID grows
    monotonically with added noise and with blur; conditional accuracy of the clean data is ~1."""
    import torch.nn.functional as F

    from fewstep.eval.evaluate import Ruler
    from fewstep.models.data import load_digits
    from fewstep.nets.classifier import load_classifier

    data = load_digits()
    ruler = Ruler(load_classifier(shipped_models_dir() / "digits-classifier"), data)
    clean = ruler.score(data.images, data.labels)
    assert clean["fid"] < 1e-6 and clean["cond_accuracy"] > 0.99 and clean["precision"] > 0.95
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(data.images.shape, generator=g)
    noisy = [ruler.fid((data.images + s * noise).clamp(-1, 1)) for s in (0.05, 0.2, 0.4, 0.8)]
    assert clean["fid"] < noisy[0] and all(a < b for a, b in zip(noisy, noisy[1:])), noisy

    def blur(x, s):
        k = torch.exp(-torch.arange(-3, 4.0) ** 2 / (2 * s**2))
        k = (k[:, None] * k[None, :] / k.sum() ** 2)[None, None]
        return F.conv2d(F.pad(x, (3, 3, 3, 3), mode="replicate"), k)

    blurred = [ruler.fid(blur(data.images, s)) for s in (0.5, 1.0, 1.5, 2.5)]
    assert clean["fid"] < blurred[0] and all(a < b for a, b in zip(blurred, blurred[1:])), blurred


def test_benchmarks_md_is_what_bench_json_renders_to(tmp_path):
    """Every figure in BENCHMARKS.md comes from bench/results/*.json: rendering them again gives the file
    (the plots' relative paths aside), so no number there was typed by hand or left stale."""
    from fewstep.bench.run import render_report

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "BENCHMARKS.md"
    render_report(repo / "bench" / "results" / "bench.json", out, repo / "bench" / "results")
    ours = [line for line in out.read_text().splitlines() if "![FID versus NFE]" not in line]
    shipped = [line for line in (repo / "BENCHMARKS.md").read_text().splitlines() if "![FID versus NFE]" not in line]
    assert ours == shipped


@pytest.mark.slow  # ~80 s: the zero-shot editing measurements of the 32×32 RGB teacher dominate
def test_bench_emoji_pixel_section_measures_only_what_changed(tmp_path, capsys):
    """``fewstep bench --only emoji-pixel``: the pixel testbed's teacher and students with spreads and the
    colorization column; a second run with that report as ``--reuse`` keeps the rows of models whose weights
    did not change and measures only the one that did (a student retrained in place)."""
    import shutil

    from helpers import run_cli

    shipped = shipped_models_dir()
    if not (shipped / "emoji-pixel-teacher").is_dir():
        pytest.skip("emoji-pixel-teacher not shipped")
    root = tmp_path / "models"
    for name in ("emoji-pixel-teacher", "emoji-classifier", "emoji-pixel-ict", "emoji-pixel-ct"):
        shutil.copytree(shipped / name, root / name)
    old = {"settings": {"teacher": "digits-teacher", "num": 1000, "seed": 0, "timing_batch": 64, "timing_repeats": 5,
                        "edit_num": 200}, "machine": "m", "date": "d", "command": "fewstep bench",
           "quality": {}, "speed": [], "speedup": [], "costs": {}, "editing": {}}
    (tmp_path / "old.json").write_text(json.dumps(old))

    def bench(reuse: Path, out: str) -> dict:
        code, stdout, err = run_cli(capsys, "bench", "--only", "emoji-pixel", "--quick", "--num", "12",
                                    "--edit-num", "4", "--reuse", str(reuse), "--models", str(root),
                                    "--out", str(tmp_path / out), "--markdown", str(tmp_path / f"{out}.md"))
        assert code == 0, err
        return json.loads((tmp_path / out / "bench.json").read_text())["emoji_pixel"], stdout

    first, _ = bench(tmp_path / "old.json", "a")
    assert set(first["quality"]) == {"emoji-pixel-teacher/dpmpp-2m", "emoji-pixel-teacher/heun",
                                     "emoji-pixel-teacher/euler", "emoji-pixel-ict/consistency",
                                     "emoji-pixel-ct/consistency"}
    assert all("fid_std" in r for rows in first["quality"].values() for r in rows)
    assert set(first["editing"]) == {"emoji-pixel-teacher"} and "psnr" in first["editing"]["emoji-pixel-teacher"]["colorize"]
    assert "## The emoji pixel testbed" in (tmp_path / "a.md").read_text()

    shutil.rmtree(root / "emoji-pixel-ct")       # "retrained": other weights under the same name
    shutil.copytree(shipped / "emoji-pixel-cd", root / "emoji-pixel-ct")
    second, stdout = bench(tmp_path / "a" / "bench.json", "b")
    assert "emoji-pixel-teacher/heun: reused" in stdout and "emoji-pixel-ict/consistency: reused" in stdout
    assert "emoji-pixel-ct/consistency: reused" not in stdout
    for key in ("emoji-pixel-teacher/heun", "emoji-pixel-ict/consistency"):
        assert second["quality"][key] == first["quality"][key]
    assert second["quality"]["emoji-pixel-ct/consistency"] != first["quality"]["emoji-pixel-ct/consistency"]
    assert second["editing"] == first["editing"]
    assert not (tmp_path / "b" / "emoji_pixel.progress.json").exists()      # a finished run leaves no progress file

    # a stopped run resumes from its progress file: with the first run's rows there, nothing is measured again
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "emoji_pixel.progress.json").write_text(json.dumps(second))
    third, stdout = bench(tmp_path / "old.json", "c")
    assert third["quality"] == second["quality"] and third["editing"] == second["editing"]
    assert stdout.count(": reused") == len(second["quality"])
