"""CI's fast quality check (fewstep.bench.quality_check): every shipped generator, sampled again at 200 samples,
scores its recorded FID within the recorded spread (BENCHMARKS "Quality check (CI)", bench/results/bench.json)."""

import json
from pathlib import Path

import pytest

from fewstep.bench.quality_check import check_row, shipped
from fewstep.models.folders import shipped_models_dir

MODELS = shipped_models_dir()
RECORDED = json.loads((Path(__file__).parents[1] / "bench" / "results" / "bench.json").read_text()).get("quality_check", {})
CHECKS = {c.name: c for c in shipped(MODELS)}


def test_every_shipped_generator_has_a_recorded_reference():
    """A model shipped without its reference row (fewstep bench --only quality-check) would go unchecked."""
    assert RECORDED, "bench/results/bench.json has no quality_check section: run fewstep bench --only quality-check"
    assert sorted(CHECKS) == sorted(RECORDED["rows"])


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_shipped_model_scores_its_recorded_fid(name):
    recorded = RECORDED.get("rows", {}).get(name)
    if recorded is None:
        pytest.fail(f"{name} has no recorded row")
    row = check_row(CHECKS[name], MODELS, RECORDED["num"], RECORDED["seed"])
    assert (row["steps"], row["sampler"], row["guidance_scale"]) == (recorded["steps"], recorded["sampler"],
                                                                     recorded["guidance_scale"])
    assert abs(row["fid"] - recorded["fid"]) <= recorded["fid_std"], (row["fid"], recorded["fid"], recorded["fid_std"])
