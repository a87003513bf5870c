"""Guided distillation (Meng et al. 2023): the w-conditioned student, the stage-1 loss against an exact
CFG oracle, progressive distillation's closed-form target against two teacher DDIM steps, the stochastic
N-step sampler against its definition, per-round resume, and the CLI end to end on tiny models."""

import json
import shutil
import threading
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from helpers import run_cli, tiny_digits_models, tiny_unet
from helpers import save_pixel_model as save_model

from fewstep.core.denoisers import EDMDenoiser, edm_scalings
from fewstep.core.guidance import guidance_scale_embedding, guide, per_sample_cfg
from fewstep.core.oracle import ExactDenoiser
from fewstep.core.schedules import EDMSchedule
from fewstep.core.solvers import (
    SAMPLERS,
    ddim_step,
    sample_ddim,
    sample_ddim_stochastic,
)
from fewstep.errors import FewstepError
from fewstep.methods.progressive import ProgressiveSettings, distill_progressive, rounds
from fewstep.models.config import ModelConfig
from fewstep.models.data import load_digits
from fewstep.models.folders import load_model
from fewstep.nets.guided import GuidedUNet
from fewstep.objectives.base import dropout_condition
from fewstep.objectives.guided import GuidedDistillationLoss
from fewstep.objectives.progressive import (
    ProgressiveLoss,
    ddim_target,
    teacher_two_steps,
)
from fewstep.sampling.generate import generate, nfe
from fewstep.training import TrainConfig


class OracleCFG:
    """The exact w-conditioned student: the teacher's CFG of a finite data set's exact denoiser."""

    def __init__(self, oracle: ExactDenoiser) -> None:
        self.oracle = oracle

    def scalings(self, sigma):
        return edm_scalings(sigma)

    def __call__(self, x, sigma, class_labels, guidance_scale):
        null = torch.full_like(class_labels, self.oracle.null_label)
        return guide(self.oracle(x, sigma, class_labels), self.oracle(x, sigma, null), guidance_scale)


def _labels(dropout: float):
    """batch → class labels of 3 classes, a share ``dropout`` of them the null label."""
    return dropout_condition({"class_labels": "labels"}, {"class_labels": torch.tensor(3)}, dropout)


def _oracle_data(n: int = 12):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 4, 4, generator=g) * 2 - 1, torch.arange(n) % 3


# --- the w-conditioned student ---------------------------------------------------------------------
def test_guidance_embedding_is_diffusers():
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([0.0, 0.5, 1.0, 3.0])
    for dim in (256, 33):
        ours = guidance_scale_embedding(w, dim)
        theirs = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
        torch.testing.assert_close(ours, theirs)


def test_student_starts_as_the_teachers_conditional_output_and_round_trips(tmp_path):
    torch.manual_seed(0)
    unet = tiny_unet(num_classes=3).eval()
    teacher = EDMDenoiser(unet)
    student = EDMDenoiser(GuidedUNet(unet, 32)).eval()
    x, sigma, y = torch.randn(6, 1, 8, 8), torch.rand(6) * 5 + 0.01, torch.tensor([0, 1, 2, 3, 0, 1])
    with torch.no_grad():
        before = teacher(x, sigma, class_labels=y)
        for s in (1.0, 2.5, torch.linspace(1, 4, 6)):
            torch.testing.assert_close(student(x, sigma, class_labels=y, guidance_scale=s), teacher(x, sigma, class_labels=y),
                                       rtol=0, atol=0)
        torch.nn.init.normal_(student.net.cond_proj.weight)
        a = student(x, sigma, class_labels=y, guidance_scale=1.0)
        b = student(x, sigma, class_labels=y, guidance_scale=3.0)
        assert (a - b).abs().max() > 1e-4                       # the scale now matters ...
        torch.testing.assert_close(teacher(x, sigma, class_labels=y), before, rtol=0, atol=0)  # the shared UNet's
                                                                 # own output is untouched by the student's w input
    assert not unet.time_embedding._forward_pre_hooks          # ... and no hook outlives a call
    config = ModelConfig(schedule=asdict(EDMSchedule()), image_size=8, channels=1, class_names=["a", "b", "c"],
                         guidance_range=[1.0, 4.0], embedding_dim=32)
    save_model(tmp_path / "g", student.net, config)
    loaded = load_model(tmp_path / "g")
    with torch.no_grad():
        torch.testing.assert_close(loaded.denoiser(x, sigma, class_labels=y, guidance_scale=3.0), b)
    (tmp_path / "g" / "unet" / "guidance_embedding.safetensors").write_bytes(b"junk")
    with pytest.raises(FewstepError, match="guidance embedding"):
        load_model(tmp_path / "g")


