"""Latent consistency models (Luo et al. 2023, arXiv 2310.04378): the w-conditioned student, latent
consistency distillation (LCD) and fine-tuning (LCF), saved as a diffusers LCM pipeline — or, on a pixel model of
the discrete VP space (``train-teacher --parameterization vp``), as a pixel LCM: the same recipe, as LCD is CD on a
VP model with a skipping step and a w input (the w input of a pixel UNet2DModel is :class:`fewstep.nets.guided.GuidedUNet`'s).

The student is f_θ(z, c, w, t) = c_skip(t)·z_t + c_out(t)·ẑ_0(ε_θ(z_t, t, c, ψ(w)))   (eq. 9 + §4.2)
on a UNet2DConditionModel built from the teacher's config with ``time_cond_proj_dim`` set: the guidance
weight w = guidance_scale − 1 enters through diffusers' guidance-scale embedding ψ(w) as
``timestep_cond``, exactly as ``LatentConsistencyModelPipeline`` feeds it, so the saved folder runs
there unchanged. The scalings are :class:`fewstep.core.denoisers.LCMConsistency` (one copy of the math).

LCD is :class:`fewstep.objectives.consistency.ConsistencyLoss` with the "lcm" curriculum (skipping step
k on the 1000-step grid), the teacher's classifier-free-guided ODE at a per-sample guidance scale
s ~ U[s_min, s_max] (eq. 10–11: both branches in one batch), a one-step DDIM / DPM-Solver /
DPM-Solver++ teacher step (Algorithm 1) and a fixed EMA target (μ = 0.95, as diffusers'
``train_lcm_distill_sd_wds.py``). LCF (§4.5) is the same with no teacher: the pair is the data
noised to both levels with the same noise (CT in latent space). LCM-LoRA (Luo et al. 2023b) is LCD
training only LoRA weights of the teacher's own UNet: the teacher is that UNet with its adapters off,
the target network a second adapter on it (:mod:`fewstep.nets.lora`).

The recipe is shared with the methods built on LCD (TCD, :mod:`fewstep.methods.tcd`): what differs — the method
names, the student's config, the objective, the diffusers scheduler and the LoRA's kind — is a :class:`Family`.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn

from ..core.guidance import per_sample_cfg, sample_guidance_scales
from ..errors import FewstepError
from ..models.data import ImageData
from ..models.flow_pipelines import FAMILIES
from ..models.folders import save_model
from ..models.handle import Model, raw_backbone
from ..models.loras import save_lora
from ..nets.guided import guidance_conditioned, student_takes_guidance
from ..nets.lora import AdaptersOff, EMAAdapter, add_lora, trainable_fraction
from ..objectives.base import unwrap
from ..objectives.consistency import ConsistencyLoss
from ..objectives.curricula import Curriculum
from ..objectives.distances import get_distance
from ..training import TrainConfig
from ..training.memory import check_fits, footprint
from .common import Run, readme
from .registry import Method, register

LCM_METHODS = ("lcd", "lcf", "lcm-lora")


@dataclass
class LCMSettings:
    """The method's own settings (recorded in the model folder)."""

    method: str = "lcd"                     # lcd (distil a teacher) | lcf (fine-tune an LCM on data, no teacher) |
                                            # lcm-lora (LCD training only LoRA weights; Luo et al. 2023b) |
                                            # tcd | tcd-lora (the same, with TCD's loss; fewstep.methods.tcd)
    skip: int = 20                          # k: teacher step t_{n+k} → t_n (Luo et al. §4.3; diffusers' default 20)
    solver: str = "ddim"                    # ddim | dpm-solver | dpm-solver++ (the teacher's one-step ψ)
    guidance_min: float = 1.0               # s ~ U[s_min, s_max] (w = s − 1; the paper's w ∈ [2, 14] for SD); the CLI's
    guidance_max: float = 4.0               # --min/--max-guidance-scale default to these (and to GuidedSettings')
    distance: str = "l2"                    # l2 | pseudo-huber (as diffusers' --loss_type huber, with iCT's c)
    target_ema: float = 0.95                # μ of the target network (diffusers' --ema_decay), for lcm-lora too:
                                            # diffusers' LoRA script targets the online student (μ = 0), which
                                            # drifts away within a few hundred steps here (bench/lcm_lora_ablation.py)
    cond_proj_dim: int = 256                # width of ψ(w) (diffusers' --unet_time_cond_proj_dim)
    timestep_scaling: float = 10.0          # LCMScheduler's timestep_scaling in c_skip/c_out
    gradient_checkpointing: bool = False    # trade compute for memory on big UNets (GPU users)
    lora_rank: int = 8                      # lcm-lora: rank of the adapters (the paper's SD runs use 64)


