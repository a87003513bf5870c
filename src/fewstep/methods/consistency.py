"""Make consistency models: distill a teacher (CD) or train from data alone (CT, iCT, ACT), on the
shared trainer, and save the result as a model folder that ``fewstep sample/eval/edit/bench`` load.

The student is f_θ(x, σ) = c_skip(σ)·x + c_out(σ)·F_θ(c_in(σ)·x, ¼ ln σ) with the consistency
boundary condition (Song et al. 2023, Appendix C; :func:`fewstep.core.denoisers.cm_scalings`), on the
same diffusers UNet2DModel backbone as the teacher. For CD it starts from the teacher's weights
(Song et al. 2023, §5: "initialize the consistency model with the pre-trained diffusion model").

CD takes a pixel teacher of any registered noise space (:mod:`fewstep.core.parameterizations`): the student is
the space's consistency form (``cm`` for an EDM teacher; a flow teacher's own adapter, whose x̂_0 = x_t − t·v
meets f(x, 0) = x, as ``FlowMatchLCMScheduler`` reads it), trained on the space's N-point consistency grid
(Karras for EDM, uniform shifted time for flow) with the teacher's ODE step in σ space (Euler there is the flow
Euler step of ``FlowMatchEulerDiscreteScheduler``). CT, iCT and ACT train EDM-space students from data.
ECT (Geng et al. 2024) tunes an EDM teacher's weights into a consistency model with continuous-time CT pairs
(:func:`distill_ect`): it takes the teacher's weights, never its ODE.
The teacher's PF-ODE is the classifier-free-guided one at ``guidance_scale``, so the student
samples in one step with the guidance built in (it is then sampled at guidance scale 1).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..core.parameterizations import consistency_of, parameterization, schedule_fields
from ..errors import FewstepError
from ..models.config import ModelConfig
from ..models.data import ImageData
from ..models.folders import new_pixel_model, save_model, shipped_models_dir
from ..models.handle import Model
from ..nets.unets import build_unet
from ..objectives.consistency import ConsistencyLoss
from ..objectives.curricula import Curriculum
from ..objectives.distances import get_distance, pseudo_huber_c
from ..training import TrainConfig
from .common import Run, parameters, readme
from .registry import Method, register

CM_METHODS = ("cd", "ct", "ict", "act")


@dataclass
class ConsistencySettings:
    """The method's own settings (recorded in the model folder)."""

    method: str = "cd"                  # cd | ct | ict | act
    distance: str | None = None         # l2 | l1 | pseudo-huber | classifier | features | lpips (fewstep.distances); None: the
                                        # method's own, pseudo-Huber for iCT (Song & Dhariwal 2023 §3.3), l2 otherwise
    solver: str = "heun"                # CD's teacher ODE step: euler | heun
    guidance_scale: float = 2.0         # CD: the teacher's CFG scale that the student learns (1 = none)
    label_dropout: float = 0.1          # share of null labels: the student learns the unconditional ODE too
    num_scales: int | None = None       # CD: N (default 18); CT/iCT: the final N (s1)
    start_scales: int | None = None     # CT/iCT: the first N (s0)
    target_ema: float | None = None     # CD: μ (default 0.95)
    ct_curriculum: str = "paper"        # CT/ACT's μ(k): "paper" (μ0 = 0.9, tuned for 800k iterations) or "fitted" to
                                        # this run's length (fewstep.objectives.curricula.fitted_mu0)
    width: int = 32                     # CT/iCT/ACT from scratch: UNet width
    classifier: str | None = None       # for distance "classifier" / "features": the network's folder
    lpips_weights: str | None = None    # for distance "lpips"
    # ACT (Kong et al. 2024)
    gan_weight: float = 0.3             # λ in (1 − λ)·L_CT + λ·w(σ)·L_G
    gan_weighting: str = "none"         # w(σ): "none" (ACT's default) | "edm"
    d_lr: float = 1e-4
    r1_gamma: float = 10.0              # kong13661/ACT's defaults
    r1_interval: int = 16               # lazy R1: every k steps (not scaled by k, as the reference)
    augment: float = 0.0                # the augmentation probability p at the start (it then adapts)
    ada_target: float = 10000.0         # p rises while the EMA of R1 exceeds this (the reference's r1_threshold)
    ada_length: float = 500000.0        # images for p to move by 1 (ada_length)


