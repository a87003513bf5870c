"""Guided-diffusion distillation, stage 2: progressive distillation of the w-conditioned student
(Meng et al. 2023 §3.2, after Salimans & Ho 2022, *Progressive Distillation for Fast Sampling of
Diffusion Models*, arXiv 2202.00512, Algorithm 2).

Each round a student initialised from its teacher learns to do in ONE DDIM step what the teacher does
in TWO, so the step count halves every round (e.g. 16 → 8 → 4 → 2 → 1 from the stage-1 student run at
32 steps); the guidance scale stays an input throughout (w ~ U[w_min, w_max] every batch, Meng et al.).

Everything is in EDM σ space (x = x0 + σε) with the one DDIM step :func:`fewstep.solvers.ddim_step`.
The student's N-step grid is the EDM grid :meth:`EDMSchedule.grid`(N); the teacher's 2N-step grid
contains it as every other level (ρ-spaced levels of a ramp i/2N at even i are the ramp j/N), so the
student step σ_i → σ_{i+1} is the teacher's two steps σ_{2i} → σ_{2i+1} → σ_{2i+2} of grid(2N).

The target (Salimans & Ho, Algorithm 2; google-research ``diffusion_distillation/dpm.py``,
``training_losses``) is the x̃ for which one student DDIM step from x_t lands exactly where the
teacher's two steps land, x'' — the inverse of ``ddim_step`` in its ``denoised`` argument:

    x'' = x̃ + σ''·(x_t − x̃)/σ   ⇒   x̃ = (x'' − (σ''/σ)·x_t) / (1 − σ''/σ),   x̃ = x'' when σ'' = 0

(their ``(z_teacher − stdv_frac·z)/(a_s − stdv_frac·a_t)`` with α = 1 in σ space). Points x_t are
the data noised to a level of the student's grid, chosen uniformly (their discrete-time training).
The loss weight is EDM's λ(σ) = 1/c_out(σ)², as in stage 1 (:mod:`fewstep.guided`; the "SNR + 1"
weighting of Salimans & Ho §4 in units of σ_d; their reference configs use max(SNR, 1), which differs
from it only below σ ≈ σ_d).

Latent space (:func:`distill_progressive_latent`): the same rounds on a Stable-Diffusion-style stage-1
student (:func:`fewstep.guided.distill_guided_latent`), in σ space of its VP schedule, prompts as the
condition; the N-step grid is diffusers' "trailing" DDIM timesteps (the levels of the 2N-step grid at
even indices, as above), so every student is a ``StableDiffusionPipeline`` whose DDIMScheduler takes
exactly its steps.

A run is resumable per round: ``WORK/round-NNNN/student`` is the finished student of the N-step round
(a model folder, written atomically); a finished round is loaded, never redone, and a round cut short
resumes from its own trainer checkpoints in ``WORK/round-NNNN/checkpoints``. The shipped folder holds
the kept students: its own ``unet/`` is the one of ``default_steps`` (the largest kept), the others are
complete model folders under ``students/N/``; ``serves_steps`` lists them all and
:func:`serving_model` picks the right one for a step count (or says clearly which counts exist).
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from .atomic import atomic_path
from .data import ImageData
from .denoisers import append_dims
from .errors import FewstepError
from .consistency_losses import ConditionFn
from .guided import check_teacher, guidance_range, label_condition
from .models import CONFIG_NAME, LoadedModel, ModelConfig, load_model, save_model
from .objectives import unwrap
from .schedules import EDMSchedule
from .sd import LatentModel
from .solvers import ddim_step, heun_step
from .train import TrainConfig, train


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


def _checked_rounds(settings: ProgressiveSettings) -> list[int]:
    steps = rounds(settings.start_steps, settings.final_steps)
    missing = sorted(set(settings.keep_steps) - set(steps))
    if missing:
        raise FewstepError(f"--keep-steps {missing} are not among the rounds {steps}; choose from those")
    return steps


def ddim_target(x: Tensor, x_next: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """The denoised x̃ with ``ddim_step(x, x̃, σ, σ') == x_next`` (Salimans & Ho 2022, Algorithm 2's
    x̃ in σ space; see the module docstring). ``sigma``/``sigma_next`` are per-sample [B] tensors."""
    ratio = append_dims(sigma_next / sigma, x.ndim)
    return (x_next - ratio * x) / (1 - ratio)


def teacher_two_steps(teacher: nn.Module, x: Tensor, sigmas: tuple[Tensor, Tensor, Tensor], cond: dict,
                      solver: str = "ddim") -> Tensor:
    """Two steps of ``teacher`` from σ_{2i} through σ_{2i+1} to σ_{2i+2} (per-sample levels): DDIM, or
    Heun (:func:`fewstep.solvers.heun_step`) for a first teacher that is a diffusion model."""
    s0, s1, s2 = sigmas
    if solver == "heun":
        x1 = _heun(teacher, x, teacher(x, s0, **cond), s0, s1, cond)
        return _heun(teacher, x1, teacher(x1, s1, **cond), s1, s2, cond)
    x1 = ddim_step(x, teacher(x, s0, **cond), s0, s1)
    return ddim_step(x1, teacher(x1, s1, **cond), s1, s2)


def _heun(teacher: nn.Module, x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor, cond: dict) -> Tensor:
    """:func:`fewstep.solvers.heun_step` for per-sample levels: samples whose step ends at σ' = 0 take the
    Euler (= DDIM) step, as Heun does there, and the model is never evaluated at σ = 0."""
    euler = ddim_step(x, denoised, sigma, sigma_next)
    last = sigma_next == 0
    if last.all():
        return euler
    heun = heun_step(teacher, x, denoised, sigma, torch.where(last, sigma, sigma_next), cond)
    return torch.where(append_dims(last, x.ndim), euler, heun)


class ProgressiveLoss:
    """One round of progressive distillation for :func:`fewstep.train.train` (module docstring).

    ``teacher`` and the trained student are denoisers that take ``guidance_scale``; ``grid`` is the
    teacher's 2N-step σ grid (2N + 1 levels ending in 0); ``condition`` maps a batch to the conditioning
    both see (:func:`fewstep.guided.label_condition`, :func:`fewstep.guided.prompt_condition`: some of it
    dropped to the unconditional input).
    """

    def __init__(self, teacher: nn.Module, grid: Tensor, condition: ConditionFn, guidance: tuple[float, float],
                 solver: str = "ddim") -> None:
        if solver not in ("ddim", "heun"):
            raise FewstepError(f"unknown teacher solver {solver!r}; use ddim or heun")
        if (len(grid) - 1) % 2:
            raise ValueError(f"the teacher grid must have an even number of steps, got {len(grid) - 1}")
        self.teacher = teacher
        self.grid = grid.float()
        self.condition = condition
        self.guidance = guidance
        self.solver = solver

    @property
    def student_steps(self) -> int:
        return (len(self.grid) - 1) // 2

    def levels(self, n: int, device) -> tuple[Tensor, Tensor, Tensor]:
        """(σ_{2i}, σ_{2i+1}, σ_{2i+2}) for i ~ U{0 … N−1}: a student step and the teacher's two halves."""
        i = torch.randint(0, self.student_steps, (n,))
        grid = self.grid.to(device)
        return grid[2 * i], grid[2 * i + 1], grid[2 * i + 2]

    @torch.no_grad()
    def target(self, x: Tensor, sigmas: tuple[Tensor, Tensor, Tensor], cond: dict) -> Tensor:
        return ddim_target(x, teacher_two_steps(self.teacher, x, sigmas, cond, self.solver), sigmas[0], sigmas[2])

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        x0 = batch["images"]
        sigmas = tuple(s.to(x0.dtype) for s in self.levels(len(x0), x0.device))
        lo, hi = self.guidance
        cond = {**self.condition(batch), "guidance_scale": lo + (hi - lo) * torch.rand(len(x0), device=x0.device)}
        x = x0 + append_dims(sigmas[0], x0.ndim) * torch.randn_like(x0)
        target = self.target(x, sigmas, cond)
        out = model(x, sigmas[0], **cond)
        c_out = unwrap(model).scalings(sigmas[0])[1]
        loss = ((out.float() - target.float()) / append_dims(c_out.float(), x0.ndim)).square().mean()
        return loss, {"student_steps": self.student_steps}


