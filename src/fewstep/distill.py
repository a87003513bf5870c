"""Make consistency models: distill a teacher (CD) or train from data alone (CT, iCT, ACT), on the
shared trainer, and save the result as a model folder that ``fewstep sample/eval/edit/bench`` load.

The student is f_θ(x, σ) = c_skip(σ)·x + c_out(σ)·F_θ(c_in(σ)·x, ¼ ln σ) with the consistency
boundary condition (Song et al. 2023, Appendix C; :func:`fewstep.consistency.cm_scalings`), on the
same diffusers UNet2DModel backbone as the teacher. For CD it starts from the teacher's weights
(Song et al. 2023, §5: "initialize the consistency model with the pre-trained diffusion model").
The teacher's PF-ODE is the classifier-free-guided one at ``guidance_scale``, so the student
samples in one step with the guidance built in (it is then sampled at guidance scale 1).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import torch

from .consistency import cm_scalings
from .consistency_losses import ConsistencyLoss, Curriculum
from .data import ImageData
from .denoisers import EDMDenoiser
from .distances import get_distance
from .errors import FewstepError
from .models import LoadedModel, ModelConfig, build_unet, save_model
from .sampling import conditioned
from .schedules import EDMSchedule
from .train import TrainConfig, train

CM_METHODS = ("cd", "ct", "ict", "act")


@dataclass
class ConsistencySettings:
    """The method's own settings (recorded in the model folder)."""

    method: str = "cd"                  # cd | ct | ict | act
    distance: str = "l2"                # l2 | l1 | pseudo-huber | classifier | lpips (fewstep.distances)
    solver: str = "heun"                # CD's teacher ODE step: euler | heun
    guidance_scale: float = 2.0         # CD: the teacher's CFG scale that the student learns (1 = none)
    label_dropout: float = 0.1          # share of null labels: the student learns the unconditional ODE too
    num_scales: int | None = None       # CD: N (default 18); CT/iCT: the final N (s1)
    start_scales: int | None = None     # CT/iCT: the first N (s0)
    target_ema: float | None = None     # CD: μ (default 0.95)
    width: int = 32                     # CT/iCT/ACT from scratch: UNet width
    classifier: str | None = None       # for distance "classifier"
    lpips_weights: str | None = None    # for distance "lpips"
    # ACT (Kong et al. 2024)
    gan_weight: float = 0.3             # λ in (1 − λ)·L_CT + λ·w(σ)·L_G
    gan_weighting: str = "none"         # w(σ): "none" (ACT's default) | "edm"
    d_lr: float = 1e-4
    r1_gamma: float = 10.0              # kong13661/ACT's defaults
    r1_interval: int = 16               # lazy R1: every k steps, scaled by k (StyleGAN2)
    augment: float = 0.0                # probability of each differentiable augmentation