def consistency_config(data: ImageData, param, schedule, two_step_sigma: float | None = None) -> ModelConfig:
    """The fewstep.json of a pixel consistency model of ``data`` in ``param`` on ``schedule``: one step by default,
    guidance built in; with ``two_step_sigma`` its 2-step grid [σ_max, σ, 0] stored (ECT's and sCM's)."""
    stored = ({"2": [float(schedule.sigma_max), float(two_step_sigma), 0.0]}
              if two_step_sigma is not None and 0 < two_step_sigma < float(schedule.sigma_max) else {})
    return ModelConfig(kind="consistency", parameterization=param.name, schedule=schedule_fields(schedule),
                       image_size=data.image_size, channels=data.channels, class_names=data.class_names,
                       dataset=data.name, default_sampler="consistency", default_steps=1, default_guidance_scale=1.0,
                       sampling_sigmas=stored)


def resolved_distance(settings: ConsistencySettings) -> str:
    """The distance a run uses: ``--distance``, else the method's own — iCT's pseudo-Huber (Song & Dhariwal 2023
    §3.3); ACT's LPIPS (kong13661/ACT train_cifar10.py:505), for which the data set's feature network stands in
    (``features``, :mod:`fewstep.objectives.distances`); l2 otherwise (openai/consistency_models' CT default)."""
    return settings.distance or {"ict": "pseudo-huber", "act": "features"}.get(settings.method, "l2")


def distill_consistency(data: ImageData, out: str | Path, config: TrainConfig, settings: ConsistencySettings,
                        teacher: Model | None = None, command: str = "", accelerator=None) -> Path | None:
    """Train a consistency model with ``settings.method`` and save it at ``out`` (EMA weights).

    CD needs ``teacher`` (a diffusion model folder of the same data); CT, iCT and ACT train from
    ``data`` alone. Returns the folder on the main process, None on the others.
    """
    method = settings.method
    if method not in CM_METHODS:
        raise FewstepError(f"unknown consistency method {method!r}; choose one of {', '.join(CM_METHODS)}")
    settings = replace(settings, distance=resolved_distance(settings))
    run = Run(config, command, accelerator)
    if method == "cd":
        teacher = check_teacher(teacher, data, "cd").to(run.device)
        param, schedule = consistency_of(teacher.config.param.space), teacher.schedule
    else:
        param = parameterization("cm")
        schedule = param.make_schedule()            # EDM's defaults (Karras et al. 2022, Table 1)
    student_config = consistency_config(data, param, schedule)
    if method == "cd":
        guidance = settings.guidance_scale
        student = teacher.derive(net=copy.deepcopy(teacher.net).requires_grad_(True).train(), config=student_config)
        def teacher_fn(cond: dict) -> tuple:
            return teacher.guided(cond, guidance)
    else:
        unet = build_unet(data.image_size, data.channels, data.num_classes, width=settings.width)
        student, teacher_fn, guidance = new_pixel_model(student_config, unet), None, 1.0
    curriculum = Curriculum.for_method(method, config.max_steps, num_scales=settings.num_scales if method == "cd" else None,
                                       s1=settings.num_scales if method != "cd" else None, s0=settings.start_scales,
                                       target_ema=settings.target_ema, fitted=settings.ct_curriculum == "fitted")
    networks = {"classifier": "classifier", "features": "features"}   # the shipped network each distance reads
    classifier = settings.classifier or (str(shipped_models_dir() / f"{data.name.split(':')[0]}-{networks[settings.distance]}")
                                         if settings.distance in networks else None)
    distance = get_distance(settings.distance, classifier, settings.lpips_weights)
    objective = ConsistencyLoss(schedule, curriculum, distance, teacher=teacher_fn, solver=settings.solver,
                                condition=student.conditioner.training_condition(settings.label_dropout))
    if method == "act":
        from ..nets.discriminator import Discriminator
        from ..objectives.adversarial import AdaptiveAugment, AdversarialConsistencyLoss

        disc = Discriminator(data.image_size, data.channels, data.num_classes, width=settings.width)
        augment = AdaptiveAugment(p=settings.augment, target=settings.ada_target, length=settings.ada_length)
        objective = AdversarialConsistencyLoss(objective, disc, settings.gan_weight, settings.d_lr,
                                               settings.r1_gamma, settings.r1_interval, augment,
                                               settings.gan_weighting, warmup=config.warmup_steps)
    result = run.fit(student.denoiser, objective, student.training_data(data),
                     {**asdict(settings), "dataset": data.name, "curriculum": asdict(curriculum)},
                     frozen=[teacher.denoiser] if method == "cd" else None)   # the teacher: sharded under FSDP
    if result is None:
        return None
    record = run.record(method, result, teacher.path if teacher else None, distilled_guidance_scale=guidance,
                        parameters=parameters(student.net))
    return save_model(out, student.derive(net=result.ema.net, config=replace(student_config, training=record)),
                      _readme(out, method, data, result.step, guidance, command))


