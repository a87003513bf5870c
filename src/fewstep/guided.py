"""Guided-diffusion distillation, stage 1 (Meng et al. 2023, *On Distillation of Guided Diffusion
Models*, arXiv 2210.03142, §3.1): one student conditioned on the guidance weight w matches the
teacher's classifier-free-guided output for every w in [w_min, w_max], so a guided sample costs one
network evaluation per step instead of two.

The student. A w-conditioned backbone (:class:`GuidedUNet`) wraps the teacher's UNet and adds
``cond_proj(get_guidance_scale_embedding(w))`` to the UNet's sinusoidal timestep features, right
before its time-embedding MLP. That is exactly what diffusers' ``TimestepEmbedding`` does with
``cond_proj_dim`` / ``timestep_cond`` in the LCM UNets (DESIGN.md §2), so a ``UNet2DConditionModel``
built with ``time_cond_proj_dim`` needs no wrapper projection at all: :class:`GuidedUNet` then
passes the embedding as ``timestep_cond`` (the latent/VP students of the LCM family). Meng et al.
say only that w is "an input of the student"; where it enters and how it is initialised is our
choice (no official code exists): ``cond_proj`` is zero-initialised, so the student starts as the
teacher's *conditional* denoiser D_c for every w, and stage 1 only has to learn the w-dependence.

Guidance scale s stays the user-facing quantity (diffusers' convention, s = 1: no guidance); the
network sees w = s − 1 (:func:`fewstep.guidance.lcm_w`, the one place of that conversion), and
denoisers take ``guidance_scale`` as a keyword like any other condition:
``denoiser(x, σ, class_labels=y, guidance_scale=s) -> x0``.

The loss (Meng et al. eq. 5 in x-space, w ~ U[w_min, w_max], their §3.1):

    E_{w, σ, x, ε} λ(σ) ‖ D_η(x + σε; σ, w) − D̂^w(x + σε; σ) ‖²,
    D̂^w = guide(D_c, D_u, 1 + w)  (the teacher's CFG, conditional + unconditional in one batch),

with EDM's λ(σ) = 1/c_out(σ)² = 1/σ² + 1/σ_d² (the "SNR + 1" weighting of Salimans & Ho 2022, §4, in
units of σ_d) and EDM's lognormal σ, the distribution the teacher was trained on.

Latent space (:func:`distill_guided_latent`; Meng et al. also distil Stable Diffusion in its latent space): the
same loss on an SD-format teacher's VAE latents, the condition a prompt embedding (the empty prompt as
the unconditional branch), t uniform on the teacher's 1000 steps and λ = 1/c_out² = 1/σ², i.e. the
ε-MSE the teacher was trained with. The student is the teacher's UNet rebuilt with diffusers' native
``time_cond_proj_dim`` (:func:`w_conditioned_unet`), so the saved folder is a plain
``StableDiffusionPipeline`` that diffusers runs in one pass per step.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .consistency_losses import ConditionFn, TeacherFn
from .data import ImageData
from .denoisers import EDMDenoiser, VPDenoiser, append_dims
from .errors import FewstepError
from .guidance import guidance_scale_embedding, label_cfg, lcm_w, prompt_cfg
from .models import LoadedModel, ModelConfig, save_model
from .objectives import drop_labels, unwrap
from .schedules import EDMSchedule, VPSchedule
from .sd import LatentModel
from .train import TrainConfig, train

GUIDANCE_WEIGHTS = "guidance_embedding.safetensors"  # beside diffusion_pytorch_model.safetensors in unet/


class GuidedUNet(nn.Module):
    """A diffusers UNet that takes the guidance scale as an input (see the module docstring).

    ``forward(sample, timestep, guidance_scale=s, **cond)``; without ``guidance_scale`` it is s = 1, the
    plain conditional denoiser (so code written for any denoiser, e.g. label inference, still works).
    For a UNet2DModel (no ``timestep_cond``)
    the projected w-features are added to the input of ``unet.time_embedding`` by a forward pre-hook
    that lives only for the duration of the call (no state kept between calls); a UNet built with
    ``time_cond_proj_dim`` gets the raw embedding as ``timestep_cond`` and this module has no weights.
    """

    def __init__(self, unet: nn.Module, embedding_dim: int = 256) -> None:
        super().__init__()
        self.unet = unet
        self.embedding_dim = embedding_dim
        native = getattr(getattr(unet, "config", None), "time_cond_proj_dim", None)
        self.native = native is not None
        if self.native:
            if native != embedding_dim:
                raise ValueError(f"the UNet's time_cond_proj_dim is {native}, not {embedding_dim}")
            self.cond_proj = None
        else:
            features = unet.time_embedding.linear_1.in_features  # the sinusoidal timestep features
            self.cond_proj = nn.Linear(embedding_dim, features, bias=False)
            nn.init.zeros_(self.cond_proj.weight)  # start as the teacher's conditional denoiser

    @property
    def config(self):
        return self.unet.config

    def forward(self, sample: Tensor, timestep: Tensor, guidance_scale: Tensor | float | None = None, **cond):
        if guidance_scale is None:
            guidance_scale = 1.0
        w = lcm_w(torch.as_tensor(guidance_scale, dtype=torch.float32, device=sample.device).reshape(-1))
        emb = guidance_scale_embedding(w.expand(sample.shape[0]), self.embedding_dim).to(sample.dtype)
        if self.native:
            return self.unet(sample, timestep, timestep_cond=emb, **cond)
        shift = self.cond_proj(emb)

        def add_w(module, args):
            return (args[0] + shift.to(args[0].dtype),) + tuple(args[1:])

        handle = self.unet.time_embedding.register_forward_pre_hook(add_w)
        try:
            return self.unet(sample, timestep, **cond)
        finally:
            handle.remove()

    # diffusers-style folder I/O, so models.save_model writes it inside its atomic folder
    def save_pretrained(self, path: str | Path, safe_serialization: bool = True) -> None:
        self.unet.save_pretrained(path, safe_serialization=True)
        if self.cond_proj is not None:
            save_file({"cond_proj.weight": self.cond_proj.weight.detach().contiguous()}, Path(path) / GUIDANCE_WEIGHTS)

    @classmethod
    def from_unet_folder(cls, unet: nn.Module, path: str | Path, embedding_dim: int) -> "GuidedUNet":
        """Wrap a UNet loaded from ``path`` and load the projection saved beside it (safetensors only)."""
        model = cls(unet, embedding_dim)
        if model.cond_proj is not None:
            file = Path(path) / GUIDANCE_WEIGHTS
            try:
                model.cond_proj.load_state_dict({"weight": load_file(file)["cond_proj.weight"]})
            except Exception as e:  # missing file, wrong shape, corrupt safetensors
                raise FewstepError(f"cannot load the guidance embedding {file} (missing or corrupt): "
                                   f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
        return model


def w_conditioned_unet(teacher_unet: nn.Module, embedding_dim: int = 256) -> nn.Module:
    """A ``UNet2DConditionModel`` teacher's UNet with a native ψ(w) input: built from its config with
    ``time_cond_proj_dim`` and loaded with its weights (diffusers' ``train_lcm_distill_sd_wds.py``). The new
    projection is zero-initialised (our choice; the script leaves it random) so the student starts as the
    teacher's conditional ε-prediction for every w. The student of LCD and of latent guided distillation."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config({**teacher_unet.config, "time_cond_proj_dim": embedding_dim})
    missing, unexpected = unet.load_state_dict(teacher_unet.state_dict(), strict=False)
    if unexpected or any(not k.startswith("time_embedding.cond_proj") for k in missing):
        raise FewstepError(f"the teacher's UNet does not fit the student built from its config "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    nn.init.zeros_(unet.time_embedding.cond_proj.weight)
    return unet


# --- sampling-side helpers (used by fewstep.sampling.conditioned) ---------------------------------
def guidance_range(config: ModelConfig) -> tuple[float, float]:
    g = config.guidance_embedding
    return float(g["min_guidance_scale"]), float(g["max_guidance_scale"])


def check_trained_range(trained: tuple[float, float], guidance_scale: float, path: Path | str = "the model") -> None:
    """A w-conditioned student has only seen s in its trained range; outside it the embedding is
    extrapolated, so refuse (DESIGN.md §3: a guidance scale out of range is bad input)."""
    lo, hi = trained
    if not lo - 1e-6 <= guidance_scale <= hi + 1e-6:
        raise FewstepError(f"{path} was distilled for guidance scales {lo:g}..{hi:g}; got {guidance_scale:g}. "
                           f"Choose --guidance-scale within that range")


def w_conditioned(model: LoadedModel, labels: Tensor | None, guidance_scale: float) -> tuple[nn.Module, dict]:
    """The denoiser and ``extra_args`` of a w-conditioned student: one pass, s as an input."""
    check_trained_range(guidance_range(model.config), guidance_scale, model.path)
    if labels is None:
        raise FewstepError(f"{model.path} is a guided (class-conditional) student; give labels")
    s = torch.full(labels.shape, float(guidance_scale), device=labels.device)
    return model.denoiser, {"class_labels": labels, "guidance_scale": s}


# --- stage 1: the loss ----------------------------------------------------------------------------
@dataclass
class GuidedSettings:
    """Stage-1 settings (recorded in the model folder)."""

    min_guidance_scale: float = 1.0   # s range of w ~ U[w_min, w_max]; Meng et al. use w ∈ [0, 4] on ImageNet 64,
    max_guidance_scale: float = 4.0   # here s ∈ [1, 4] spans no guidance to well past the teacher's best (2)
    embedding_dim: int = 256          # width of get_guidance_scale_embedding (SD-LCM's time_cond_proj_dim)
    label_dropout: float = 0.1        # null labels, so the student also keeps the unconditional denoiser (editing)


class GuidedDistillationLoss:
    """Meng et al. 2023 stage-1 loss (module docstring) for :func:`fewstep.train.train`.

    ``condition`` maps a batch to the student's conditioning (class labels or prompt embeddings, some
    dropped to the unconditional input); ``teacher`` maps that conditioning plus per-sample
    ``guidance_scale`` to ``(denoiser, extra_args)`` of its CFG output (:func:`fewstep.guidance.label_cfg`,
    :func:`fewstep.guidance.prompt_cfg`). The student is a denoiser that takes ``guidance_scale``; the
    weighting λ(σ) = 1/c_out(σ)² is its own parameterization's: EDM's F-space loss, or ε-MSE for a VP
    ε-prediction UNet (c_out = −σ).
    """

    def __init__(self, teacher: TeacherFn, schedule: EDMSchedule | VPSchedule, condition: ConditionFn,
                 settings: GuidedSettings) -> None:
        self.teacher = teacher
        self.schedule = schedule
        self.condition = condition
        self.settings = settings

    def sample_guidance(self, n: int, device) -> Tensor:
        """s = 1 + w, w ~ U[w_min, w_max] (Meng et al. §3.1)."""
        lo, hi = self.settings.min_guidance_scale, self.settings.max_guidance_scale
        return lo + (hi - lo) * torch.rand(n, device=device)

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        x0 = batch["images"]
        cond = {**self.condition(batch), "guidance_scale": self.sample_guidance(len(x0), x0.device)}
        sigma = self.schedule.sample_sigmas(len(x0)).to(x0.device, x0.dtype)
        x = x0 + append_dims(sigma, x0.ndim) * torch.randn_like(x0)
        with torch.no_grad():
            den, extra = self.teacher(cond)
            target = den(x, sigma, **extra)
        out = model(x, sigma, **cond)
        c_out = unwrap(model).scalings(sigma)[1]
        loss = ((out.float() - target.float()) / append_dims(c_out.float(), x0.ndim)).square().mean()
        return loss, {}


def label_condition(null_label: int, dropout: float) -> ConditionFn:
    """batch → ``class_labels``, a share ``dropout`` of them the null label (the student keeps D_u)."""
    return lambda batch: {"class_labels": drop_labels(batch["labels"], null_label, dropout)}


def prompt_condition(empty: Tensor, dropout: float) -> ConditionFn:
    """batch → the cached prompt embeddings, a share ``dropout`` of them the empty prompt's."""
    def condition(batch: dict[str, Tensor]) -> dict[str, Tensor]:
        c = batch["prompt_embeds"]
        drop = torch.rand(len(c), device=c.device) < dropout
        return {"encoder_hidden_states": torch.where(append_dims(drop, c.ndim), empty.to(c), c)}
    return condition


def guided_student(teacher: LoadedModel, embedding_dim: int) -> EDMDenoiser:
    """A copy of the teacher's UNet with a zero-initialised w-embedding, behind the teacher's preconditioning."""
    unet = copy.deepcopy(teacher.denoiser.net)
    if isinstance(unet, GuidedUNet):
        raise FewstepError(f"{teacher.path} is already guidance-conditioned; stage 1 needs the CFG teacher "
                           f"(e.g. models/digits-teacher)")
    return EDMDenoiser(GuidedUNet(unet, embedding_dim).requires_grad_(True).train(),
                       sigma_data=teacher.denoiser.sigma_data)


def check_teacher(teacher: LoadedModel | None, data: ImageData, method: str) -> LoadedModel:
    if teacher is None:
        raise FewstepError(f"--method {method} needs --teacher DIR (e.g. models/digits-teacher)")
    cfg = teacher.config
    if cfg.kind != "diffusion" or cfg.parameterization != "edm":
        raise FewstepError(f"{teacher.path} is a {cfg.kind} model ({cfg.parameterization}); --method {method} "
                           f"needs an EDM diffusion teacher such as models/digits-teacher")
    if not cfg.class_names:
        raise FewstepError(f"{teacher.path} is unconditional; guided distillation needs a class-conditional "
                           f"teacher trained with label dropout (classifier-free guidance)")
    if (cfg.image_size, cfg.channels, cfg.num_classes) != (data.image_size, data.channels, data.num_classes):
        raise FewstepError(f"teacher {teacher.path} is {cfg.channels}×{cfg.image_size}² with {cfg.num_classes} "
                           f"classes but the data is {data.channels}×{data.image_size}² with {data.num_classes}: "
                           f"use the teacher's data set")
    return teacher


def distill_guided(data: ImageData, out: str | Path, config: TrainConfig, settings: GuidedSettings,
                   teacher: LoadedModel | None, command: str = "", accelerator=None) -> Path | None:
    """Stage 1: train a w-conditioned student on the teacher's CFG output and save it at ``out`` (EMA
    weights). It samples like its teacher (DPM-Solver++, 50 steps) at half the network evaluations."""
    check_range(settings)
    from accelerate import Accelerator
    from accelerate.state import PartialState

    accelerator = accelerator or Accelerator(mixed_precision=config.mixed_precision)
    teacher = check_teacher(teacher, data, "guided")
    teacher.denoiser.requires_grad_(False).eval().to(accelerator.device)
    schedule = EDMSchedule(**teacher.config.schedule)
    torch.manual_seed(config.seed)
    student = guided_student(teacher, settings.embedding_dim)
    null = teacher.config.null_label
    objective = GuidedDistillationLoss(label_cfg(teacher.denoiser, null), schedule,
                                       label_condition(null, settings.label_dropout), settings)
    config = replace(config, extra={**asdict(settings), "dataset": data.name})
    result = train(student, objective, {"images": data.images, "labels": data.labels}, config, accelerator)
    if not PartialState().is_main_process:
        return None
    tcfg = teacher.config
    model_config = replace(
        tcfg, kind="diffusion", default_guidance_scale=min(max(tcfg.default_guidance_scale, settings.min_guidance_scale),
                                                           settings.max_guidance_scale),
        sampling_sigmas={}, guidance_embedding=embedding_record(settings),
        training=training_record(command, result, teacher.path, student, config))
    readme = (f"# {Path(out).name}\n\nStage 1 of guided distillation (Meng et al. 2023): a copy of `{teacher.path}` "
              f"that takes the guidance scale s ∈ [{settings.min_guidance_scale:g}, {settings.max_guidance_scale:g}] as an "
              f"input (w = s − 1 through diffusers' guidance-scale embedding, added to the timestep features) and "
              f"matches the teacher's classifier-free-guided output in ONE network evaluation per step. EMA weights "
              f"after {result.step} steps.\n\n```\nfewstep sample --model {out} --guidance-scale 3 --label 3 --out grid.png\n```\n\n"
              f"Trained with:\n\n```\n{command}\n```\n")
    return save_model(out, unwrap(result.ema).net, model_config, readme)


def embedding_record(settings: GuidedSettings) -> dict:
    """What ``fewstep.json`` records of the w-embedding (read back by :func:`fewstep.models.load_model`)."""
    return {"embedding_dim": settings.embedding_dim, "min_guidance_scale": settings.min_guidance_scale,
            "max_guidance_scale": settings.max_guidance_scale, "weights": f"unet/{GUIDANCE_WEIGHTS}"}


def check_range(settings: GuidedSettings) -> None:
    if not settings.min_guidance_scale <= settings.max_guidance_scale or settings.min_guidance_scale < 0:
        raise FewstepError(f"guidance range {settings.min_guidance_scale:g}..{settings.max_guidance_scale:g} is "
                           f"empty or negative; give --min-guidance-scale <= --max-guidance-scale, both >= 0")


def training_record(command: str, result, teacher_path, student: nn.Module, config: TrainConfig) -> dict:
    return {"command": command, "method": "guided", "steps": result.step, "final_loss": result.last_loss,
            "wall_seconds": round(result.seconds, 1), "threads": torch.get_num_threads(), "teacher": str(teacher_path),
            "parameters": sum(p.numel() for p in student.parameters()), "config": asdict(config)}


def check_latent_teacher(teacher: LatentModel) -> LatentModel:
    if teacher.takes_guidance:
        raise FewstepError(f"{teacher.path} already takes the guidance scale as an input; stage 1 distils a "
                           f"classifier-free-guided teacher such as models/emoji-sd")
    return teacher


def distill_guided_latent(teacher: LatentModel, data: ImageData, out: str | Path, config: TrainConfig,
                          settings: GuidedSettings, command: str = "", accelerator=None) -> Path | None:
    """Stage 1 on a Stable-Diffusion-style teacher (text-conditioned, in latent space). The student is the
    teacher's UNet with a native ψ(w) input (:func:`w_conditioned_unet`: ``time_cond_proj_dim``, as LCD's
    student), trained on the teacher's CFG against the empty prompt (:func:`fewstep.guidance.prompt_cfg`)
    with ε-MSE, t uniform as the teacher was trained. Saved as a ``StableDiffusionPipeline`` folder with the
    teacher's scheduler: diffusers runs it unchanged, since with ``time_cond_proj_dim`` set that pipeline
    feeds ψ(s − 1) as ``timestep_cond`` and skips its own CFG (one UNet pass per step)."""
    check_range(settings)
    from accelerate import Accelerator
    from accelerate.state import PartialState

    from .lcm import latent_training_data
    from .sd import save_pipeline

    check_latent_teacher(teacher)
    accelerator = accelerator or Accelerator(mixed_precision=config.mixed_precision)
    tensors = latent_training_data(teacher, data)
    torch.manual_seed(config.seed)
    teacher.to(accelerator.device)
    teacher.unet.requires_grad_(False).eval()
    empty = teacher.encode_prompts([""])[0]
    unet = w_conditioned_unet(teacher.unet, settings.embedding_dim).requires_grad_(True).train()
    student = VPDenoiser(GuidedUNet(unet, settings.embedding_dim), teacher.schedule, teacher.prediction_type)
    objective = GuidedDistillationLoss(prompt_cfg(teacher.denoiser, empty), teacher.schedule,
                                       prompt_condition(empty, settings.label_dropout), settings)
    config = replace(config, extra={**asdict(settings), "dataset": data.name})
    result = train(student, objective, tensors, config, accelerator)
    if not PartialState().is_main_process:
        return None
    lo, hi = settings.min_guidance_scale, settings.max_guidance_scale
    info = {"kind": "guided", "dataset": data.name, "class_names": data.class_names,
            "default_sampler": teacher.default_sampler, "default_steps": teacher.default_steps,
            "default_guidance_scale": min(max(teacher.default_guidance_scale, lo), hi), "guidance_range": [lo, hi],
            "training": training_record(command, result, teacher.path, student, config)}
    readme = (f"# {Path(out).name}\n\nStage 1 of guided distillation (Meng et al. 2023) of `{teacher.path}`: its UNet "
              f"takes the guidance scale s ∈ [{lo:g}, {hi:g}] as an input (w = s − 1 through diffusers' guidance-scale "
              f"embedding, `time_cond_proj_dim`) and matches the teacher's classifier-free-guided output in ONE UNet "
              f"pass per step. Runs in diffusers:\n\n```python\nfrom diffusers import StableDiffusionPipeline\n"
              f"pipe = StableDiffusionPipeline.from_pretrained('{out}')\n"
              f"image = pipe('grinning face', num_inference_steps=25, guidance_scale=3.0, height=32, width=32).images[0]\n"
              f"```\n\nTrained with:\n\n```\n{command}\n```\n")
    return save_pipeline(out, unwrap(result.ema).net.unet, teacher.vae, teacher.text_encoder, teacher.tokenizer, info,
                         scheduler=teacher.scheduler_config.get("_class_name", "DDIMScheduler"),
                         scheduler_config=teacher.scheduler_config, readme=readme)
