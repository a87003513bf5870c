"""BENCHMARKS.md's verdicts: a comparison or a ratio target is decided only beyond its spread."""

import json
import math

import pytest

from fewstep.bench.claims import _act_label, _skip_claim
from fewstep.bench.format import ratio, ratio_cell, target_met, target_verdict, verdict


def test_verdict_needs_the_gap_to_exceed_the_spread_of_the_difference():
    a, b = {"fid": 1.0, "fid_std": 0.3}, {"fid": 1.5, "fid_std": 0.4}   # gap 0.5 = hypot(0.3, 0.4): not beyond
    assert verdict(a, b) == "within the spread"
    assert verdict(a, {**b, "fid": 1.51}) == "wins" and verdict({**b, "fid": 1.51}, a) == "loses"
    assert verdict({"fid": 1.0}, b) == "no spread measured"


def test_ratio_spread_is_first_order_propagation_and_targets_are_decided_beyond_it():
    row, ref = {"fid": 3.0, "fid_std": 0.3}, {"fid": 2.0, "fid_std": 0.1}
    r, std = ratio(row, ref)
    assert r == pytest.approx(1.5) and std == pytest.approx(1.5 * math.hypot(0.1, 0.05))
    assert ratio_cell(row, ref) == f"1.50× ± {std:.2f}" and ratio_cell({"fid": 3.0}, ref) == "1.50×"
    assert target_verdict(row, ref, 1.74) == "holds"            # 1.5 + 0.17 < 1.74
    assert target_verdict(row, ref, 1.44) == "not shown (within the spread)"
    assert target_verdict(row, ref, 1.2) == "does not hold"
    assert target_verdict({"fid": 3.0}, ref, 1.44) == "does not hold"   # no spread: the point value decides


def test_skip_claim_compares_the_runs_that_differ_in_k_alone(tmp_path):
    """w-narrow also has k = 20 and the DDIM solver: the claim must take k20, not whichever came last."""
    runs = [{"name": "k1", "skip": 1, "solver": "ddim", "fid": 1.8, "fid_std": 0.1},
            {"name": "k20", "skip": 20, "solver": "ddim", "fid": 1.1, "fid_std": 0.1},
            {"name": "w-narrow", "skip": 20, "solver": "ddim", "fid": 1.9, "fid_std": 0.1}]
    (tmp_path / "lcm_ablation.json").write_text(json.dumps({"runs": runs}))
    claim, _, ours, _, holds = _skip_claim(tmp_path)
    assert "1.100" in ours and "1.800" in ours and holds == "holds"


def test_act_claim_names_the_method_batch_and_gan_weight_the_models_were_trained_with():
    costs = {"costs": {"emoji-pixel-act": {"method": "act", "batch": 128, "gan_weight": 0.3},
                       "emoji-pixel-ct-features": {"method": "ct", "batch": 64, "gan_weight": None}}}
    assert _act_label(costs, "emoji-pixel-act") == "ACT b128 (λ 0.3)"
    assert _act_label(costs, "emoji-pixel-ct-features") == "CT b64"
    costs["costs"]["emoji-pixel-act"].pop("gan_weight")   # a bench.json from before λ was recorded
    assert _act_label(costs, "emoji-pixel-act") == "ACT b128"


def test_a_table_target_is_met_or_missed_only_beyond_the_ratio_spread():
    ref = {"fid": 2.0, "fid_std": 0.1}
    assert target_met({"fid": 2.0, "fid_std": 0.1}, ref, 1.2) == "met"            # 1.00 ± 0.07, clear of 1.2
    assert target_met({"fid": 3.0, "fid_std": 0.1}, ref, 1.2) == "missed"         # 1.50 ± 0.09
    assert target_met({"fid": 2.4, "fid_std": 0.3}, ref, 1.2) == "not shown (within the spread)"
    assert target_met({"fid": 2.3}, {"fid": 2.0}, 1.2) == "met"                   # no spreads: the point decides