@dataclass
class ECTSettings:
    """ECT's settings (recorded in the model folder); defaults are locuslab/ect ``run_ecm.sh`` on CIFAR-10 where it
    sets them, ``ct_train.py``'s otherwise."""

    method: str = "ect"
    label_dropout: float = 0.1          # share of null labels, as the teacher's (ECT's CIFAR-10 run is unconditional)
    p_mean: float = -1.1                # ln t ~ N(P_mean, P_std²) (ct_train.py --mean, --std)
    p_std: float = 2.0
    q: float = 2.0                      # Δt shrinks by q per stage (ct_train.py -q; run_ecm_1hour.sh: 256)
    k: float = 8.0                      # n(t) = 1 + k·sigmoid(−b·t) (ct_train.py -k, -b)
    b: float = 1.0
    stages: int = 8                     # stages over the run (run_ecm.sh: 25.6 Mimg / 3.2 Mimg; run_ecm_1hour.sh: 1)
    huber_c: float = 0.0                # c of √(‖·‖² + c²) − c (ct_train.py -c, run_ecm.sh leaves it at 0: the l2 norm)
    two_step_sigma: float = 0.821       # the 2-step sampler's intermediate t (ct_train.py --mid_t), stored in the folder


def distill_ect(teacher: Model, data: ImageData, out: str | Path, config: TrainConfig, settings: ECTSettings,
                command: str = "", accelerator=None) -> Path | None:
    """Easy consistency tuning (ECT; Geng et al. 2024, *Consistency Models Made Easy*; locuslab/ect
    ``training/loss.py: ECMLoss``): the student starts from the EDM teacher's weights and is trained with
    continuous-time consistency *training* pairs, so the teacher's ODE is never run:

    - t ~ lognormal(P_mean, P_std), r = t·(1 − q^−(stage+1)·(1 + k·sigmoid(−b·t))) clamped at 0 (loss.py:45-56),
      the stage advancing every K/stages steps (:func:`fewstep.objectives.curricula.ect_stage`);
    - x_t = y + t·ε, x_r = y + r·ε with the same ε, the same dropout mask in both passes (loss.py:61-73);
    - the target is the online network under stop-gradient (no EMA target), replaced by y where r = 0 (loss.py:70-79);
    - loss = (√(‖D(x_t, t) − D(x_r, r)‖² + c²) − c) / (t − r), c = 0 (loss.py:81-92, run_ecm.sh).

    One loss for all: :class:`fewstep.objectives.consistency.ConsistencyLoss` with the "ect" curriculum and
    :func:`fewstep.objectives.distances.pseudo_huber_c`.

    Deviations from the reference, and why:
    - the student's scalings are fewstep's registered ``cm`` (σ_min = 0.002) in training and sampling. ECMPrecond
      (locuslab/ect ``training/networks.py:706-711``) uses EDM's c_skip/c_out (σ_min = 0) while training and the
      CM boundary with σ_min = 0.003 when sampling (the reference itself trains and samples different scalings);
      here one formula serves both (DESIGN.md §2) and f(x, σ_min) = x holds exactly. Moving σ_min from 0 to 0.002
      moves c_out by ≤ 0.0020 and c_skip·x by ≤ 0.0053 (|x| ≤ 1 + 3σ; computed over σ ∈ [0.002, 100]), so D by
      ≲ 0.007 at a unit-scale F: under one 8-bit level (2/255 ≈ 0.0078);
    - stages scale with the run: 8 equal stages (run_ecm.sh's 25.6 Mimg / 3.2 Mimg per stage); the
      reference advances every 250 ticks of 12.8 kimg whatever the run's length;
    - the trainer's AdamW (lr warm-up, grad-clip 1, weight EMA 0.999 with diffusers' warm-up) for ECT's RAdam
      (lr 1e-4, no clip, EMA 0.9999, ``run_ecm.sh``): a few hundred steps here, not 200k; the saved weights are the
      EMA's as for every fewstep model;
    - dropout: the teacher's (0.1 in fewstep's pixel UNet), not run_ecm.sh's 0.2: the backbone is the teacher's;
    - class-conditional with --label-dropout (the teacher's conditioning); the reference's CIFAR-10 run is not;
    - no augmentation pipe (run_ecm.sh --augment=0.0 too).
    """
    run = Run(config, command, accelerator)
    teacher = check_ect_teacher(teacher, "ect")
    teacher.check_data(data)
    teacher.to(run.device)
    param = consistency_of(teacher.config.param.space)          # cm for the EDM teacher
    student_config = consistency_config(data, param, teacher.schedule, settings.two_step_sigma)
    student = teacher.derive(net=copy.deepcopy(teacher.net).requires_grad_(True).train(), config=student_config)
    curriculum = Curriculum.for_method("ect", config.max_steps, p_mean=settings.p_mean, p_std=settings.p_std,
                                       q=settings.q, k=settings.k, b=settings.b, stages=settings.stages)
    objective = ConsistencyLoss(teacher.schedule, curriculum, pseudo_huber_c(settings.huber_c),
                                condition=student.conditioner.training_condition(settings.label_dropout))
    result = run.fit(student.denoiser, objective, student.training_data(data),
                     {**asdict(settings), "dataset": data.name, "curriculum": asdict(curriculum)})
    if result is None:
        return None
    record = run.record("ect", result, teacher.path, distilled_guidance_scale=1.0, parameters=parameters(student.net))
    return save_model(out, student.derive(net=result.ema.net, config=replace(student_config, training=record)),
                      _readme(out, "ect", data, result.step, 1.0, command))


