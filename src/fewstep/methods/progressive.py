"""Guided-diffusion distillation, stage 2: progressive distillation of a guidance-conditioned student
(Meng et al. 2023 §3.2, after Salimans & Ho 2022, Algorithm 2), for pixel models and pipelines alike.

Each round a student initialised from its teacher learns to do in ONE DDIM step what the teacher does in
TWO (:class:`fewstep.objectives.progressive.ProgressiveLoss`), so the step count halves every round (e.g.
16 → 8 → 4 → 2 → 1 from the stage-1 student run at 32 steps); the guidance scale stays an input
throughout. The student's N-step grid is its schedule's own: EDM's ρ-spaced grid for a pixel model,
diffusers' "trailing" DDIM timesteps for a pipeline (the 2N-step grid holds it as every other level), so
every pipeline student is a ``StableDiffusionPipeline`` whose DDIMScheduler (trailing, final ᾱ = 1)
takes exactly its steps in diffusers, one UNet pass each.

A run is resumable per round: ``WORK/round-NNNN/student`` is the finished student of the N-step round
(a model folder, written atomically); a finished round is loaded, never redone, and a round cut short
resumes from its own trainer checkpoints in ``WORK/round-NNNN/checkpoints``. The shipped folder holds
the kept students: at its top the one of ``default_steps`` (the largest kept), the others as complete
folders under ``students/N/`` (:func:`fewstep.models.folders.serving` picks one by step count).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from ..errors import FewstepError
from ..models.config import CONFIG_NAME, ModelConfig
from ..models.data import ImageData
from ..models.folders import load_model, save_model
from ..models.handle import Model
from ..objectives.base import unwrap
from ..objectives.progressive import ProgressiveLoss
from ..training import TrainConfig
from .common import Run, readme
from .registry import Method, register


@dataclass
class ProgressiveSettings:
    """Stage-2 settings (recorded in the model folder)."""

    start_steps: int = 16             # N of the first student; its teacher (the stage-1 student) runs 2N DDIM steps.
                                      # Salimans & Ho start from 1024–8192; 32 teacher steps are already close to
                                      # converged here (the digits teacher's DPM-Solver++ FID is flat from 8 steps on)
    final_steps: int = 1              # halve down to this
    keep_steps: list[int] = field(default_factory=lambda: [4, 2, 1])  # students shipped in the model folder
    label_dropout: float = 0.1        # null labels, so every student keeps the unconditional branch (editing)
    first_solver: str = "ddim"        # the first round's teacher steps: "ddim" (Salimans & Ho) or "heun" (2nd order,
                                      # 2 evaluations per step): the first teacher is a continuous-time diffusion model
                                      # whose ODE a few DDIM steps solve poorly (digits teacher, 16 steps: FID 0.29
                                      # Euler/DDIM vs 0.09 Heun at 8); later teachers are DDIM students, always "ddim"


def rounds(start_steps: int, final_steps: int) -> list[int]:
    """The student step counts, halving: rounds(16, 1) = [16, 8, 4, 2, 1]."""
    if final_steps < 1 or start_steps < final_steps:
        raise FewstepError(f"--start-steps ({start_steps}) must be >= --final-steps ({final_steps}) >= 1")
    out = [start_steps]
    while out[-1] > final_steps:
        if out[-1] % 2:
            raise FewstepError(f"--start-steps {start_steps} does not halve down to --final-steps {final_steps}; "
                               f"use final·2^k, e.g. 16 and 1")
        out.append(out[-1] // 2)
    return out


def checked_rounds(settings: ProgressiveSettings) -> list[int]:
    steps = rounds(settings.start_steps, settings.final_steps)
    missing = sorted(set(settings.keep_steps) - set(steps))
    if missing:
        raise FewstepError(f"--keep-steps {missing} are not among the rounds {steps}; choose from those")
    return steps


def check_stage1(teacher: Model | None) -> Model:
    if teacher is None:
        raise FewstepError("--method progressive needs --teacher DIR: a stage-1 student made with --method guided "
                           "(e.g. models/digits-guided or models/emoji-guided)")
    cfg = teacher.config
    if cfg.kind != "diffusion" or not teacher.takes_guidance or not cfg.guidance_range:
        raise FewstepError(f"{teacher.path} is not a stage-1 student (its network does not take the guidance scale); "
                           f"progressive distillation starts from one: run `fewstep distill --method guided --teacher "
                           f"{teacher.path}` first (or use models/digits-guided, models/emoji-guided)")
    if cfg.serves_steps:
        raise FewstepError(f"{teacher.path} is a progressive student already; start from its stage-1 teacher "
                           f"{cfg.training.get('teacher', '')}".rstrip())
    return teacher


def round_dir(work: Path, steps: int) -> Path:
    return work / f"round-{steps:04d}"


def run_rounds(teacher: Model, steps: list[int], work: Path, first_solver: str, train_round: Callable,
               load: Callable, accelerator) -> dict[int, Model]:
    """Each round's student, trained from the previous one by ``train_round(teacher, folder, n, solver)``
    unless ``WORK/round-NNNN/student`` is finished already (then only loaded): the per-round resume."""
    current, done = teacher, {}
    for n in steps:
        folder = round_dir(work, n) / "student"
        if not (folder / CONFIG_NAME).exists():
            train_round(current, folder, n, first_solver if n == steps[0] else "ddim")
            accelerator.wait_for_everyone()
        current = done[n] = load(folder)
    return done


def student_config(stage1: ModelConfig, serves: list[int], schedule, training: dict) -> ModelConfig:
    """A progressive student's fewstep.json: DDIM on exactly the grids it was distilled for."""
    return replace(stage1, kind="diffusion", default_sampler="ddim", default_steps=max(serves), serves_steps=sorted(serves),
                   sampling_sigmas={str(n): [float(s) for s in schedule.grid(n)] for n in sorted(serves)},
                   training=training)