def check_settings(settings: LCMSettings, num_train_timesteps: int, methods: tuple[str, ...] = LCM_METHODS) -> None:
    if settings.method not in methods:
        raise FewstepError(f"unknown latent consistency method {settings.method!r}; choose {', '.join(methods)}")
    if settings.solver not in ("ddim", "dpm-solver", "dpm-solver++"):
        raise FewstepError(f"unknown teacher solver {settings.solver!r} for lcd; choose ddim, dpm-solver or dpm-solver++")
    if not 1 <= settings.skip < num_train_timesteps or num_train_timesteps % settings.skip:
        raise FewstepError(f"skipping step {settings.skip} must divide the teacher's {num_train_timesteps} timesteps")
    if not 1 <= settings.guidance_min <= settings.guidance_max:
        raise FewstepError(f"guidance range [{settings.guidance_min}, {settings.guidance_max}] must satisfy "
                           f"1 <= min <= max (1 = no guidance)")
    if settings.distance not in ("l2", "pseudo-huber"):
        raise FewstepError(f"distance {settings.distance!r}: lcd/lcf take l2 or pseudo-huber")


def check_teacher(teacher: Model, method: str) -> Model:
    """A teacher LCD can start from: a model of the discrete VP space (its skipped grid is of the teacher's
    timesteps), pixel or latent; LCM-LoRA's adapters are saved in diffusers' pipeline LoRA format, so it takes a
    pipeline folder; LCF an LCM."""
    if method.endswith("-lora") and not teacher.diffusers_pipeline:
        raise FewstepError(f"{teacher.path} is not a diffusers pipeline folder; --method {method} takes a "
                           f"Stable-Diffusion-style folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/), e.g. "
                           f"models/emoji-sd")
    space = teacher.config.param.space.name
    if space not in ("vp", "flow") or (space == "flow" and not teacher.is_pipeline):
        raise FewstepError(f"{teacher.path} is a model of the {space} noise space; --method "
                           f"{method} distils a discrete-VP teacher (a diffusers SD/SDXL pipeline such as models/emoji-sd, "
                           f"or a pixel model trained with --parameterization vp) or a flow-matching FLUX/SD3 pipeline "
                           f"(models/emoji-flux); for this one use --method cd")
    if space == "flow" and method.startswith("tcd"):
        raise FewstepError(f"{teacher.path} is a flow-matching pipeline; TCD's γ sampler is written for the discrete VP "
                           f"space (TCDScheduler): distil it with --method lcd or lcm-lora (FlowMatchLCMScheduler)")
    if method != "lcf" and teacher.config.is_lcm:
        raise FewstepError(f"{teacher.path} is already an LCM; distil a diffusion teacher, or fine-tune it with --method lcf")
    if method == "lcf" and not (teacher.config.is_lcm and teacher.takes_guidance):
        raise FewstepError(f"lcf fine-tunes an LCM (a UNet with time_cond_proj_dim); {teacher.path} is not one: "
                           f"distil it first with --method lcd")
    if method != "lcf" and teacher.takes_guidance:
        raise FewstepError(f"{teacher.path} takes the guidance scale as an input already; LCD distils a "
                           f"classifier-free-guided teacher such as models/emoji-sd")
    return teacher


