"""Latent consistency models (Luo et al. 2023, arXiv 2310.04378): the w-conditioned student, latent
consistency distillation (LCD) and fine-tuning (LCF), saved as a diffusers LCM pipeline.

The student is f_θ(z, c, w, t) = c_skip(t)·z_t + c_out(t)·ẑ_0(ε_θ(z_t, t, c, ψ(w)))   (eq. 9 + §4.2)
on a UNet2DConditionModel built from the teacher's config with ``time_cond_proj_dim`` set: the guidance
weight w = guidance_scale − 1 enters through diffusers' guidance-scale embedding ψ(w) as
``timestep_cond``, exactly as ``LatentConsistencyModelPipeline`` feeds it, so the saved folder runs
there unchanged. The scalings are :class:`fewstep.consistency.LCMConsistency` (one copy of the math).

LCD is :class:`fewstep.consistency_losses.ConsistencyLoss` with the "lcm" curriculum (skipping step
k on the 1000-step grid), the teacher's classifier-free-guided ODE at a per-sample guidance scale
s ~ U[s_min, s_max] (eq. 10–11: both branches in one batch), a one-step DDIM / DPM-Solver /
DPM-Solver++ teacher step (Algorithm 1) and a fixed EMA target (μ = 0.95, as diffusers'
``train_lcm_distill_sd_wds.py``). LCF (§4.5) is the same with no teacher: the pair is the data
noised to both levels with the same noise (CT in latent space).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from .consistency import LCMConsistency
from .consistency_losses import ConsistencyLoss, Curriculum
from .data import ImageData
from .denoisers import VPDenoiser
from .distances import get_distance
from .errors import FewstepError
from .guidance import prompt_cfg
from .guided import GuidedUNet, w_conditioned_unet
from .schedules import VPSchedule
from .sd import LatentModel, save_pipeline
from .train import TrainConfig, train

LCM_METHODS = ("lcd", "lcf", "lcm-lora")


@dataclass
class LCMSettings:
    """The method's own settings (recorded in the model folder)."""

    method: str = "lcd"                     # lcd (distil a teacher) | lcf (fine-tune an LCM on data, no teacher) |
                                            # lcm-lora (LCD training only LoRA weights; Luo et al. 2023b)
    skip: int = 20                          # k: teacher step t_{n+k} → t_n (Luo et al. §4.3; diffusers' default 20)
    solver: str = "ddim"                    # ddim | dpm-solver | dpm-solver++ (the teacher's one-step ψ)
    guidance_min: float = 2.0               # s ~ U[s_min, s_max] (w = s − 1; the paper's w ∈ [2, 14] for SD)
    guidance_max: float = 8.0
    distance: str = "l2"                    # l2 | pseudo-huber (as diffusers' --loss_type huber, with iCT's c)
    target_ema: float = 0.95                # μ of the target network (diffusers' --ema_decay), for lcm-lora too:
                                            # diffusers' LoRA script targets the online student (μ = 0), which
                                            # drifts away within a few hundred steps here (bench/lcm_lora_ablation.py)
    cond_proj_dim: int = 256                # width of ψ(w) (diffusers' --unet_time_cond_proj_dim)
    timestep_scaling: float = 10.0          # LCMScheduler's timestep_scaling in c_skip/c_out
    gradient_checkpointing: bool = False    # trade compute for memory on big UNets (GPU users)
    lora_rank: int = 8                      # lcm-lora: rank of the adapters (the paper's SD runs use 64)


class LCMStudent(nn.Module):
    """f_θ(x, σ, c, s) in σ space: ``model(x, sigma, encoder_hidden_states=c, guidance_scale=s)``; a UNet
    without ``time_cond_proj_dim`` (an LCM-LoRA student) takes no s (guidance, if any, is CFG around it)."""

    def __init__(self, unet: nn.Module, schedule: VPSchedule, prediction_type: str = "epsilon",
                 timestep_scaling: float = 10.0) -> None:
        super().__init__()
        dim = unet.config.time_cond_proj_dim
        net = GuidedUNet(unet, dim) if dim else unet
        self.consistency = LCMConsistency(VPDenoiser(net, schedule, prediction_type), timestep_scaling)

    @classmethod
    def of(cls, model: LatentModel) -> "LCMStudent":
        """The consistency function of a loaded LCM pipeline."""
        return cls(model.unet, model.schedule, model.prediction_type, model.scheduler_config.get("timestep_scaling", 10.0))

    @property
    def unet(self) -> nn.Module:
        net = self.consistency.denoiser.net
        return net.unet if isinstance(net, GuidedUNet) else net

    def forward(self, x: Tensor, sigma: Tensor, encoder_hidden_states: Tensor,
                guidance_scale: Tensor | float = 1.0) -> Tensor:
        if isinstance(self.consistency.denoiser.net, GuidedUNet):
            return self.consistency(x, sigma, encoder_hidden_states=encoder_hidden_states, guidance_scale=guidance_scale)
        return self.consistency(x, sigma, encoder_hidden_states=encoder_hidden_states)


