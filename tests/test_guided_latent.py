"""Guided distillation stage 1 in latent space (Meng et al. 2023 on an SD-format teacher): the loss against
the teacher's own CFG, the saved folder in diffusers' StableDiffusionPipeline (one UNet pass per step, the
same images for the same seed), the trained guidance range, and the CLI."""

import pytest
import torch
from helpers import CAPTIONS, caption_folder, run_cli
from torch import nn

from fewstep.core.guidance import per_sample_cfg
from fewstep.errors import FewstepError
from fewstep.methods.guided import GuidedSettings
from fewstep.models.folders import load_model as load_latent_model
from fewstep.nets.guided import GuidedUNet, w_conditioned_unet
from fewstep.objectives.base import dropout_condition
from fewstep.objectives.guided import GuidedDistillationLoss
from fewstep.sampling.generate import generate_latent
from fewstep.sampling.generate import nfe as latent_nfe


@pytest.fixture(scope="module")
def tiny_guided_sd(tiny_sd, tmp_path_factory):
    """A stage-1 student of the random tiny SD teacher (a few steps: the plumbing, not the quality)."""
    from helpers import tiny_data

    from fewstep import distill_guided_latent
    from fewstep.training import TrainConfig

    root = tmp_path_factory.mktemp("guided-sd")
    config = TrainConfig(out_dir=str(root / "work"), max_steps=3, batch_size=8, progress=False, checkpoint_every=3)
    return distill_guided_latent(load_latent_model(tiny_sd), tiny_data(), root / "tiny-guided",
                                 config, GuidedSettings(min_guidance_scale=1.0, max_guidance_scale=5.0), command="test")


class ExactStudent(nn.Module):
    """The perfect stage-1 student: the teacher's CFG itself, with the student's scalings."""

    def __init__(self, teacher):
        super().__init__()
        self.teacher, self.cfg = teacher.denoiser, per_sample_cfg(teacher.denoiser, teacher.conditioner.null_like)

    def scalings(self, sigma):
        return self.teacher.scalings(sigma)

    def forward(self, x, sigma, encoder_hidden_states, guidance_scale):
        den, extra = self.cfg({"encoder_hidden_states": encoder_hidden_states, "guidance_scale": guidance_scale})
        return den(x, sigma, **extra)


def test_latent_loss_vanishes_on_the_teachers_cfg_and_not_on_the_initial_student(tiny_sd):
    teacher = load_latent_model(tiny_sd)
    loss = GuidedDistillationLoss(per_sample_cfg(teacher.denoiser, teacher.conditioner.null_like), teacher.schedule,
                                  teacher.conditioner.training_condition(0.3), (2.0, 6.0))
    batch = {"images": torch.randn(8, 4, 8, 8), "prompt_embeds": teacher.conditioner.encode(CAPTIONS[:4] * 2)}
    with torch.no_grad():
        torch.manual_seed(0)
        exact, _ = loss(ExactStudent(teacher), batch)
        start = GuidedUNet(w_conditioned_unet(teacher.unet, 64), 64)
        from fewstep.core.denoisers import VPDenoiser
        torch.manual_seed(0)
        initial, _ = loss(VPDenoiser(start, teacher.schedule), batch)
    assert exact.item() < 1e-10 and initial.item() > 1e-4


def test_prompt_dropout_swaps_in_the_empty_prompt():
    empty, c = torch.zeros(5, 3), torch.ones(1000, 5, 3)
    torch.manual_seed(0)
    condition = dropout_condition({"encoder_hidden_states": "prompt_embeds"}, {"encoder_hidden_states": empty}, 0.25)
    out = condition({"prompt_embeds": c})["encoder_hidden_states"]
    dropped = (out == 0).all(dim=(1, 2))
    assert ((out == 0) | (out == 1)).all() and 0.2 < dropped.float().mean() < 0.3


