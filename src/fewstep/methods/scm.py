"""Continuous-time consistency models, sCD and sCT (Lu & Song 2025, arXiv 2410.11081), on the shared trainer.

The student starts as the teacher exactly: the teacher's backbone under TrigFlow's consistency parameterization
(:func:`fewstep.core.parameterizations.continuous_of`: ``trigflow-edm`` for an EDM teacher, whose EDM
preconditioning *is* TrigFlow's with F negated and c_noise = ¼·ln(σ_d·tan t); a TrigFlow teacher's own), and it is
trained with :class:`fewstep.objectives.continuous.ContinuousConsistencyLoss` — sCD on the teacher's
classifier-free-guided PF-ODE at ``guidance_scale`` (the student is then sampled at guidance scale 1), sCT on the
data's own velocity cos(t)·z − sin(t)·x_0 with the teacher's weights as the initialisation only.

Deviation, said in ``--help``: the paper trains sCT from scratch (400k iterations of 512 on CIFAR-10); fewstep's
sCT starts from a diffusion model's weights, as NVlabs/FastGen's ``configs/experiments/EDM/config_sct_cifar10.py``
does (``pretrained_model_path`` = EDM's CIFAR-10 model), since runs here are hundreds of steps.

Sampling is multistep consistency sampling in TrigFlow (``SCMScheduler``'s step; a test checks fewstep's images
against a diffusers ``SCMScheduler`` loop): 1 step from t_max, 2 steps through σ = 0.821 (``two_step_sigma``: FastGen's
recommended 2-step grid for sCM of EDM models, TrigFlow t ≈ 1.02; ``SCMScheduler``'s default intermediate 1.3,
σ ≈ 1.80, is SANA-Sprint's and gave 2-step FID 8.0 against 1-step 7.1 on the emoji testbed), stored as the
folder's 2-step grid and retunable like any consistency model's with ``fewstep eval --tune-sigmas``.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..core.parameterizations import continuous_of, schedule_fields
from ..models.data import ImageData
from ..models.folders import save_model
from ..models.handle import Model
from ..objectives.continuous import ContinuousConsistencyLoss
from ..training import TrainConfig
from .common import Run, parameters, readme
from .consistency import check_cd_teacher, check_teacher, consistency_config
from .registry import Method, register

SCM_METHODS = ("scd", "sct")


@dataclass
class SCMSettings:
    """The method's own settings (recorded in the model folder)."""

    method: str = "scd"                 # scd (the teacher's PF-ODE) | sct (the data's; the teacher is the init)
    guidance_scale: float = 2.0         # scd: the teacher's CFG scale the student learns (1 = none)
    label_dropout: float = 0.1          # share of null labels: the student learns the unconditional ODE too
    p_mean: float = -1.0                # ln(σ_d·tan t) ~ N(P_mean, P_std²) (Lu & Song 2025 §4.1)
    p_std: float | None = None          # None: 1.4 for scd, 1.8 for sct from a diffusion model's weights (FastGen's
                                        # config_scm.py: "1.8 for sCT with the EDM checkpoint")
    tangent_warmup: int | None = None   # H of r = min(1, k/H) (None: 2% of the run, FastGen's 10k of 500k)
    tangent_const: float = 0.1          # c of g/(‖g‖ + c)
    adaptive_weighting: bool = True     # learn w_φ(t)
    prior_weighting: bool = True        # the prior weighting 1/(σ_d·tan t)
    jvp: str = "auto"                   # auto | exact | finite-difference (fewstep.core.tangents)
    two_step_sigma: float = 0.821       # the saved 2-step grid [σ_max, σ, 0]: FastGen's "recommended setting for
                                        # 2-step" sCD/sCT of EDM models (config_scd_cifar10.py: t_list [80, 0.821, 0];
                                        # TrigFlow t = arctan(σ/σ_d) ≈ 1.02, SCMScheduler's intermediate_timesteps);
                                        # SCMScheduler's default 1.3 is SANA-Sprint's. eval --tune-sigmas retunes it