def distill_consistency(data: ImageData, out: str | Path, config: TrainConfig, settings: ConsistencySettings,
                        teacher: LoadedModel | None = None, command: str = "", accelerator=None) -> Path | None:
    """Train a consistency model with ``settings.method`` and save it at ``out`` (EMA weights).

    CD needs ``teacher`` (a diffusion model folder of the same data); CT, iCT and ACT train from
    ``data`` alone. Returns the folder on the main process, None on the others.
    """
    method = settings.method
    if method not in CM_METHODS:
        raise FewstepError(f"unknown consistency method {method!r}; choose one of {', '.join(CM_METHODS)}")
    from accelerate import Accelerator

    accelerator = accelerator or Accelerator(mixed_precision=config.mixed_precision)
    schedule = EDMSchedule()
    torch.manual_seed(config.seed)
    if method == "cd":
        teacher = _check_teacher(teacher, data)
        teacher.denoiser.requires_grad_(False).eval().to(accelerator.device)
        unet = copy.deepcopy(teacher.denoiser.net).requires_grad_(True).train()
        guidance = settings.guidance_scale
        def teacher_fn(cond: dict) -> tuple:
            return conditioned(teacher, cond.get("class_labels"), guidance) if data.num_classes else (teacher.denoiser, {})
    else:
        unet = build_unet(data.image_size, data.channels, data.num_classes, width=settings.width)
        teacher_fn, guidance = None, 1.0
    student = EDMDenoiser(unet, sigma_data=schedule.sigma_data, scalings=partial(cm_scalings, sigma_min=schedule.sigma_min))
    curriculum = Curriculum.for_method(method, config.max_steps, num_scales=settings.num_scales if method == "cd" else None,
                                       s1=settings.num_scales if method != "cd" else None, s0=settings.start_scales,
                                       target_ema=settings.target_ema)
    distance = get_distance(settings.distance, settings.classifier, settings.lpips_weights)
    objective = ConsistencyLoss(schedule, curriculum, distance, teacher=teacher_fn, solver=settings.solver,
                                conditional=bool(data.num_classes), null_label=data.num_classes or None,
                                label_dropout=settings.label_dropout if data.num_classes else 0.0)
    if method == "act":
        from .adversarial import AdversarialConsistencyLoss, Discriminator
        disc = Discriminator(data.image_size, data.channels, data.num_classes, width=settings.width)
        objective = AdversarialConsistencyLoss(objective, disc, settings.gan_weight, settings.d_lr,
                                               settings.r1_gamma, settings.r1_interval, settings.augment,
                                               settings.gan_weighting)
    config = replace(config, extra={**asdict(settings), "dataset": data.name, "curriculum": asdict(curriculum)})
    result = train(student, objective, {"images": data.images, "labels": data.labels}, config, accelerator)

    from accelerate.state import PartialState
    if not PartialState().is_main_process:
        return None
    model_config = ModelConfig(
        kind="consistency", parameterization="cm", schedule=asdict(schedule), image_size=data.image_size,
        channels=data.channels, class_names=data.class_names, dataset=data.name, default_sampler="consistency",
        default_steps=1, default_guidance_scale=1.0,
        training={"command": command, "method": method, "steps": result.step, "final_loss": result.last_loss,
                  "distilled_guidance_scale": guidance, "wall_seconds": round(result.seconds, 1),
                  "threads": torch.get_num_threads(), "teacher": str(teacher.path) if teacher else None,
                  "parameters": sum(p.numel() for p in unet.parameters()), "config": asdict(config)})
    return save_model(out, result.ema.net, model_config, _readme(out, method, data, result.step, guidance, command))


def _check_teacher(teacher: LoadedModel | None, data: ImageData) -> LoadedModel:
    if teacher is None:
        raise FewstepError("consistency distillation (cd) needs a teacher: --teacher DIR (e.g. models/digits-teacher)")
    cfg = teacher.config
    if cfg.kind != "diffusion" or cfg.parameterization != "edm":
        raise FewstepError(f"{teacher.path} is a {cfg.kind} model ({cfg.parameterization}); CD needs an EDM "
                           f"diffusion teacher such as models/digits-teacher")
    if (cfg.image_size, cfg.channels, cfg.num_classes) != (data.image_size, data.channels, data.num_classes):
        raise FewstepError(f"teacher {teacher.path} is {cfg.channels}×{cfg.image_size}² with {cfg.num_classes} classes but "
                           f"the data is {data.channels}×{data.image_size}² with {data.num_classes}: use the teacher's data set")
    return teacher


def _readme(out: str | Path, method: str, data: ImageData, steps: int, guidance: float, command: str) -> str:
    what = {"cd": f"distilled (CD) from a diffusion teacher's PF-ODE with classifier-free guidance s = {guidance:g}",
            "ct": "trained from data alone with consistency training (CT, Song et al. 2023)",
            "ict": "trained from data alone with improved consistency training (iCT, Song & Dhariwal 2023)",
            "act": "trained from data alone with adversarial consistency training (ACT, Kong et al. 2024)"}[method]
    return (f"# {Path(out).name}\n\nA consistency model on `{data.name}` ({data.image_size}×{data.image_size}), {what}; "
            f"EMA weights after {steps} steps. Sample in 1–4 steps:\n\n"
            f"```\nfewstep sample --model {out} --steps 1 --label 3 --num 16 --out grid.png\n```\n\n"
            f"Trained with:\n\n```\n{command}\n```\n")