class AdaptersOff:
    """The base model under a LoRA: ``denoiser`` called with ``unet``'s adapters disabled, so LCM-LoRA's
    teacher and student share one UNet in memory (diffusers' ``train_lcm_distill_lora_sd_wds.py``)."""

    def __init__(self, denoiser: nn.Module, unet: nn.Module) -> None:
        self.denoiser, self.unet = denoiser, unet

    def __call__(self, *args, **kwargs) -> Tensor:
        self.unet.disable_adapters()
        try:
            return self.denoiser(*args, **kwargs)
        finally:
            self.unet.enable_adapters()


def lcm_condition(settings: LCMSettings):
    """batch → the student's conditioning: the cached prompt embedding and s ~ U[s_min, s_max]."""
    def condition(batch: dict[str, Tensor]) -> dict[str, Tensor]:
        c = batch["prompt_embeds"]
        s = torch.rand(len(c), device=c.device) * (settings.guidance_max - settings.guidance_min) + settings.guidance_min
        return {"encoder_hidden_states": c, "guidance_scale": s}
    return condition


def check_settings(settings: LCMSettings, num_train_timesteps: int) -> None:
    if settings.method not in LCM_METHODS:
        raise FewstepError(f"unknown latent consistency method {settings.method!r}; choose lcd, lcf or lcm-lora")
    if settings.solver not in ("ddim", "dpm-solver", "dpm-solver++"):
        raise FewstepError(f"unknown teacher solver {settings.solver!r} for lcd; choose ddim, dpm-solver or dpm-solver++")
    if not 1 <= settings.skip < num_train_timesteps or num_train_timesteps % settings.skip:
        raise FewstepError(f"skipping step {settings.skip} must divide the teacher's {num_train_timesteps} timesteps")
    if not 1 <= settings.guidance_min <= settings.guidance_max:
        raise FewstepError(f"guidance range [{settings.guidance_min}, {settings.guidance_max}] must satisfy "
                           f"1 <= min <= max (1 = no guidance)")
    if settings.distance not in ("l2", "pseudo-huber"):
        raise FewstepError(f"distance {settings.distance!r}: lcd/lcf take l2 or pseudo-huber")


def latent_training_data(model: LatentModel, data: ImageData) -> dict[str, Tensor]:
    """VAE latents (posterior means × scaling factor) and prompt embeddings, computed once."""
    if data.captions is None:
        raise FewstepError(f"{data.name} has no captions; lcd/lcf need a captioned set (emoji, an image folder "
                           f"with metadata.jsonl, a saved HF dataset or webdataset shards)")
    size = model.vae.config.sample_size
    if data.image_size != size or data.channels != model.vae.config.in_channels:
        raise FewstepError(f"the data is {data.channels}×{data.image_size}² but {model.path}'s VAE takes "
                           f"{model.vae.config.in_channels}×{size}² images; resize the data set")
    embeds = torch.cat([model.encode_prompts(data.captions[i:i + 256]) for i in range(0, len(data), 256)])
    return {"images": model.encode_images(data.images), "prompt_embeds": embeds}


def distill_lcm(teacher: LatentModel, data: ImageData, out: str | Path, config: TrainConfig, settings: LCMSettings,
                command: str = "", accelerator=None) -> Path | None:
    """LCD (``teacher`` a diffusion pipeline) or LCF (``teacher`` an LCM pipeline to fine-tune) on ``data``;
    saves a LatentConsistencyModelPipeline folder at ``out`` (the student's EMA weights)."""
    from accelerate import Accelerator

    schedule = teacher.schedule
    check_settings(settings, schedule.num_train_timesteps)
    if settings.method != "lcf" and teacher.info.get("kind") == "lcm":
        raise FewstepError(f"{teacher.path} is already an LCM; distil a diffusion teacher, or fine-tune it with --method lcf")
    if settings.method == "lcf" and not teacher.unet.config.time_cond_proj_dim:
        raise FewstepError(f"lcf fine-tunes an LCM (a UNet with time_cond_proj_dim); {teacher.path} is not one: "
                           f"distil it first with --method lcd")
    accelerator = accelerator or Accelerator(mixed_precision=config.mixed_precision)
    tensors = latent_training_data(teacher, data)
    torch.manual_seed(config.seed)
    teacher.to(accelerator.device)
    empty = teacher.encode_prompts([""])[0]
    params, target = None, None
    if settings.method == "lcd":
        unet = w_conditioned_unet(teacher.unet, settings.cond_proj_dim).requires_grad_(True)
        teacher_fn = prompt_cfg(teacher.denoiser, empty)
    elif settings.method == "lcm-lora":
        from .lora import EMAAdapter, add_lora

        unet = teacher.unet                      # one UNet: the adapters are the student, the base is the teacher
        params = add_lora(unet, settings.lora_rank)
        target = EMAAdapter(unet)                # ... and the target network a second adapter on it
        teacher_fn = prompt_cfg(AdaptersOff(teacher.denoiser, unet), empty)
    else:
        unet, teacher_fn = copy.deepcopy(teacher.unet).requires_grad_(True), None
    if settings.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    student = LCMStudent(unet.train(), schedule, teacher.prediction_type, settings.timestep_scaling)
    curriculum = Curriculum.for_method("lcd" if settings.method == "lcm-lora" else settings.method, config.max_steps,
                                       skip=settings.skip, target_ema=settings.target_ema)
    objective = ConsistencyLoss(schedule, curriculum, get_distance(settings.distance), teacher=teacher_fn,
                                solver=settings.solver, condition=lcm_condition(settings), target=target)
    config = replace(config, extra={**asdict(settings), "dataset": data.name})
    result = train(student, objective, tensors, config, accelerator, params=params)

    from accelerate.state import PartialState
    if not PartialState().is_main_process:
        return None
    record = {"command": command, "method": settings.method, "teacher": str(teacher.path), "steps": result.step,
              "final_loss": result.last_loss, "wall_seconds": round(result.seconds, 1),
              "threads": torch.get_num_threads(), "processes": accelerator.num_processes, "config": asdict(config)}
    if target is not None:
        return _save_lcm_lora(out, target.remove(result.ema.unet), teacher, data, settings, record)
    return _save_lcm(out, result.ema.unet, teacher, data, settings, record)