def test_a_student_of_another_testbed_teacher_is_judged_against_its_own_teacher():
    from fewstep.bench.testbed import own_teacher_note

    quality = {"emoji-pixel-flow/euler": [{"steps": 25, "fid": 5.0, "fid_std": 0.2, "nfe": 50}],
               "emoji-pixel-flow/dpmpp-2m": [{"steps": 8, "fid": 4.0, "fid_std": 0.2, "nfe": 16}],
               "emoji-pixel-flow-cd/consistency": [{"steps": 1, "fid": 6.0, "fid_std": 0.3}],
               "emoji-pixel-cd/consistency": [{"steps": 1, "fid": 7.0, "fid_std": 0.3}]}
    lines = own_teacher_note(quality)
    assert len([line for line in lines if line.startswith("- ")]) == 1          # emoji-pixel-cd's teacher is the testbed's
    assert "best is FID 4.000 ± 0.200 (dpmpp-2m, 8 steps)" in lines[-1] and "1.50×" in lines[-1]


def test_the_sliders_table_decides_the_targets_only_from_an_idle_machine():
    """bench.serve's LoRA sliders part: ratios side by side always; "met"/"missed" only when the load average was
    low before the servers started (a busy machine says the targets need an idle re-run)."""
    from types import SimpleNamespace

    from fewstep.bench import serve

    def row(name, n, ips):
        return {"server": name, "clients": n, "images_per_second": ips, "p50_ms": 10.0, "p95_ms": 12.0,
                "rounds": [ips], "load": [[2.5, 3.0, 3.5]]}
    speeds = {serve.SLIDER_BASELINE: 10.0, serve.UNFUSED: 5.0, serve.FUSED_EAGER: 12.0, serve.FUSED: 25.0}
    g = {"command": "c", "threads": 1, "serving": [], "sliders": [row(s, n, v * (n if s != serve.SLIDER_BASELINE else 1))
                                                                  for s, v in speeds.items() for n in serve.CLIENTS],
         "sliders_load": {"before": [3.1, 3.0, 3.2], "cpus": 2}}
    busy = "\n".join(serve._sliders_section(g))
    assert "| 1 | 25.0 | 10.0 | 12.0 | 2.50× | 5.00× | 2.50 |" in busy
    # the targets are ratios of servers measured side by side, so they are decided either way; the load is said
    assert "(target ≥ 2×: met)" in busy and "on a machine that was not idle (load 3.10 / 3.00" in busy
    idle = "\n".join(serve._sliders_section({**g, "sliders_load": {"before": [0.1, 0.2, 0.4], "cpus": 2}}))
    assert "2.50× diffusers' images/s at 1 client (target ≥ 2×: met) and 40.0× at 16 (target ≥ 10×: met)" in idle
    assert "in one run on an idle machine" in idle
    from pathlib import Path

    shipped = json.loads((Path(__file__).resolve().parents[1] / "bench/results/bench.json").read_text())["serve"]
    old = {k: v for k, v in shipped.items() if not k.startswith("sliders")}     # a report from before the sliders' part
    assert serve._sliders_section(old) == [] and serve.section(SimpleNamespace(serve=old))


def test_flow_section_takes_the_teachers_best_over_its_whole_guidance_grid():
    """The FLUX LoRA is compared with the lowest FID anywhere in its teacher's steps × guidance grid (s = 1
    included), and the 1.3× target is decided beyond the spread of the ratio."""
    from types import SimpleNamespace

    from fewstep.bench import flow

    def row(steps, s, f, std=0.1, sec=0.01):
        return {"steps": steps, "nfe": steps, "guidance_scale": s, "fid": f, "fid_std": std, "cond_accuracy": 0.5,
                "seconds_per_image": sec}
    q = {"emoji-flux/euler": [row(28, 3.0, 2.0, sec=0.05), row(28, 1.0, 1.5, sec=0.03), row(4, 3.0, 4.0)],
         "emoji-flux-lcm-lora/consistency": [row(4, 1.0, 1.8, sec=0.006)]}
    lines = flow.section(SimpleNamespace(flow={"command": "x", "num": 300, "quality": q}))
    text = "\n".join(lines)
    assert "FID 1.800 ± 0.100 = 1.20× ± 0.10 `emoji-flux`'s best (1.500 ± 0.100, euler, 28 steps, s = 1)" in text
    assert "target ≤ 1.3× not shown (within the spread)" in text and "5.0× faster" in text