def ddim_scheduler(teacher: Model) -> dict:
    """A pipeline student's scheduler: DDIM on diffusers' trailing timesteps, final ᾱ = 1, which runs exactly
    the grid the student was distilled for (pixel students have none)."""
    if "scheduler_config" not in teacher.parts:      # a folder without a diffusers scheduler (a pixel model)
        return {}
    base = {k: v for k, v in teacher.parts["scheduler_config"].items() if not k.startswith("_")}
    return {"scheduler_config": {**base, "_class_name": "DDIMScheduler", "timestep_spacing": "trailing",
                                 "set_alpha_to_one": True, "clip_sample": False}}


def distill_progressive(data: ImageData, out: str | Path, config: TrainConfig, settings: ProgressiveSettings,
                        teacher: Model | None, command: str = "", accelerator=None) -> Path | None:
    """Run the rounds (``config.max_steps`` optimizer steps each), resuming per round, and save the kept
    students at ``out``. ``teacher`` is a stage-1 student (``--method guided``)."""
    teacher = check_stage1(teacher)
    steps = checked_rounds(settings)
    run = Run(config, command, accelerator)
    tensors = teacher.training_data(data)
    condition = teacher.conditioner.training_condition(settings.label_dropout)
    guidance = tuple(teacher.config.guidance_range)
    schedule = teacher.schedule

    def train_round(current: Model, folder: Path, n: int, solver: str) -> None:
        den = current.to(run.device).denoiser
        torch.manual_seed(config.seed + n)
        student = copy.deepcopy(den).requires_grad_(True).train()     # Salimans & Ho: init from the teacher
        objective = ProgressiveLoss(den, schedule.grid(2 * n), condition, guidance, solver)
        result = run.fit(student, objective, tensors, {**asdict(settings), "student_steps": n,
                                                       "teacher": str(current.path), "dataset": data.name},
                         out_dir=str(folder.parent))
        if result is not None:
            record = run.record("progressive", result, current.path, student_steps=n, teacher_steps=2 * n,
                                teacher_solver=solver)
            save_model(folder, current.derive(net=unwrap(result.ema).net, **ddim_scheduler(teacher),
                                              config=student_config(teacher.config, [n], schedule, record)))

    done = run_rounds(teacher, steps, Path(config.out_dir), settings.first_solver, train_round,
                      lambda folder: load_model(folder, run.device), run.accelerator)
    if not run.is_main:
        return None
    kept = {n: done[n] for n in settings.keep_steps}
    top = max(kept)
    training = total_record(command, teacher.path, settings, {str(n): m.config.training for n, m in done.items()})
    return save_model(out, kept[top].derive(config=student_config(teacher.config, list(kept), schedule, training)),
                      _readme(Path(out), kept, teacher, command), students={n: m for n, m in kept.items() if n != top})