def _original_steps(teacher: LatentModel, settings: LCMSettings) -> int:
    """The grid the student was distilled on, as LCMScheduler's ``original_inference_steps``: T / k."""
    return teacher.schedule.num_train_timesteps // settings.skip


def _save_lcm(out, unet: nn.Module, teacher: LatentModel, data: ImageData, settings: LCMSettings, record: dict) -> Path:
    """An LCM folder: a LatentConsistencyModelPipeline (LCMScheduler with the distilled grid) + what it is."""
    original_steps, command = _original_steps(teacher, settings), record["command"]
    info = {"kind": "lcm", "dataset": data.name, "class_names": data.class_names, "default_sampler": "consistency",
            "default_steps": 4, "default_guidance_scale": _default_guidance(teacher, settings),
            "guidance_range": [settings.guidance_min, settings.guidance_max], "original_inference_steps": original_steps,
            "training": record}
    scheduler_config = {**teacher.scheduler_config, "original_inference_steps": original_steps,
                        "timestep_scaling": settings.timestep_scaling}
    readme = (f"# {Path(out).name}\n\nA latent consistency model ({settings.method.upper()}, Luo et al. 2023) of "
              f"`{teacher.path}` on `{data.name}`: 1–8 steps, guidance scale {settings.guidance_min:g}–"
              f"{settings.guidance_max:g} as an input (one network evaluation per step). Runs in diffusers:\n\n"
              f"```python\nfrom diffusers import LatentConsistencyModelPipeline\n"
              f"pipe = LatentConsistencyModelPipeline.from_pretrained('{out}')\n"
              f"image = pipe('grinning face', num_inference_steps=4, guidance_scale=4.0, height=32, width=32).images[0]\n"
              f"```\n\nTrained with:\n\n```\n{command}\n```\n")
    return save_pipeline(out, unet, teacher.vae, teacher.text_encoder, teacher.tokenizer, info,
                         scheduler="LCMScheduler", scheduler_config=scheduler_config, readme=readme)


def _default_guidance(teacher: LatentModel, settings: LCMSettings) -> float:
    """The teacher's own default scale when the student learned it, else the middle of the range."""
    s = float(teacher.info.get("default_guidance_scale", 0))
    return s if settings.guidance_min <= s <= settings.guidance_max else (settings.guidance_min + settings.guidance_max) / 2


def _save_lcm_lora(out, unet: nn.Module, teacher: LatentModel, data: ImageData, settings: LCMSettings,
                   record: dict) -> Path:
    """An LCM-LoRA folder: the acceleration vector τ_LCM in diffusers' LoRA format + what it is."""
    from .lora import save_lora, trainable_fraction

    original_steps, command = _original_steps(teacher, settings), record["command"]
    lora, base = trainable_fraction(unet)
    info = {"kind": "lcm-lora", "base": str(teacher.path), "dataset": data.name, "rank": settings.lora_rank,
            "original_inference_steps": original_steps, "guidance_range": [settings.guidance_min, settings.guidance_max],
            "trainable_parameters": lora, "base_parameters": base, "training": record}
    readme = (f"# {Path(out).name}\n\nAn LCM-LoRA (Luo et al. 2023b) for `{teacher.path}`: rank {settings.lora_rank}, "
              f"{lora:,} parameters ({100 * lora / base:.1f}% of the UNet). Plug it into the base model (or a "
              f"fine-tuned one) and sample in 2–8 steps with LCMScheduler:\n\n```python\n"
              f"from diffusers import StableDiffusionPipeline, LCMScheduler\n"
              f"pipe = StableDiffusionPipeline.from_pretrained('{teacher.path}')\n"
              f"pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps={original_steps})\n"
              f"pipe.load_lora_weights('{out}')\n"
              f"image = pipe('red apple', num_inference_steps=4, guidance_scale=1.0, height=32, width=32).images[0]\n"
              f"```\n\nor `fewstep sample --model {teacher.path} --lora {out} --steps 4`. Trained with:\n\n"
              f"```\n{command}\n```\n")
    return save_lora(out, unet, info, readme)