def lcm_config(teacher: Model, settings: LCMSettings):
    """The LCM's fewstep.json: its space's consistency parameterization (LCM's scalings on the discrete VP space; on
    the flow ODE of FLUX / SD3 the velocity adapter itself, x̂_0 = x_t − t·v, whose boundary is exactly t = 0, as
    ``FlowMatchLCMScheduler`` reads it: :mod:`fewstep.core.flow`), its skipped grid (T / k steps, LCMScheduler's
    ``original_inference_steps``), sampled in 4 steps at the teacher's scale if it learned it. A student whose backbone
    has no guidance input (SD3's: :func:`fewstep.nets.guided.student_takes_guidance`) distils one scale and is sampled
    at 1."""
    lo, hi = settings.guidance_min, settings.guidance_max
    s = teacher.config.default_guidance_scale
    guided = student_takes_guidance(teacher.backbone)
    return teacher.replace_config(
        kind="consistency", parameterization=teacher.config.param.space.consistency, default_sampler="consistency",
        default_steps=4, default_guidance_scale=(s if lo <= s <= hi else (lo + hi) / 2) if guided else 1.0,
        guidance_range=[lo, hi] if guided else [], embedding_dim=settings.cond_proj_dim, sampling_sigmas={},
        serves_steps=[], original_inference_steps=teacher.schedule.num_train_timesteps // settings.skip,
        timestep_scaling=settings.timestep_scaling)


@dataclass(frozen=True)
class Family:
    """What :func:`distill_lcm` takes from the method family it runs (LCM's below; TCD's in
    :mod:`fewstep.methods.tcd`): the rest of the recipe — teacher, guided teacher step, w-conditioned student or
    LoRA adapters with an EMA target, training, saving — is LCD's, written once here."""

    name: str                                   # "LCM", "TCD": the model folder's README names it
    paper: str                                  # "Luo et al. 2023"
    methods: tuple[str, ...]                    # its method names; the one ending in "-lora" trains adapters only
    config: Callable[[Model, Any], Any]         # (teacher, settings) -> the student's ModelConfig
    objective: type                             # ConsistencyLoss or a subclass (same constructor)
    scheduler: str                              # the diffusers scheduler that runs what it makes
    call_args: str = ""                         # extra pipeline call arguments in the README (TCD's eta)
    lora_title: str = "An LCM-LoRA (Luo et al. 2023b)"   # what its LoRA folder's README calls it
    model_title: str = "latent consistency model"        # what its full model's README calls it

    @property
    def lora(self) -> str:
        return next(m for m in self.methods if m.endswith("-lora"))