def distill_scm(teacher: Model, data: ImageData, out: str | Path, config: TrainConfig, settings: SCMSettings,
                command: str = "", accelerator=None) -> Path | None:
    """sCD or sCT (``settings.method``) from ``teacher`` on ``data``; saves the student's EMA weights at ``out``.
    Returns the folder on the main process, None on the others."""
    run = Run(config, command, accelerator)
    teacher = check_teacher(teacher, data, settings.method).to(run.device)
    param = continuous_of(teacher.config.param.space)
    schedule = param.make_schedule(schedule_fields(teacher.schedule))
    student_config = consistency_config(data, param, schedule, settings.two_step_sigma)
    student = teacher.derive(net=copy.deepcopy(teacher.net).requires_grad_(True).train(), config=student_config)
    distil = settings.method == "scd"
    guidance = settings.guidance_scale if distil else 1.0

    def teacher_fn(cond: dict) -> tuple:
        return teacher.guided(cond, guidance)

    p_std = settings.p_std if settings.p_std is not None else (1.4 if distil else 1.8)
    objective = ContinuousConsistencyLoss(
        schedule, config.max_steps, teacher_fn if distil else None,
        condition=student.conditioner.training_condition(settings.label_dropout), p_mean=settings.p_mean, p_std=p_std,
        tangent_warmup=settings.tangent_warmup, tangent_const=settings.tangent_const,
        adaptive_weighting=settings.adaptive_weighting, prior_weighting=settings.prior_weighting,
        jvp_method=settings.jvp, lr=config.lr)
    result = run.fit(student.denoiser, objective, student.training_data(data),
                     {**asdict(settings), "p_std": p_std, "tangent_warmup": objective.warmup_steps,
                      "dataset": data.name},
                     frozen=[teacher.denoiser] if distil else None)   # sCD's teacher: sharded under FSDP
    if result is None:
        return None
    record = run.record(settings.method, result, teacher.path, distilled_guidance_scale=guidance,
                        parameters=parameters(student.net))
    what = (f"distilled (sCD) from `{teacher.path}`'s PF-ODE with classifier-free guidance s = {guidance:g}" if distil
            else f"trained (sCT) on the data's PF-ODE, starting from `{teacher.path}`'s weights")
    text = readme(Path(out).name, f"A continuous-time consistency model (Lu & Song 2025) on `{data.name}` "
                  f"({data.image_size}×{data.image_size}) in TrigFlow ({param.name}), {what}; EMA weights after "
                  f"{result.step} steps. Sample in 1 or 2 steps (2 steps through σ = {settings.two_step_sigma:g}, the folder's "
                  f"stored grid; `fewstep eval --tune-sigmas --save-sigmas` retunes it):",
                  f"```\nfewstep sample --model {out} --steps 2 --label 3 --num 16 --out grid.png\n```", command)
    return save_model(out, student.derive(net=result.ema.net, config=replace(student_config, training=record)), text)


def _recipe(teacher: Model, data: ImageData, out: str | Path, config: TrainConfig, settings: SCMSettings,
            command: str) -> Path | None:
    return distill_scm(teacher, data, out, config, settings, command=command)


for _name, _summary in (
        ("scd", "continuous-time consistency distillation (sCD, Lu & Song 2025): TrigFlow, the tangent by JVP, "
                "tangent normalisation and warm-up, adaptive weighting; 1-2 steps"),
        ("sct", "continuous-time consistency training (sCT, Lu & Song 2025) started from a diffusion model's "
                "weights (the paper starts from scratch), no teacher ODE")):
    register(Method(_name, _summary, SCMSettings, _recipe, teacher="models/emoji-pixel-teacher",
                    check=check_cd_teacher, family="continuous-time consistency models (pixel space)",
                    options=("consistency", "continuous")))