def test_concurrent_calls_from_two_threads_each_get_only_their_own_guidance():
    """``fewstep serve`` runs a shared UNet from several threads; the w-shift hook of one call must not reach
    another thread's call. Both calls are held inside the UNet, after both hooks exist, before the time
    embedding runs (a barrier on ``time_proj``), the interleaving that once added both shifts to both."""
    torch.manual_seed(0)
    student = EDMDenoiser(GuidedUNet(tiny_unet(num_classes=3).eval(), 32)).eval()
    torch.nn.init.normal_(student.net.cond_proj.weight)
    x, sigma, y = torch.randn(2, 1, 8, 8), torch.full((2,), 1.5), torch.tensor([0, 1])
    with torch.no_grad():
        alone = {s: student(x, sigma, class_labels=y, guidance_scale=s) for s in (1.5, 4.0)}
    barrier = threading.Barrier(2, timeout=30)

    def hold(module, args) -> None:
        barrier.wait()
    held = student.net.unet.time_proj.register_forward_pre_hook(hold)
    together: dict[float, torch.Tensor] = {}

    def call(s: float) -> None:
        with torch.no_grad():
            together[s] = student(x, sigma, class_labels=y, guidance_scale=s)
    threads = [threading.Thread(target=call, args=(s,)) for s in alone]
    [t.start() for t in threads]
    [t.join(timeout=60) for t in threads]
    held.remove()
    for s in alone:
        torch.testing.assert_close(together[s], alone[s], rtol=0, atol=0)
    assert not student.net.unet.time_embedding._forward_pre_hooks


def test_guided_loss_vanishes_on_the_exact_cfg_student():
    data, labels = _oracle_data()
    oracle = ExactDenoiser(data, labels)
    null = {"class_labels": torch.tensor(oracle.null_label)}
    loss = GuidedDistillationLoss(per_sample_cfg(oracle, lambda c: {"class_labels": null["class_labels"].expand_as(
                                      c["class_labels"])}), EDMSchedule(),
                                  dropout_condition({"class_labels": "labels"}, null, 0.3), (1.0, 4.0))
    batch = {"images": data, "labels": labels}
    torch.manual_seed(0)
    exact, _ = loss(OracleCFG(oracle), batch)
    assert exact.item() < 1e-10

    class ConditionalOnly(OracleCFG):  # the teacher's conditional denoiser, ignoring s: what the student starts as
        def __call__(self, x, sigma, class_labels, guidance_scale):
            return super().__call__(x, sigma, class_labels, torch.ones_like(guidance_scale))

    torch.manual_seed(0)
    wrong, _ = loss(ConditionalOnly(oracle), batch)
    assert wrong.item() > 1e-3


# --- progressive distillation ----------------------------------------------------------------------
def test_student_grid_is_every_other_level_of_the_teacher_grid():
    schedule = EDMSchedule()
    for n in (1, 2, 4, 16):
        torch.testing.assert_close(schedule.grid(2 * n)[::2], schedule.grid(n))
    assert rounds(16, 1) == [16, 8, 4, 2, 1] and rounds(4, 4) == [4]
    with pytest.raises(FewstepError, match="halve"):
        rounds(12, 1)


