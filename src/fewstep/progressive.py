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

A run is resumable per round: ``WORK/round-NNNN/student`` is the finished student of the N-step round
(a model folder, written atomically); a finished round is loaded, never redone, and a round cut short
resumes from its own trainer checkpoints in ``WORK/round-NNNN/checkpoints``. The shipped folder holds
the kept students: its own ``unet/`` is the one of ``default_steps`` (the largest kept), the others are
complete model folders under ``students/N/``; ``serves_steps`` lists them all and
:func:`serving_model` picks the right one for a step count (or says clearly which counts exist).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from .atomic import atomic_path
from .data import ImageData
from .denoisers import append_dims
from .errors import FewstepError
from .guided import check_teacher, guidance_range
from .models import CONFIG_NAME, LoadedModel, ModelConfig, load_model, save_model
from .objectives import drop_labels, unwrap
from .schedules import EDMSchedule
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
    teacher's 2N-step σ grid (2N + 1 levels ending in 0).
    """

    def __init__(self, teacher: nn.Module, grid: Tensor, null_label: int | None, guidance: tuple[float, float],
                 label_dropout: float = 0.1, solver: str = "ddim") -> None:
        if solver not in ("ddim", "heun"):
            raise FewstepError(f"unknown teacher solver {solver!r}; use ddim or heun")
        if (len(grid) - 1) % 2:
            raise ValueError(f"the teacher grid must have an even number of steps, got {len(grid) - 1}")
        self.teacher = teacher
        self.grid = grid.float()
        self.null_label = null_label
        self.guidance = guidance
        self.label_dropout = label_dropout
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
        cond = {"guidance_scale": lo + (hi - lo) * torch.rand(len(x0), device=x0.device)}
        if self.null_label is not None:
            cond["class_labels"] = drop_labels(batch["labels"], self.null_label, self.label_dropout)
        x = x0 + append_dims(sigmas[0], x0.ndim) * torch.randn_like(x0)
        target = self.target(x, sigmas, cond)
        out = model(x, sigmas[0], **cond)
        c_out = unwrap(model).scalings(sigmas[0])[1]
        loss = ((out.float() - target.float()) / append_dims(c_out.float(), x0.ndim)).square().mean()
        return loss, {"student_steps": self.student_steps}


# --- the rounds -----------------------------------------------------------------------------------
def round_dir(work: Path, steps: int) -> Path:
    return work / f"round-{steps:04d}"


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
    steps = rounds(settings.start_steps, settings.final_steps)
    missing = sorted(set(settings.keep_steps) - set(steps))
    if missing:
        raise FewstepError(f"--keep-steps {missing} are not among the rounds {steps}; choose from those")
    accelerator = accelerator or Accelerator(mixed_precision=config.mixed_precision)
    schedule = EDMSchedule(**teacher.config.schedule)
    work = Path(config.out_dir)
    current, done = teacher, {}
    for n in steps:
        folder = round_dir(work, n) / "student"
        if not (folder / CONFIG_NAME).exists():
            solver = settings.first_solver if n == steps[0] else "ddim"
            _train_round(current, folder, n, data, schedule, config, settings, accelerator, command, solver)
            accelerator.wait_for_everyone()
        current = load_model(folder, accelerator.device)
        done[n] = current
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
    objective = ProgressiveLoss(teacher.denoiser, schedule.grid(2 * n), teacher.config.null_label,
                                guidance_range(teacher.config), settings.label_dropout, solver)
    cfg = replace(config, out_dir=str(folder.parent),
                  extra={**asdict(settings), "student_steps": n, "teacher": str(teacher.path), "dataset": data.name})
    result = train(student, objective, {"images": data.images, "labels": data.labels}, cfg, accelerator)
    if PartialState().is_main_process:
        record = {"command": command, "method": "progressive", "student_steps": n, "teacher_steps": 2 * n,
                  "teacher_solver": solver,
                  "steps": result.step, "final_loss": result.last_loss, "wall_seconds": round(result.seconds, 1),
                  "threads": torch.get_num_threads(), "teacher": str(teacher.path), "config": asdict(cfg)}
        save_model(folder, unwrap(result.ema).net, student_config(teacher.config, [n], schedule, record))


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
    rounds_record = rounds_record or {str(n): m.config.training for n, m in students.items()}
    training = {"command": command, "method": "progressive", "teacher": str(teacher.path), "settings": asdict(settings),
                "rounds": rounds_record,
                "wall_seconds": round(sum(r.get("wall_seconds", 0) for r in rounds_record.values()), 1),
                "threads": max((r.get("threads", 1) for r in rounds_record.values()), default=1)}
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, directory=True) as tmp:
        for n, m in students.items():
            if n != default:
                save_model(tmp / "students" / str(n), unwrap(m.denoiser).net, m.config)
        save_model(tmp / "top", unwrap(students[default].denoiser).net,
                   student_config(teacher.config, list(students), schedule, training),
                   _readme(out, students, teacher, command))
        for item in (tmp / "top").iterdir():
            item.rename(tmp / item.name)
        (tmp / "top").rmdir()
    return out


def serving_model(model: LoadedModel, steps: int) -> LoadedModel:
    """The model that serves ``steps``: itself unless it is a progressive student folder, whose students each
    serve one step count (``students/N/``). A count no student was distilled for is a clear error."""
    serves = model.config.serves_steps
    if not serves:
        return model
    if steps not in serves:
        raise FewstepError(f"{model.path} is a progressive student distilled for {', '.join(map(str, serves))} "
                           f"step(s); use --steps {' or '.join(map(str, serves))} (for other counts sample its "
                           f"stage-1 teacher {model.config.training.get('teacher', '')})".rstrip())
    if steps == model.config.default_steps:
        return model
    sub = model.path / "students" / str(steps)
    device = next(model.denoiser.parameters()).device
    return load_model(sub, device)


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