# --- the rounds -----------------------------------------------------------------------------------
def round_dir(work: Path, steps: int) -> Path:
    return work / f"round-{steps:04d}"


def run_rounds(teacher, steps: list[int], work: Path, first_solver: str, train_round: Callable, load: Callable,
               accelerator) -> dict:
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


def distill_progressive(data: ImageData, out: str | Path, config: TrainConfig, settings: ProgressiveSettings,
                        teacher: LoadedModel | None, command: str = "", accelerator=None) -> Path | None:
    """Run the rounds (``config.max_steps`` optimizer steps each), resuming per round, and save the kept
    students at ``out``. ``teacher`` is a stage-1 student (``--method guided``)."""
    from accelerate import Accelerator
    from accelerate.state import PartialState

    if teacher is not None and not teacher.config.guidance_embedding:
        raise FewstepError(f"{teacher.path} does not take the guidance scale as an input; progressive distillation "
                           f"starts from a stage-1 student: run `fewstep distill --method guided` first "
                           f"(or use models/digits-guided)")
    teacher = check_teacher(teacher, data, "progressive")
    steps = _checked_rounds(settings)
    accelerator = accelerator or Accelerator(mixed_precision=config.mixed_precision)
    schedule = EDMSchedule(**teacher.config.schedule)

    def train_round(current: LoadedModel, folder: Path, n: int, solver: str) -> None:
        _train_round(current, folder, n, data, schedule, config, settings, accelerator, command, solver)

    done = run_rounds(teacher, steps, Path(config.out_dir), settings.first_solver, train_round,
                      lambda folder: load_model(folder, accelerator.device), accelerator)
    if not PartialState().is_main_process:
        return None
    return save_students(out, {n: done[n] for n in settings.keep_steps}, teacher, settings, command,
                         {str(n): m.config.training for n, m in done.items()})