def test_one_ddim_step_with_the_target_lands_where_two_teacher_steps_land():
    data, labels = _oracle_data()
    teacher = OracleCFG(ExactDenoiser(data, labels))
    grid = EDMSchedule().grid(8).double()
    torch.manual_seed(0)
    x0 = data.double().repeat(2, 1, 1, 1)
    for i, solver in [(i, s) for i in range(4) for s in ("ddim", "heun")]:  # every student step, the last included
        objective = ProgressiveLoss(teacher, grid, _labels(0.0), (1.0, 4.0), solver=solver)
        sigmas = tuple(torch.full((len(x0),), float(grid[2 * i + k]), dtype=torch.float64) for k in range(3))
        cond = {"class_labels": labels.repeat(2), "guidance_scale": torch.rand(len(x0), dtype=torch.float64) * 3 + 1}
        x = x0 + sigmas[0].reshape(-1, 1, 1, 1) * torch.randn_like(x0)
        two = teacher_two_steps(teacher, x, sigmas, cond, solver)
        if solver == "ddim":                                  # written out: x' = D + σ'·(x − D)/σ, twice
            d = teacher(x, sigmas[0], **cond)
            x1 = d + (sigmas[1] / sigmas[0]).reshape(-1, 1, 1, 1) * (x - d)
            d = teacher(x1, sigmas[1], **cond)
            torch.testing.assert_close(two, d + (sigmas[2] / sigmas[1]).reshape(-1, 1, 1, 1) * (x1 - d))
        target = objective.target(x, sigmas, cond)
        torch.testing.assert_close(ddim_step(x, target, sigmas[0], sigmas[2]), two, rtol=0, atol=1e-9)
        if i == 3:
            torch.testing.assert_close(target, two)          # σ'' = 0: the target is the teacher's sample itself
    torch.testing.assert_close(ddim_target(x, ddim_step(x, x0, sigmas[0], sigmas[2]), sigmas[0], sigmas[2]), x0)
    for solver in ("ddim", "heun"):                         # per-sample levels, mixed, the last step included
        objective = ProgressiveLoss(teacher, grid, _labels(0.0), (1.0, 4.0), solver=solver)
        i = torch.arange(len(x0)) % 4
        sigmas = tuple(grid[2 * i + k] for k in range(3))
        x = x0 + sigmas[0].reshape(-1, 1, 1, 1) * torch.randn_like(x0)
        cond = {"class_labels": labels.repeat(2), "guidance_scale": torch.full((len(x0),), 2.0, dtype=torch.float64)}
        two = teacher_two_steps(teacher, x, sigmas, cond, solver)
        for k in range(4):                                  # equal to the same steps taken one level at a time
            m = i == k
            one = teacher_two_steps(teacher, x[m], tuple(s[m] for s in sigmas), {c: v[m] for c, v in cond.items()}, solver)
            torch.testing.assert_close(two[m], one)
        # the target is what one student DDIM step from x must predict to land where the two teacher steps do
        torch.testing.assert_close(ddim_step(x, objective.target(x, sigmas, cond), sigmas[0], sigmas[2]), two)


def test_progressive_loss_vanishes_when_the_student_is_the_two_step_teacher():
    data, labels = _oracle_data()
    teacher = OracleCFG(ExactDenoiser(data, labels))
    grid = EDMSchedule().grid(4)
    objective = ProgressiveLoss(teacher, grid, _labels(0.2), (1.0, 4.0))

    class TwoSteps(OracleCFG):  # D̃(x, σ_{2i}) that makes one DDIM step equal the teacher's two
        def __call__(self, x, sigma, class_labels, guidance_scale):
            i = (grid[None, :] - sigma[:, None]).abs().argmin(1)
            s = (sigma, grid[i + 1], grid[i + 2])
            cond = {"class_labels": class_labels, "guidance_scale": guidance_scale}
            return ddim_target(x, teacher_two_steps(teacher, x, s, cond), s[0], s[2])

    loss, logs = objective(TwoSteps(teacher.oracle), {"images": data, "labels": labels})
    assert loss.item() < 1e-8 and logs["student_steps"] == 2