def check_ect_teacher(teacher: Model | None, method: str = "ect") -> Model:
    """An EDM σ-space pixel diffusion teacher (ECT's t is an EDM σ), before data loads."""
    check_cd_teacher(teacher, method)
    if teacher.config.param.space.name != "edm":
        raise FewstepError(f"{teacher.path} is a {teacher.config.param.space.name} model; --method {method} tunes an "
                           f"EDM σ-space teacher such as models/emoji-pixel-teacher")
    return teacher


def check_cd_teacher(teacher: Model | None, method: str = "cd") -> Model:
    """A pixel-space diffusion teacher of a registered noise space (EDM, VP, flow, TrigFlow), before data loads."""
    if teacher is None:
        raise FewstepError(f"--method {method} needs a teacher: --teacher DIR (e.g. models/digits-teacher)")
    cfg = teacher.config
    if cfg.kind != "diffusion" or teacher.takes_guidance:
        raise FewstepError(f"{teacher.path} is a {cfg.kind} model ({cfg.parameterization}"
                           f"{', guidance as an input' if teacher.takes_guidance else ''}); --method {method} needs a "
                           f"classifier-free-guided diffusion teacher such as models/digits-teacher")
    if not teacher.codec.pixels:    # the latent family's consistency distillation has a w input and a skipping step
        raise FewstepError(f"{teacher.path} is a latent pipeline; consistency distillation of a pipeline is --method "
                           f"lcd (or lcm-lora)")
    return teacher