def _train_round(teacher: LoadedModel, folder: Path, n: int, data: ImageData, schedule: EDMSchedule,
                 config: TrainConfig, settings: ProgressiveSettings, accelerator, command: str, solver: str) -> None:
    from accelerate.state import PartialState

    teacher.denoiser.requires_grad_(False).eval().to(accelerator.device)
    torch.manual_seed(config.seed + n)
    student = copy.deepcopy(teacher.denoiser).requires_grad_(True).train()  # Salimans & Ho: init from the teacher
    null = teacher.config.null_label
    condition = (lambda batch: {}) if null is None else label_condition(null, settings.label_dropout)
    objective = ProgressiveLoss(teacher.denoiser, schedule.grid(2 * n), condition, guidance_range(teacher.config), solver)
    cfg = replace(config, out_dir=str(folder.parent),
                  extra={**asdict(settings), "student_steps": n, "teacher": str(teacher.path), "dataset": data.name})
    result = train(student, objective, {"images": data.images, "labels": data.labels}, cfg, accelerator)
    if PartialState().is_main_process:
        save_model(folder, unwrap(result.ema).net,
                   student_config(teacher.config, [n], schedule, round_record(command, n, solver, result, teacher.path, cfg)))


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


def student_config(base: ModelConfig, serves: list[int], schedule: EDMSchedule, training: dict) -> ModelConfig:
    """A progressive student's fewstep.json: DDIM on exactly the grids it was distilled for."""
    return replace(base, kind="diffusion", default_sampler="ddim", default_steps=max(serves), serves_steps=sorted(serves),
                   sampling_sigmas={str(n): [round(float(s), 6) for s in schedule.grid(n)] for n in sorted(serves)},
                   training=training)


def save_students(out: str | Path, students: dict[int, LoadedModel], teacher: LoadedModel,
                  settings: ProgressiveSettings, command: str, rounds_record: dict[str, dict] | None = None) -> Path:
    """Write the shipped folder atomically: ``unet/`` = the default (largest) student, ``students/N/`` the others.
    ``rounds_record``: every round's training record (default: the kept students'), for the total cost."""
    out = Path(out)
    schedule = EDMSchedule(**teacher.config.schedule)
    default = max(students)
    training = total_record(command, teacher.path, settings,
                            rounds_record or {str(n): m.config.training for n, m in students.items()})

    def save_others(folder: Path) -> None:
        for n, m in students.items():
            if n != default:
                save_model(folder / str(n), unwrap(m.denoiser).net, m.config)

    return _write_shipped(out, save_others, lambda folder: save_model(
        folder, unwrap(students[default].denoiser).net, student_config(teacher.config, list(students), schedule, training),
        _readme(out, students, teacher, command)))


