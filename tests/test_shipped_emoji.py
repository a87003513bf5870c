"""The shipped emoji pipeline and its few-step students: they load in diffusers unchanged and do what
BENCHMARKS.md says (the full-size figures come from `fewstep bench`; these are small re-checks)."""

import pytest

from fewstep.cli import shipped_models_dir
from fewstep.eval.evaluate import eval_prompts, ruler_for
from fewstep.models.data import load_emoji
from fewstep.models.folders import load_model as load_latent_model
from fewstep.sampling.generate import generate_latent

MODELS = shipped_models_dir()
pytestmark = pytest.mark.skipif(not (MODELS / "emoji-lcm").is_dir(), reason="emoji models not shipped yet")


def test_emoji_data_is_the_documented_set():
    data = load_emoji()
    assert data.images.shape == (3655, 3, 32, 32) and len(data.class_names) == 9
    assert "thumbs up: medium skin tone" in data.captions and len(data.captions) == len(data.images)
    assert data.images.min() >= -1 and data.images.max() <= 1


def test_shipped_folders_run_in_diffusers_pipelines():
    from diffusers import LatentConsistencyModelPipeline, StableDiffusionPipeline

    sd = StableDiffusionPipeline.from_pretrained(MODELS / "emoji-sd")
    assert sd("red apple", num_inference_steps=2, height=32, width=32, output_type="np").images.shape == (1, 32, 32, 3)
    lcm = LatentConsistencyModelPipeline.from_pretrained(MODELS / "emoji-lcm")
    assert type(lcm.scheduler).__name__ == "LCMScheduler"
    assert lcm("red apple", num_inference_steps=2, height=32, width=32, output_type="np").images.shape == (1, 32, 32, 3)
    if (MODELS / "emoji-progressive").is_dir():   # the 4-step student at the top, the others under students/N
        for folder, steps in ((MODELS / "emoji-progressive", 4), (MODELS / "emoji-progressive" / "students" / "2", 2)):
            pipe = StableDiffusionPipeline.from_pretrained(folder)
            assert pipe.scheduler.config.timestep_spacing == "trailing" and pipe.unet.config.time_cond_proj_dim
            assert pipe("red apple", num_inference_steps=steps, height=32, width=32, output_type="np").images.shape == (1, 32, 32, 3)


@pytest.mark.slow
def test_lcm_at_two_steps_beats_the_teacher_at_two_steps():
    """At the same guidance scale and step count (2), the distilled LCM is far closer to the data than its
    teacher with DPM-Solver++ (at 4 steps the tiny teacher's latent ODE is already easy: see BENCHMARKS.md)."""
    teacher, lcm = load_latent_model(MODELS / "emoji-sd"), load_latent_model(MODELS / "emoji-lcm")
    ruler = ruler_for(teacher, MODELS)
    prompts, _ = eval_prompts(ruler.data, 300)
    s = lcm.config.default_guidance_scale
    fid_teacher = ruler.fid(generate_latent(teacher, prompts, steps=2, sampler="dpmpp-2m", guidance_scale=s))
    fid_lcm = ruler.fid(generate_latent(lcm, prompts, steps=2, guidance_scale=s))
    assert fid_lcm < 0.8 * fid_teacher, (fid_lcm, fid_teacher)


@pytest.mark.slow
def test_progressive_students_at_two_steps_beat_the_teacher_at_two_steps():
    """The 2-step progressive student (one UNet pass per step, s an input) against the teacher's 2 CFG steps."""
    if not (MODELS / "emoji-progressive").is_dir():
        pytest.skip("emoji-progressive not shipped")
    teacher, student = load_latent_model(MODELS / "emoji-sd"), load_latent_model(MODELS / "emoji-progressive")
    ruler = ruler_for(teacher, MODELS)
    prompts, _ = eval_prompts(ruler.data, 300)
    s = student.config.default_guidance_scale
    fid_teacher = ruler.fid(generate_latent(teacher, prompts, steps=2, sampler="dpmpp-2m", guidance_scale=s))
    for sampler in ("ddim", "ddim-stochastic"):
        fid = ruler.fid(generate_latent(student, prompts, steps=2, sampler=sampler, guidance_scale=s))
        assert fid < 0.8 * fid_teacher, (sampler, fid, fid_teacher)


def test_bench_guided_latent_section_merges_into_a_previous_report(capsys, tmp_path):
    """``fewstep bench --only guided-latent``: the stage-1 emoji student at half the teacher's UNet passes, the
    progressive students beside the LCM, the guidance sweep and the speed rows, merged into an old report and
    rendered (tiny sample count)."""
    import json

    from helpers import run_cli

    if not (MODELS / "emoji-guided").is_dir():
        pytest.skip("emoji-guided not shipped")
    old = {"settings": {"teacher": "digits-teacher", "num": 1000, "seed": 0, "timing_batch": 64, "timing_repeats": 5,
                        "edit_num": 200}, "machine": "m", "date": "d", "command": "fewstep bench",
           "quality": {}, "speed": [], "speedup": [], "costs": {}, "editing": {}}
    (tmp_path / "old.json").write_text(json.dumps(old))
    code, _, err = run_cli(capsys, "bench", "--only", "guided-latent", "--quick", "--num", "20", "--reuse",
                           str(tmp_path / "old.json"), "--out", str(tmp_path / "res"), "--markdown", str(tmp_path / "B.md"))
    assert code == 0, err
    g = json.loads((tmp_path / "res" / "bench.json").read_text())["guided_latent"]
    assert [r["nfe"] for r in g["quality"]["emoji-sd/dpmpp-2m"]] == [16, 50]
    assert [r["nfe"] for r in g["quality"]["emoji-guided/dpmpp-2m"]] == [8, 25]
    assert g["sweep_scales"] == [1.0, 2.0, 3.0, 4.0, 6.0]
    assert [r["model"] for r in g["speed"]][:2] == ["emoji-sd", "emoji-guided"]   # timings: BENCHMARKS.md, not a test
    if (MODELS / "emoji-progressive").is_dir():
        assert [(r["steps"], r["nfe"]) for r in g["quality"]["emoji-progressive/ddim"]] == [(4, 4), (2, 2), (1, 1)]
        assert g["sweep"]["emoji-progressive"]["steps"] == 4
    assert "### On the emoji pipeline" in (tmp_path / "B.md").read_text()