# --- the stochastic sampler ------------------------------------------------------------------------
def test_stochastic_sampler_is_ddim_to_the_skipped_level_then_noise_back():
    data, labels = _oracle_data()
    oracle = ExactDenoiser(data, labels)
    model = lambda x, s, class_labels: oracle(x, s, class_labels)  # noqa: E731
    sigmas = EDMSchedule().grid(4)
    x_start = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(1)) * sigmas[0]
    extra = {"class_labels": torch.arange(6) % 3}
    out = sample_ddim_stochastic(model, x_start, sigmas, extra_args=extra, generator=torch.Generator().manual_seed(7))
    g, x = torch.Generator().manual_seed(7), x_start.clone()      # the definition, written out
    for i in range(4):
        d = oracle(x, sigmas[i].expand(6), **extra)
        if i < 3:
            x = d + sigmas[i + 2] * (x - d) / sigmas[i]
            x = x + (sigmas[i + 1] ** 2 - sigmas[i + 2] ** 2).sqrt() * torch.randn(x.shape, generator=g)
        else:
            x = d
    torch.testing.assert_close(out, x)
    one = sigmas[[0, -1]]                                           # one step: plain DDIM
    torch.testing.assert_close(sample_ddim_stochastic(model, x_start, one, extra_args=extra),
                               sample_ddim(model, x_start, one, extra_args=extra))
    assert SAMPLERS["ddim-stochastic"].nfe(4) == 4 and SAMPLERS["ddim-stochastic"].stochastic


# --- the rounds: resume, folder, bad input -----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_guided(tmp_path_factory) -> Path:
    """A tiny teacher and a 2-optimizer-step stage-1 student of it, through the CLI."""
    root = tmp_path_factory.mktemp("models")
    tiny_digits_models(root)
    from fewstep.cli import main

    assert main(["distill", "--method", "guided", "--teacher", str(root / "digits-teacher"), "--out",
                 str(root / "digits-guided"), "--work-dir", str(root / "run-guided"), "--steps", "2", "--batch", "8",
                 "--max-guidance-scale", "3", "--no-progress"]) == 0
    return root


def test_progressive_rounds_resume_per_round(tiny_guided, tmp_path):
    data = load_digits()
    data = replace(data, images=data.images[:64], labels=data.labels[:64])
    teacher = load_model(tiny_guided / "digits-guided")
    config = TrainConfig(out_dir=str(tmp_path / "run"), max_steps=2, batch_size=8, checkpoint_every=1, progress=False)
    settings = ProgressiveSettings(start_steps=4, final_steps=1, keep_steps=[2, 1])
    out = distill_progressive(data, tmp_path / "p", config, settings, teacher, command="test")
    first = {n: (tmp_path / "run" / f"round-{n:04d}" / "student" / "unet" / "diffusion_pytorch_model.safetensors")
             for n in (4, 2, 1)}
    stamps = {n: f.stat().st_mtime_ns for n, f in first.items()}
    weights = {n: f.read_bytes() for n, f in first.items()}
    # the last round was "cut" after its final checkpoint but before its student was written
    shutil.rmtree(tmp_path / "run" / "round-0001" / "student")
    shutil.rmtree(out)
    distill_progressive(data, tmp_path / "p", config, settings, teacher, command="test")
    assert first[4].stat().st_mtime_ns == stamps[4] and first[2].stat().st_mtime_ns == stamps[2]  # not redone
    assert first[1].read_bytes() == weights[1]          # resumed from its checkpoint: the same weights
    model = load_model(out)
    assert (model.config.serves_steps, model.config.default_steps, model.config.default_sampler) == ([1, 2], 2, "ddim")
    assert (out / "students" / "1" / "fewstep.json").exists() and not (out / "students" / "2").exists()
    assert model.config.training["rounds"]["1"]["teacher_steps"] == 2