def check_teacher(teacher: Model | None, data: ImageData, method: str) -> Model:
    """A pixel-space diffusion teacher of ``data`` (:func:`check_cd_teacher`, and the data fits it)."""
    check_cd_teacher(teacher, method).check_data(data)
    return teacher


def _readme(out: str | Path, method: str, data: ImageData, steps: int, guidance: float, command: str) -> str:
    what = {"cd": f"distilled (CD) from a diffusion teacher's PF-ODE with classifier-free guidance s = {guidance:g}",
            "ct": "trained from data alone with consistency training (CT, Song et al. 2023)",
            "ict": "trained from data alone with improved consistency training (iCT, Song & Dhariwal 2023)",
            "act": "trained from data alone with adversarial consistency training (ACT, Kong et al. 2024)",
            "ect": "tuned from a diffusion teacher's weights with easy consistency tuning (ECT, Geng et al. 2024)"}[method]
    return readme(Path(out).name, f"A consistency model on `{data.name}` ({data.image_size}×{data.image_size}), {what}; "
                  f"EMA weights after {steps} steps. Sample in 1–4 steps:",
                  f"```\nfewstep sample --model {out} --steps 1 --label 3 --num 16 --out grid.png\n```", command)


def _recipe(teacher: Model | None, data: ImageData, out: str | Path, config: TrainConfig,
            settings: ConsistencySettings, command: str) -> Path | None:
    return distill_consistency(data, out, config, settings, teacher, command=command)


for _name, _summary, _teacher in (
        ("cd", "consistency distillation (Song et al. 2023) of a pixel teacher's guided PF-ODE: 1-2 steps",
         "models/digits-teacher"),
        ("ct", "consistency training from data alone (Song et al. 2023)", None),
        ("ict", "improved consistency training (Song & Dhariwal 2023): pseudo-Huber, lognormal levels", None),
        ("act", "adversarial consistency training (Kong et al. 2024): CT + a discriminator", None)):
    register(Method(_name, _summary, ConsistencySettings, _recipe, teacher=_teacher,
                    check=check_cd_teacher if _teacher else None, family="consistency models (pixel space)",
                    options=("consistency", "adversarial") if _name == "act" else ("consistency",),
                    # kong13661/ACT train_cifar10.py:330-344: RAdam, β = (0, 0.99) for the generator
                    **({"optimizer": "radam", "betas": (0.0, 0.99)} if _name == "act" else {})))

register(Method("ect", "easy consistency tuning (Geng et al. 2024): CT pairs with a shrinking Δt, started from the "
                "teacher's weights (not its ODE): 1-2 steps", ECTSettings,
                lambda teacher, data, out, config, settings, command: distill_ect(teacher, data, out, config, settings,
                                                                                 command=command),
                teacher="models/emoji-pixel-teacher", check=check_ect_teacher,
                family="consistency models (pixel space)", options=("consistency", "ect"),
                flags={"q": "ect_q", "k": "ect_k", "b": "ect_b", "stages": "ect_stages"}))