def _write_shipped(out: Path, save_others: Callable[[Path], None], save_top: Callable[[Path], None]) -> Path:
    """Write a shipped progressive folder atomically: ``save_top(folder)`` writes the default student (into a
    folder of its own, whose contents then move to the top level: the savers write whole folders) and
    ``save_others(folder)`` the other students under ``students/``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, directory=True) as tmp:
        save_others(tmp / "students")
        save_top(tmp / "top")
        for item in (tmp / "top").iterdir():
            item.rename(tmp / item.name)
        (tmp / "top").rmdir()
    return out


def serving_model(model: LoadedModel, steps: int) -> LoadedModel:
    """The model that serves ``steps``: itself unless it is a progressive student folder, whose students each
    serve one step count (``students/N/``). A count no student was distilled for is a clear error."""
    serves = model.config.serves_steps
    _check_serves(model.path, serves, steps, model.config.training.get("teacher", ""))
    if not serves or steps == model.config.default_steps:
        return model
    sub = model.path / "students" / str(steps)
    device = next(model.denoiser.parameters()).device
    return load_model(sub, device)


def _check_serves(path: Path, serves: list[int] | None, steps: int, teacher: str) -> None:
    if serves and steps not in serves:
        raise FewstepError(f"{path} is a progressive student distilled for {', '.join(map(str, serves))} step(s); use "
                           f"--steps {' or '.join(map(str, serves))} (for other counts sample its stage-1 teacher "
                           f"{teacher})".rstrip())


def _readme(out: Path, students: dict[int, LoadedModel], teacher: LoadedModel, command: str) -> str:
    lines = [f"# {out.name}\n",
             f"Progressive distillation (Salimans & Ho 2022; Meng et al. 2023 stage 2) of the guidance-conditioned "
             f"`{teacher.path}`: each round's student does in one DDIM step what its teacher does in two. This folder "
             f"holds the {', '.join(map(str, sorted(students, reverse=True)))}-step students (`unet/` is the "
             f"{max(students)}-step one, the others are model folders under `students/N/`); the guidance scale is still "
             f"an input (one network evaluation per step).\n",
             "```", f"fewstep sample --model {out} --steps 2 --guidance-scale 3 --label 3 --out grid.png",
             f"fewstep sample --model {out} --steps 4 --sampler ddim-stochastic --label 3 --out grid.png", "```\n",
             "Trained with:\n", "```", command, "```", ""]
    return "\n".join(lines)


# --- latent space: the stage-1 student of a Stable-Diffusion-style pipeline -------------------------
def check_latent_stage1(teacher: LatentModel) -> LatentModel:
    if teacher.is_lcm or not teacher.takes_guidance or "guidance_range" not in teacher.info:
        raise FewstepError(f"{teacher.path} is not a stage-1 student; progressive distillation starts from one: run "
                           f"`fewstep distill --method guided --teacher {teacher.path}` first (or use models/emoji-guided)")
    if teacher.info.get("serves_steps"):
        raise FewstepError(f"{teacher.path} is a progressive student already; start from its stage-1 teacher "
                           f"{teacher.info.get('training', {}).get('teacher', '')}".rstrip())
    return teacher


def distill_progressive_latent(teacher: LatentModel, data: ImageData, out: str | Path, config: TrainConfig,
                               settings: ProgressiveSettings, command: str = "", accelerator=None) -> Path | None:
    """The rounds on a latent stage-1 student (``--method guided`` of an SD-format teacher, e.g.
    ``models/emoji-guided``): its VAE latents, prompt conditioning with the empty prompt dropped in, and as
    the student's N-step grid diffusers' "trailing" timesteps of the teacher's schedule
    (:func:`fewstep.latent_sampling.latent_grid`: the 2N-step grid holds it as every other level). Each
    student is a ``StableDiffusionPipeline`` folder whose DDIMScheduler (trailing, final ᾱ = 1) takes exactly
    these steps in diffusers, one UNet pass each; ``out`` is laid out as the pixel-space folder."""
    from accelerate import Accelerator
    from accelerate.state import PartialState

    from .guided import prompt_condition
    from .latent_sampling import latent_grid
    from .lcm import latent_training_data
    from .sd import load_latent_model

    check_latent_stage1(teacher)
    steps = _checked_rounds(settings)
    accelerator = accelerator or Accelerator(mixed_precision=config.mixed_precision)
    tensors = latent_training_data(teacher, data)
    condition = prompt_condition(teacher.encode_prompts([""])[0], settings.label_dropout)
    guidance = tuple(teacher.info["guidance_range"])

    def train_round(current: LatentModel, folder: Path, n: int, solver: str) -> None:
        current.to(accelerator.device)
        den = current.denoiser.requires_grad_(False).eval()
        torch.manual_seed(config.seed + n)
        student = copy.deepcopy(den).requires_grad_(True).train()     # Salimans & Ho: init from the teacher
        objective = ProgressiveLoss(den, latent_grid(current, 2 * n), condition, guidance, solver)
        cfg = replace(config, out_dir=str(folder.parent),
                      extra={**asdict(settings), "student_steps": n, "teacher": str(current.path), "dataset": data.name})
        result = train(student, objective, tensors, cfg, accelerator)
        if PartialState().is_main_process:
            _save_latent_student(folder, unwrap(result.ema).net.unet, teacher, [n],
                                 round_record(command, n, solver, result, current.path, cfg))

    done = run_rounds(teacher, steps, Path(config.out_dir), settings.first_solver, train_round,
                      load_latent_model, accelerator)
    if not PartialState().is_main_process:
        return None
    kept = {n: done[n] for n in settings.keep_steps}
    training = total_record(command, teacher.path, settings, {str(n): m.info["training"] for n, m in done.items()})
    out = Path(out)

    def copy_others(folder: Path) -> None:   # each round's folder is a complete pipeline already
        for n, m in kept.items():
            if n != max(kept):
                shutil.copytree(m.path, folder / str(n))

    return _write_shipped(out, copy_others, lambda folder: _save_latent_student(
        folder, kept[max(kept)].unet, teacher, list(kept), training, _latent_readme(out, kept, teacher, command)))


def _save_latent_student(folder: Path, unet: nn.Module, teacher: LatentModel, serves: list[int], training: dict,
                         readme: str = "") -> Path:
    from .sd import save_pipeline

    info = {**{k: teacher.info[k] for k in ("dataset", "class_names", "guidance_range") if k in teacher.info},
            "kind": "guided", "default_sampler": "ddim", "default_steps": max(serves), "serves_steps": sorted(serves),
            "default_guidance_scale": teacher.default_guidance_scale, "training": training}
    scheduler = {**teacher.scheduler_config, "timestep_spacing": "trailing", "set_alpha_to_one": True,
                 "clip_sample": False}
    return save_pipeline(folder, unet, teacher.vae, teacher.text_encoder, teacher.tokenizer, info,
                         scheduler="DDIMScheduler", scheduler_config=scheduler, readme=readme)


def _latent_readme(out: Path, students: dict[int, LatentModel], teacher: LatentModel, command: str) -> str:
    top = max(students)
    return (f"# {out.name}\n\nProgressive distillation (Salimans & Ho 2022; Meng et al. 2023 stage 2) of the "
            f"guidance-conditioned `{teacher.path}`: each round's student does in one DDIM step what its teacher does "
            f"in two. This folder is the {top}-step student as a `StableDiffusionPipeline` (DDIMScheduler, trailing "
            f"timesteps); the others are pipeline folders under `students/N/` "
            f"({', '.join(str(n) for n in sorted(students, reverse=True) if n != top) or 'none'}). The guidance scale is "
            f"still an input: one UNet pass per step.\n\n```python\nfrom diffusers import StableDiffusionPipeline\n"
            f"pipe = StableDiffusionPipeline.from_pretrained('{out}')\n"
            f"image = pipe('grinning face', num_inference_steps={top}, guidance_scale=3.0, height=32, width=32).images[0]\n"
            f"```\n\n```\nfewstep sample --model {out} --prompt 'red apple' --steps {top}\n```\n\n"
            f"Trained with:\n\n```\n{command}\n```\n")


def serving_pipeline(model: LatentModel, steps: int) -> LatentModel:
    """:func:`serving_model` for a latent progressive folder: the pipeline under ``students/N/`` that was
    distilled for ``steps``."""
    from .sd import load_latent_model

    serves = model.info.get("serves_steps")
    _check_serves(model.path, serves, steps, model.info.get("training", {}).get("teacher", ""))
    if not serves or steps == model.default_steps:
        return model
    return load_latent_model(model.path / "students" / str(steps)).to(next(model.unet.parameters()).device)