def test_cli_end_to_end_one_pass_per_step_and_bad_input(tiny_guided, capsys, tmp_path):
    root = tiny_guided
    guided = load_model(root / "digits-guided")
    assert guided.config.guidance_range == [1.0, 3.0]
    assert "fewstep distill --method guided" in guided.config.training["command"]
    calls = []
    guided.denoiser.net.unet.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    generate(guided, torch.arange(5), steps=3, sampler="dpmpp-2m", guidance_scale=2.5)
    assert calls == [5, 5, 5] and nfe(guided, "dpmpp-2m", 3, 2.5) == 3    # one pass per step, CFG included

    code, out, err = run_cli(capsys, "distill", "--method", "progressive", "--teacher", str(root / "digits-guided"),
                             "--out", str(tmp_path / "p"), "--work-dir", str(tmp_path / "run"), "--start-steps", "2",
                             "--keep-steps", "2,1", "--steps", "2", "--batch", "8", "--no-progress")
    assert code == 0, err
    for args in (["--steps", "1"], ["--steps", "2", "--sampler", "ddim-stochastic"]):
        code, out, err = run_cli(capsys, "sample", "--model", str(tmp_path / "p"), "--guidance-scale", "3", "--num", "2",
                                 "--out", str(tmp_path / "s.png"), *args)
        assert code == 0, err
    code, out, err = run_cli(capsys, "sample", "--model", str(tmp_path / "p"), "--steps", "3", "--out", str(tmp_path / "x.png"))
    assert code == 2 and "distilled for 1, 2 step(s)" in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli(capsys, "sample", "--model", str(root / "digits-guided"), "--guidance-scale", "5",
                             "--out", str(tmp_path / "x.png"))
    assert code == 2 and "guidance scales 1..3" in err and not (tmp_path / "x.png").exists()
    code, out, err = run_cli(capsys, "distill", "--method", "progressive", "--teacher", str(root / "digits-teacher"),
                             "--out", str(tmp_path / "q"), "--steps", "1")
    assert code == 2 and "--method guided" in err
    code, out, err = run_cli(capsys, "distill", "--method", "progressive", "--teacher", str(root / "digits-guided"),
                             "--out", str(tmp_path / "q"), "--start-steps", "4", "--keep-steps", "3", "--steps", "1")
    assert code == 2 and "not among the rounds" in err
    code, out, err = run_cli(capsys, "eval", "--model", str(tmp_path / "p"), "--steps", "1,2", "--num", "20",
                             "--models", str(root), "--guidance-scale", "2", "--json", str(tmp_path / "e.json"))
    assert code == 0, err
    rows = json.loads((tmp_path / "e.json").read_text())["results"]
    assert [(r["steps"], r["nfe"]) for r in rows] == [(1, 1), (2, 2)]


def test_editing_in_a_few_steps_with_the_students(tiny_guided, capsys, tmp_path):
    from fewstep.editing.constraints import half_mask
    from fewstep.sampling.grids import img2img_start

    root = tiny_guided
    guided = load_model(root / "digits-guided")
    images = load_digits().images[:4]
    known = half_mask(16, "bottom")
    out = generate(guided, [1], steps=3, guidance_scale=2.0, init_images=images, mask=known)
    assert torch.equal(out[..., :8, :], images[..., :8, :]) and out.abs().max() <= 1   # known pixels kept exactly
    calls = []
    guided.denoiser.net.unet.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    generate(guided, [2], init_images=images, strength=0.5, steps=4, sampler="ddim", guidance_scale=3.0)
    assert calls == [4, 4]                                  # ⌊0.5·4⌋ steps from σ_2 of the 4-step grid, one pass each
    calls.clear()
    generate(guided, [2], init_images=images, strength=0.5, steps=3, sampler="ddim", guidance_scale=3.0)
    assert calls == [4]                                     # diffusers' rule: ⌊0.5·3⌋ = 1 step, not round(1.5) = 2
    with pytest.raises(FewstepError, match="strength"):
        img2img_start(4, 0.1)
    assert img2img_start(4, 1.0) == 0 and img2img_start(2, 0.5) == 1 and img2img_start(3, 0.5) == 2
    from fewstep.editing.zero_shot import (
        infer_labels,  # code written for any denoiser: s defaults to 1
    )
    assert infer_labels(guided, images, known, sigmas=(1.0,), repeats=1).shape == (4,)
    for task in (["img2img", "--strength", "0.5"], ["inpaint", "--mask-half", "right"]):
        code, _, err = run_cli(capsys, "edit", "--task", *task, "--model", str(root / "digits-guided"), "--steps", "2",
                               "--dataset", "digits", "--num", "3", "--out", str(tmp_path / f"{task[0]}.png"))
        assert code == 0, err


