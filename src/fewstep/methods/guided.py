"""Guided-diffusion distillation, stage 1 (Meng et al. 2023 §3.1), for any classifier-free-guided teacher:
a class-conditional pixel model or a text-to-image pipeline.

The student is a copy of the teacher's UNet that takes the guidance scale as an input
(:func:`fewstep.nets.guided.guidance_conditioned`: diffusers' native ``time_cond_proj_dim`` for a
pipeline's UNet, so the saved folder is a plain ``StableDiffusionPipeline`` that diffusers runs in one
pass per step; a zero-initialised projection into the timestep features of a pixel ``UNet2DModel``),
behind the teacher's own preconditioning; it learns the teacher's CFG against the unconditional input
(:class:`fewstep.objectives.guided.GuidedDistillationLoss`) for s ~ U[s_min, s_max], some of the
conditions dropped so the student keeps the unconditional denoiser (editing). σ is drawn as the teacher
was trained (EDM's lognormal; uniform t on a VP schedule).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core.guidance import per_sample_cfg
from ..errors import FewstepError
from ..models.data import ImageData
from ..models.folders import save_model
from ..models.handle import Model
from ..nets.guided import guidance_conditioned
from ..objectives.base import unwrap
from ..objectives.guided import GuidedDistillationLoss
from ..training import TrainConfig
from .common import Run, parameters, readme
from .registry import Method, register


@dataclass
class GuidedSettings:
    """Stage-1 settings (recorded in the model folder)."""

    min_guidance_scale: float = 1.0   # s range of w ~ U[w_min, w_max]; Meng et al. use w ∈ [0, 4] on ImageNet 64,
    max_guidance_scale: float = 4.0   # here s ∈ [1, 4] spans no guidance to well past the digits teacher's best (2)
    embedding_dim: int = 256          # width of get_guidance_scale_embedding (SD-LCM's time_cond_proj_dim)
    label_dropout: float = 0.1        # unconditional inputs, so the student also keeps the unconditional denoiser


def check_range(settings: GuidedSettings) -> None:
    if not settings.min_guidance_scale <= settings.max_guidance_scale or settings.min_guidance_scale < 0:
        raise FewstepError(f"guidance range {settings.min_guidance_scale:g}..{settings.max_guidance_scale:g} is "
                           f"empty or negative; give --min-guidance-scale <= --max-guidance-scale, both >= 0")


def check_cfg_teacher(teacher: Model | None, method: str) -> Model:
    """A classifier-free-guided diffusion teacher: conditional, and not taking the guidance scale already."""
    if teacher is None:
        raise FewstepError(f"--method {method} needs --teacher DIR (e.g. models/digits-teacher or models/emoji-sd)")
    cfg = teacher.config
    if cfg.kind != "diffusion":
        raise FewstepError(f"{teacher.path} is a {cfg.kind} model ({cfg.parameterization}); --method {method} needs a "
                           f"diffusion teacher such as models/digits-teacher or models/emoji-sd")
    if teacher.takes_guidance:
        raise FewstepError(f"{teacher.path} already takes the guidance scale as an input; stage 1 distils a "
                           f"classifier-free-guided teacher such as models/digits-teacher or models/emoji-sd")
    if not teacher.conditioner.conditional:
        raise FewstepError(f"{teacher.path} is unconditional; guided distillation needs a conditional teacher trained "
                           f"with label dropout (classifier-free guidance)")
    return teacher


def distill_guided(data: ImageData, out: str | Path, config: TrainConfig, settings: GuidedSettings,
                   teacher: Model | None, command: str = "", accelerator=None) -> Path | None:
    """Stage 1: train a w-conditioned student on the teacher's CFG output and save it at ``out`` (EMA
    weights). It samples like its teacher at half the network evaluations."""
    check_range(settings)
    teacher = check_cfg_teacher(teacher, "guided")
    run = Run(config, command, accelerator)
    tensors = teacher.training_data(data)
    teacher.to(run.device)
    lo, hi = settings.min_guidance_scale, settings.max_guidance_scale
    student_config = teacher.replace_config(
        kind="diffusion", default_guidance_scale=min(max(teacher.config.default_guidance_scale, lo), hi),
        sampling_sigmas={}, guidance_range=[lo, hi], embedding_dim=settings.embedding_dim)
    net = guidance_conditioned(teacher.backbone, settings.embedding_dim).requires_grad_(True).train()
    student = teacher.derive(net=net, config=student_config)
    objective = GuidedDistillationLoss(per_sample_cfg(teacher.denoiser, teacher.conditioner.null_like),
                                       teacher.schedule, teacher.conditioner.training_condition(settings.label_dropout),
                                       (lo, hi))
    result = run.fit(student.denoiser, objective, tensors, {**vars(settings), "dataset": data.name},
                     frozen=[teacher.denoiser])            # the teacher: sharded with the student under FSDP
    if result is None:
        return None
    record = run.record("guided", result, teacher.path, parameters=parameters(student.net))
    cls = teacher.diffusers_pipeline
    usage = (f"```python\nfrom diffusers import {cls}\npipe = {cls}.from_pretrained("
             f"'{out}')\nimage = pipe('grinning face', num_inference_steps=25, guidance_scale=3.0, height=32, "
             f"width=32).images[0]\n```" if cls else
             f"```\nfewstep sample --model {out} --guidance-scale 3 --label 3 --out grid.png\n```")
    what = (f"Stage 1 of guided distillation (Meng et al. 2023) of `{teacher.path}`: it takes the guidance scale "
            f"s ∈ [{lo:g}, {hi:g}] as an input (w = s − 1 through diffusers' guidance-scale embedding) and matches the "
            f"teacher's classifier-free-guided output in ONE network evaluation per step. EMA weights after "
            f"{result.step} steps.")
    return save_model(out, student.derive(net=unwrap(result.ema).net, config=student.replace_config(training=record)),
                      readme(Path(out).name, what, usage, command))


def _recipe(teacher: Model | None, data: ImageData, out: str | Path, config: TrainConfig, settings: GuidedSettings,
            command: str) -> Path | None:
    return distill_guided(data, out, config, settings, teacher, command=command)


register(Method("guided", "guided distillation stage 1 (Meng et al. 2023): one student that takes the guidance scale",
                GuidedSettings, _recipe, teacher="models/digits-teacher or models/emoji-sd", check=check_cfg_teacher,
                options=("consistency", "guided"), family="guided distillation (pixel or latent)"))