def total_record(command: str, teacher_path, settings: ProgressiveSettings, rounds_record: dict[str, dict]) -> dict:
    """What the shipped folder records: the command, the settings and every round's record, with the total cost."""
    return {"command": command, "method": "progressive", "teacher": str(teacher_path), "settings": asdict(settings),
            "rounds": rounds_record, "wall_seconds": round(sum(r.get("wall_seconds", 0) for r in rounds_record.values()), 1),
            "threads": max((r.get("threads", 1) for r in rounds_record.values()), default=1)}


def round_record(command: str, n: int, solver: str, result, teacher_path, config: TrainConfig) -> dict:
    """What a round's student folder records of its training."""
    return {"command": command, "method": "progressive", "student_steps": n, "teacher_steps": 2 * n,
            "teacher_solver": solver, "steps": result.step, "final_loss": result.last_loss,
            "wall_seconds": round(result.seconds, 1), "threads": torch.get_num_threads(), "teacher": str(teacher_path),
            "config": asdict(config)}


def _readme(out: Path, students: dict[int, Model], teacher: Model, command: str) -> str:
    top = max(students)
    what = (f"Progressive distillation (Salimans & Ho 2022; Meng et al. 2023 stage 2) of the guidance-conditioned "
            f"`{teacher.path}`: each round's student does in one DDIM step what its teacher does in two. This folder "
            f"is the {top}-step student; the others are complete folders under `students/N/` "
            f"({', '.join(str(n) for n in sorted(students, reverse=True) if n != top) or 'none'}). The guidance scale "
            f"is still an input: one network evaluation per step.")
    if teacher.diffusers_pipeline:
        cls = teacher.diffusers_pipeline
        usage = (f"```python\nfrom diffusers import {cls}\npipe = {cls}.from_pretrained("
                 f"'{out}')\nimage = pipe('grinning face', num_inference_steps={top}, guidance_scale=3.0, height=32, "
                 f"width=32).images[0]\n```\n\n```\nfewstep sample --model {out} --prompt 'red apple' --steps {top}\n```")
    else:
        usage = (f"```\nfewstep sample --model {out} --steps 2 --guidance-scale 3 --label 3 --out grid.png\n"
                 f"fewstep sample --model {out} --steps {top} --sampler ddim-stochastic --label 3 --out grid.png\n```")
    return readme(out.name, what, usage, command)


def _recipe(teacher: Model | None, data: ImageData, out: str | Path, config: TrainConfig,
            settings: ProgressiveSettings, command: str) -> Path | None:
    return distill_progressive(data, out, config, settings, teacher, command=command)


register(Method("progressive", "progressive distillation, stage 2 (Meng et al. 2023; Salimans & Ho 2022): halve the "
                "DDIM steps each round", ProgressiveSettings, _recipe,
                teacher="models/digits-guided or models/emoji-guided", check=lambda teacher, _: check_stage1(teacher),
                options=("consistency", "guided"), family="guided distillation (pixel or latent)"))