def distill_lcm(teacher: Model, data: ImageData, out: str | Path, config: TrainConfig, settings: LCMSettings,
                command: str = "", accelerator=None, family: Family | None = None) -> Path | None:
    """LCD or LCM-LoRA (``teacher`` a diffusion pipeline) or LCF (``teacher`` an LCM pipeline to fine-tune)
    on ``data``; saves a LatentConsistencyModelPipeline folder at ``out`` (the student's EMA weights), or
    for LCM-LoRA the acceleration vector as a diffusers LoRA. ``family``: LCM's (default) or another built on LCD
    (TCD's)."""
    family = family or LCM
    check_settings(settings, teacher.schedule.num_train_timesteps, family.methods)
    check_teacher(teacher, settings.method)
    run = Run(config, command, accelerator)
    for part in teacher.parts.values():      # the codec's and conditioner's networks under a bf16/fp16 teacher
        if isinstance(part, nn.Module):      # UNet: small, used once to encode the data, saved with the student: fp32
            part.float()
    tensors = teacher.training_data(data)
    teacher.to(run.device)
    lo, hi = settings.guidance_min, settings.guidance_max
    null = teacher.conditioner.null_like
    params, target, condition = None, None, teacher.conditioner.training_condition(0.0)
    if settings.method == family.lora:
        unet = teacher.backbone                      # one UNet: the adapters are the student, the base is the teacher
        params = add_lora(unet, settings.lora_rank)
        target = EMAAdapter(unet)                # ... and the target network a second adapter on it
        teacher_fn = with_scales(per_sample_cfg(AdaptersOff(teacher.denoiser, unet), null), lo, hi)
    else:
        if config.memory_check:
            _check_fits(teacher, config, run, frozen_sharded=settings.method != "lcf")
        distil = settings.method != "lcf"           # lcd, tcd: a w-conditioned copy of the teacher; lcf: the LCM itself
        unet = (guidance_conditioned(teacher.backbone, settings.cond_proj_dim) if distil
                else copy.deepcopy(teacher.net)).float().requires_grad_(True)  # fp32 under a bf16/fp16 teacher
        if distil and not student_takes_guidance(teacher.backbone):   # SD3: no guidance input; one scale distilled
            teacher_fn = with_scales(per_sample_cfg(teacher.denoiser, null), lo, hi)
        else:
            teacher_fn = per_sample_cfg(teacher.denoiser, null) if distil else None
            condition = with_scale_input(condition, lo, hi)   # the student takes s, the teacher guides at it
    if settings.gradient_checkpointing:
        raw_backbone(unet).enable_gradient_checkpointing()
    student = teacher.derive(net=unet.train(), config=family.config(teacher, settings))
    curriculum = Curriculum.for_method("lcf" if settings.method == "lcf" else "lcd", config.max_steps,
                                       skip=settings.skip, target_ema=settings.target_ema)
    objective = family.objective(teacher.schedule, curriculum, get_distance(settings.distance), teacher=teacher_fn,
                                 solver=settings.solver, condition=condition, target=target)
    frozen = [teacher.denoiser] if teacher_fn is not None and target is None else None   # lcd/tcd: sharded under FSDP
    result = run.fit(student.denoiser, objective, tensors, {**asdict(settings), "dataset": data.name}, params=params,
                     frozen=frozen)
    if result is None:
        return None
    record = run.record(settings.method, result, teacher.path)
    trained = student.derive(net=unwrap(result.ema).net)
    if target is not None:
        return _save_lcm_lora(out, target.remove(trained.backbone), teacher, data, settings, record, family)
    what = (f"A {family.model_title} ({settings.method.upper()}, "
            f"{family.paper}) of `{teacher.path}` on "
            f"`{data.name}`: 1–8 steps, guidance scale {lo:g}–{hi:g} as an input (one network evaluation per step).")
    final = trained.derive(config=trained.replace_config(training=record))
    cls = final.diffusers_pipeline
    usage = (f"Runs in diffusers:\n\n```python\nfrom diffusers import {cls}\n"
             f"pipe = {cls}.from_pretrained('{out}')  # with its {family.scheduler}\n"
             f"image = pipe('grinning face', num_inference_steps=4, guidance_scale=4.0{family.call_args}, height=32, "
             f"width=32).images[0]\n```"
             if cls else f"```\nfewstep sample --model {out} --steps 4 --guidance-scale 3 --label 3 --out grid.png\n```")
    return save_model(out, final, readme(Path(out).name, what, usage, command))


def _check_fits(teacher: Model, config: TrainConfig, run: Run, frozen_sharded: bool = True) -> None:
    """LCD/LCF train a full copy of the UNet: refuse before copying it if its weights cannot fit — under FSDP per
    process, the student's state and LCD's teacher (sharded with it; LCF's loaded LCM stays whole) divided over the
    processes."""
    from ..training.sharding import largest_unit

    backbone = teacher.backbone
    n = sum(p.numel() for p in backbone.parameters())
    teacher_bytes = sum(p.numel() * p.element_size() for p in backbone.parameters())
    ema = config.ema_decay > 0
    advice = ("Add --ema 0 (the target is then the only EMA; −{:.1f} GiB), ".format(4 * n / 2 ** 30) if ema else "") + (
        "--optimizer adamw-8bit (−{:.1f} GiB), ".format(6 * n / 2 ** 30)
        if config.optimizer != "adamw-8bit" and not run.sharded else "") + (
        "use --method lcm-lora (adapters only), or a machine with more memory. ")
    need = footprint(n, optimizer=config.optimizer, target=True, ema=ema, frozen=n,
                     frozen_dtype=next(backbone.parameters()).dtype, frozen_sharded=frozen_sharded,
                     unit=largest_unit(backbone))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", run.processes))
    check_fits(need, f"training a full copy of this {n / 1e6:.1f}M-parameter UNet", run.device, advice,
               processes=run.processes if run.sharded else 1, local_processes=local, resident=teacher_bytes)


def with_scale_input(condition, lo: float, hi: float):
    """batch → the student's conditioning and s ~ U[s_min, s_max] as its ``guidance_scale`` input."""
    def conditioned(batch: dict) -> dict:
        cond = condition(batch)
        return {**cond, "guidance_scale": sample_guidance_scales(len(next(iter(cond.values()))), lo, hi,
                                                                 next(iter(cond.values())).device)}
    return conditioned