def test_bench_guided_section_merges_into_a_previous_report(tiny_guided, capsys, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(tiny_guided, root, ignore=shutil.ignore_patterns("run*"))
    code, _, err = run_cli(capsys, "distill", "--method", "progressive", "--teacher", str(root / "digits-guided"),
                           "--out", str(root / "digits-progressive"), "--work-dir", str(tmp_path / "run"),
                           "--start-steps", "4", "--keep-steps", "4,2", "--steps", "1", "--batch", "8", "--no-progress")
    assert code == 0, err
    old = {"settings": {"teacher": "digits-teacher", "num": 1000, "seed": 0, "timing_batch": 64, "timing_repeats": 5,
                        "edit_num": 200}, "machine": "m", "date": "d", "command": "fewstep bench",
           "quality": {"digits-teacher/dpmpp-2m": []}, "speed": [], "speedup": [], "costs": {}, "editing": {}}
    (tmp_path / "old.json").write_text(json.dumps(old))
    code, out, err = run_cli(capsys, "bench", "--only", "guided", "--quick", "--num", "10", "--reuse",
                             str(tmp_path / "old.json"), "--models", str(root), "--out", str(tmp_path / "res"),
                             "--markdown", str(tmp_path / "B.md"))
    assert code == 0, err
    report = json.loads((tmp_path / "res" / "bench.json").read_text())
    assert report["command"] == "fewstep bench" and report["guided"]["num"] == 10   # the old report, one section added
    assert [r["nfe"] for r in report["guided"]["quality"]["digits-guided/dpmpp-2m"]] == [4, 8, 50]
    assert [r["steps"] for r in report["guided"]["quality"]["digits-progressive/ddim-stochastic"]] == [2, 4]
    md = (tmp_path / "B.md").read_text()
    assert "## Guided distillation" in md and "s = 3: FID / acc." in md and "digits-progressive/2" in md


@pytest.mark.slow
def test_shipped_progressive_student_at_4_steps_beats_the_teacher_at_4_steps():
    """Stage 2's point: the 4-step student (DDIM, one evaluation per step, s = 2 as an input) has a lower FID
    than the teacher at 4 DPM-Solver++ steps with CFG (eight evaluations), on the same labels and seed."""
    from fewstep.cli import shipped_models_dir
    from fewstep.eval.evaluate import Ruler
    from fewstep.nets.classifier import load_classifier

    models = shipped_models_dir()
    ruler = Ruler(load_classifier(models / "digits-classifier"), load_digits())
    labels = torch.arange(1000) % 10
    teacher, student = load_model(models / "digits-teacher"), load_model(models / "digits-progressive")
    fid_teacher = ruler.fid(generate(teacher, labels, steps=4, sampler="dpmpp-2m", guidance_scale=2.0, seed=0))
    fid_student = ruler.fid(generate(student, labels, steps=4, sampler="ddim", guidance_scale=2.0, seed=0))
    assert fid_student < fid_teacher, (fid_student, fid_teacher)


def test_shipped_guided_and_progressive_folders():
    """The shipped students load with no network, record their commands, and serve what they say."""
    from fewstep.cli import shipped_models_dir

    models = shipped_models_dir()
    guided, prog = load_model(models / "digits-guided"), load_model(models / "digits-progressive")
    assert guided.config.training["command"].startswith("fewstep distill --method guided")
    assert prog.config.training["command"].startswith("fewstep distill --method progressive")
    assert (prog.config.serves_steps, prog.config.default_steps, prog.config.default_sampler) == ([1, 2, 4], 4, "ddim")
    assert prog.config.guidance_range == guided.config.guidance_range
    for n in (1, 2, 4):
        images = generate(prog, torch.arange(10), steps=n, guidance_scale=3.0)
        assert images.shape == (10, 1, 16, 16) and nfe(prog, "ddim", n, 3.0) == n
    with pytest.raises(FewstepError, match="use --steps 1 or 2 or 4"):
        generate(prog, torch.arange(2), steps=8)