def test_folder_gives_stable_diffusion_pipeline_images_in_one_pass_per_step(tiny_guided_sd):
    """diffusers feeds ψ(s − 1) as timestep_cond and skips CFG for a UNet with time_cond_proj_dim; fewstep's
    Euler (= DDIM in σ space) on the trailing grid and the pipeline's EulerDiscreteScheduler agree."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    model = load_latent_model(tiny_guided_sd)
    assert model.takes_guidance and not model.config.is_lcm and model.config.kind == "diffusion"
    assert latent_nfe(model, "euler", 4, 3.0) == 4
    prompts = ["red apple", "grinning face"]
    ours = generate_latent(model, prompts, steps=4, sampler="euler", guidance_scale=3.0, seed=3)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_guided_sd)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    batches = []
    pipe.unet.register_forward_pre_hook(lambda m, args: batches.append(len(args[0])))
    theirs = pipe(prompts, num_inference_steps=4, guidance_scale=3.0, height=32, width=32, output_type="pt",
                  generator=torch.Generator().manual_seed(3)).images * 2 - 1
    assert batches == [2] * 4  # one pass of the two prompts per step: no CFG batch
    assert torch.allclose(ours, theirs.clamp(-1, 1), atol=2e-3), (ours - theirs).abs().max()
    other = generate_latent(model, prompts, steps=4, sampler="euler", guidance_scale=5.0, seed=3)
    assert not torch.allclose(ours, other)  # s is an input that matters


def test_guidance_outside_the_trained_range_is_refused(tiny_guided_sd):
    model = load_latent_model(tiny_guided_sd)
    with pytest.raises(FewstepError, match="distilled for guidance scales 1..5"):
        generate_latent(model, ["red apple"], steps=2, guidance_scale=7.0)


def test_cli_guided_on_a_pipeline_teacher_then_sample(tiny_sd, tmp_path, capsys):
    folder, _ = caption_folder(tmp_path / "pics")
    out = tmp_path / "g"
    rc, stdout, _ = run_cli(capsys, "distill", "--method", "guided", "--teacher", str(tiny_sd), "--dataset", str(folder),
                            "--out", str(out), "--steps", "2", "--batch", "4", "--max-guidance-scale", "3",
                            "--no-progress", "--work-dir", str(tmp_path / "work"))
    model = load_latent_model(out)
    assert rc == 0 and model.config.guidance_range == [1.0, 3.0] and model.config.training["method"] == "guided"
    rc, _, _ = run_cli(capsys, "sample", "--model", str(out), "--prompt", "red apple", "--steps", "2",
                       "--guidance-scale", "2", "--out", str(tmp_path / "s.png"))
    assert rc == 0 and (tmp_path / "s.png").exists()
    rc, _, err = run_cli(capsys, "distill", "--method", "guided", "--teacher", str(out), "--out", str(tmp_path / "x"),
                         "--steps", "1", "--no-progress")
    assert rc != 0 and "already takes the guidance scale" in err
    rc, _, err = run_cli(capsys, "distill", "--method", "progressive", "--teacher", str(tiny_sd),
                         "--out", str(tmp_path / "x"), "--steps", "1", "--no-progress")
    assert rc != 0 and "is not a stage-1 student" in err and "--method guided" in err


@pytest.fixture(scope="module")
def tiny_progressive_sd(tiny_guided_sd, tmp_path_factory):
    """Two rounds (2 → 1 steps) of progressive distillation of the tiny stage-1 student, a few steps each."""
    from helpers import tiny_data

    from fewstep import distill_progressive_latent
    from fewstep.methods.progressive import ProgressiveSettings
    from fewstep.training import TrainConfig

    root = tmp_path_factory.mktemp("progressive-sd")
    config = TrainConfig(out_dir=str(root / "work"), max_steps=2, batch_size=8, progress=False, checkpoint_every=2)
    settings = ProgressiveSettings(start_steps=2, keep_steps=[2, 1])
    return distill_progressive_latent(load_latent_model(tiny_guided_sd), tiny_data(), root / "p", config, settings,
                                      command="test"), root


def test_latent_progressive_students_run_in_diffusers_ddim_one_pass_per_step(tiny_progressive_sd):
    """Each student is a StableDiffusionPipeline whose DDIMScheduler (trailing, final ᾱ = 1) takes the steps it
    was distilled for: diffusers gives fewstep's DDIM images; the folder serves 2 and 1 steps, no other count."""
    from diffusers import StableDiffusionPipeline

    folder, _ = tiny_progressive_sd
    model = load_latent_model(folder)
    assert (model.config.serves_steps, model.config.default_steps, model.config.default_sampler) == ([1, 2], 2, "ddim")
    prompts = ["red apple", "grinning face"]
    for steps, path in ((2, folder), (1, folder / "students" / "1")):
        ours = generate_latent(model, prompts, steps=steps, guidance_scale=3.0, seed=3)
        pipe = StableDiffusionPipeline.from_pretrained(path)
        assert type(pipe.scheduler).__name__ == "DDIMScheduler"
        batches = []
        pipe.unet.register_forward_pre_hook(lambda m, args: batches.append(len(args[0])))
        theirs = pipe(prompts, num_inference_steps=steps, guidance_scale=3.0, height=32, width=32, output_type="pt",
                      generator=torch.Generator().manual_seed(3)).images * 2 - 1
        assert batches == [2] * steps
        assert torch.allclose(ours, theirs.clamp(-1, 1), atol=2e-3), (steps, (ours - theirs).abs().max())
    with pytest.raises(FewstepError, match="distilled for 1, 2 step"):
        generate_latent(model, prompts, steps=4)


def test_latent_progressive_resumes_per_round(tiny_guided_sd, tiny_progressive_sd, tmp_path, capsys):
    """A second run on the same work folder loads the finished rounds instead of training them again."""
    folder, root = tiny_progressive_sd
    pics, _ = caption_folder(tmp_path / "pics")
    before = {p: p.stat().st_mtime_ns for p in (root / "work").rglob("*.safetensors")}
    rc, _, err = run_cli(capsys, "distill", "--method", "progressive", "--teacher", str(tiny_guided_sd),
                         "--dataset", str(pics), "--out", str(root / "again"), "--work-dir", str(root / "work"), "--start-steps", "2",
                         "--keep-steps", "2,1", "--steps", "2", "--batch", "8", "--no-progress")
    assert rc == 0, err
    assert {p: p.stat().st_mtime_ns for p in (root / "work").rglob("*.safetensors")} == before
    again = load_latent_model(root / "again")
    assert sorted(again.config.training["rounds"]) == ["1", "2"]
    torch.testing.assert_close(dict(again.unet.state_dict()), dict(load_latent_model(folder).unet.state_dict()))


def test_trailing_grids_nest_so_a_student_step_is_two_teacher_steps(tiny_sd):
    """Progressive distillation needs the N-step grid to be every other level of the 2N-step one; diffusers'
    trailing timesteps have that property for every N the rounds use."""
    from fewstep.sampling.grids import sampling_grid as latent_grid

    model = load_latent_model(tiny_sd)
    for n in (1, 2, 4, 8, 16, 32, 64):
        torch.testing.assert_close(latent_grid(model, 2 * n)[::2], latent_grid(model, n))