def with_scales(teacher_fn, lo: float, hi: float):
    """An LCM-LoRA student takes no s (guidance stays CFG around it at sampling time): its teacher guides at
    s ~ U[s_min, s_max] drawn here instead (diffusers' LoRA script uses one fixed scale: min = max)."""
    def teacher(cond: dict) -> tuple:
        first = next(iter(cond.values()))
        return teacher_fn({**cond, "guidance_scale": sample_guidance_scales(len(first), lo, hi, first.device)})
    return teacher


def _save_lcm_lora(out, unet, teacher: Model, data: ImageData, settings: LCMSettings,
                   record: dict, family: Family | None = None) -> Path:
    """An LCM-LoRA (TCD-LoRA) folder: the acceleration vector τ_LCM in diffusers' LoRA format + what it is."""
    family = family or LCM
    original_steps, command = teacher.schedule.num_train_timesteps // settings.skip, record["command"]
    lora, base = trainable_fraction(unet)
    cls, sched = teacher.diffusers_pipeline, family.scheduler
    flow = teacher.config.param.space.name == "flow"
    if flow:          # FLUX / SD3: x̂_0 = x_t − t·v re-noised along the flow, on the pipeline's own grid
        sched, grid = teacher.config.param.space.consistency_scheduler, ""
        call = (f", max_sequence_length={teacher.conditioner.lengths[-1]}, "
                f"{FAMILIES[teacher.parts['family']].guidance_args(1.0)}")
    else:
        grid, call = f", original_inference_steps={original_steps}", f", guidance_scale=1.0{family.call_args}"
    info = {"kind": family.lora, "base": str(teacher.path), "dataset": data.name, "rank": settings.lora_rank,
            "original_inference_steps": original_steps, "guidance_range": [settings.guidance_min, settings.guidance_max],
            "trainable_parameters": lora, "base_parameters": base, "training": record}
    readme = (f"# {Path(out).name}\n\n{family.lora_title} for `{teacher.path}`: rank {settings.lora_rank}, "
              f"{lora:,} parameters ({100 * lora / base:.1f}% of the {'transformer' if flow else 'UNet'}). Plug it "
              f"into the base model (or a fine-tuned one) and sample in 2–8 steps with {sched}:\n\n```python\n"
              f"from diffusers import {cls}, {sched}\n"
              f"pipe = {cls}.from_pretrained('{teacher.path}')\n"
              f"pipe.scheduler = {sched}.from_config(pipe.scheduler.config{grid})\n"
              f"pipe.load_lora_weights('{out}')\n"
              f"image = pipe('red apple', num_inference_steps=4{call}, height=32, width=32).images[0]\n"
              f"```\n\nor `fewstep sample --model {teacher.path} --lora {out} --steps 4`. Trained with:\n\n"
              f"```\n{command}\n```\n")
    return save_lora(out, unet, info, readme, pipeline=cls)


LCM = Family("LCM", "Luo et al. 2023", LCM_METHODS, lcm_config, ConsistencyLoss, "LCMScheduler")


def _recipe(teacher: Model, data: ImageData, out: str | Path, config: TrainConfig, settings: LCMSettings,
            command: str) -> Path | None:
    return distill_lcm(teacher, data, out, config, settings, command=command)


def _lora_note(folder: Path) -> str:
    return f"(a diffusers LoRA: {folder}/pytorch_lora_weights.safetensors)"


for _name, _summary, _teacher in (
        ("lcd", "latent consistency distillation (Luo et al. 2023) of a discrete-VP teacher: a diffusers SD/SDXL "
                "pipeline, or a pixel model trained with --parameterization vp", "models/emoji-sd"),
        ("lcf", "latent consistency fine-tuning (Luo et al. 2023): an LCM on new data, no teacher", "models/emoji-lcm"),
        ("lcm-lora", "LCM-LoRA (Luo et al. 2023b): LCD training only LoRA weights, an acceleration vector",
         "models/emoji-sd")):
    register(Method(_name, _summary, LCMSettings, _recipe, teacher=_teacher, check=check_teacher,
                    options=("consistency", "guided", "latent"), family="latent consistency models (pipelines)",
                    flags={"guidance_min": "min_guidance_scale", "guidance_max": "max_guidance_scale"},
                    frozen_teacher_dtype=True, note=_lora_note if _name == "lcm-lora" else None))
