"""Trajectory consistency distillation (Zheng et al. 2024, arXiv 2402.19159): ``tcd`` (the full UNet, like ``lcd``)
and ``tcd-lora`` (LoRA adapters only, like ``lcm-lora``), on LCD's recipe (:func:`fewstep.methods.lcm.distill_lcm`
with TCD's :class:`~fewstep.methods.lcm.Family`): the same teacher, guided teacher step on the skipped grid, target
network and saving; TCD's loss (:class:`fewstep.objectives.trajectory.TrajectoryConsistencyLoss`) and TCD's student.

The student is an ε-prediction UNet run by diffusers' ``TCDScheduler`` (scheduling_tcd.py:656–660: the model output
is ε, turned into x̂_0 and into x_s by the DDIM step; there is no c_skip/c_out boundary scaling as in LCM), so its
fewstep parameterization is "tcd": the VP teacher's own ε adapter, sampled on LCM's skipped grid (which
``TCDScheduler.set_timesteps`` shares) with strategic stochastic sampling (``--sampler tcd``, γ = ``--eta``, default
0.3 as TCDScheduler.step's).

The guidance scale. ``tcd-lora`` has no w input: its teacher guides at s ~ U[s_min, s_max] (give min = max for one
scale, as diffusers' LCM-LoRA script and the released TCD LoRAs, which are run at guidance_scale 0 — no CFG — in
TCD's README), and the LoRA plugs into the base pipeline unchanged. ``tcd`` keeps LCD's w-embedding ψ(w) as
``timestep_cond`` (the student learns the whole range of scales, one network evaluation a step): TCD is LCD with a
new consistency function (TCD §4, "built on LCM"), the public full-model TCD script does the same
(rootonchair/consistency_models_distill ``tcd/train_tcd_distill_sd_wds.py``:949–955, 1242–1255), and diffusers'
``StableDiffusionPipeline`` feeds ``timestep_cond`` to a UNet with ``time_cond_proj_dim`` (skipping CFG) exactly as
LatentConsistencyModelPipeline does, so the saved folder runs there with its TCDScheduler. Deviation: the official
TCD release has no full-model checkpoint to compare this choice against.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import FewstepError
from ..models.data import ImageData
from ..models.handle import Model
from ..objectives.trajectory import TrajectoryConsistencyLoss
from ..training import TrainConfig
from .lcm import Family, LCMSettings, check_teacher, distill_lcm
from .registry import Method, register

TCD_METHODS = ("tcd", "tcd-lora")


def tcd_config(teacher: Model, settings: LCMSettings):
    """A TCD model's fewstep.json: the teacher's ε UNet as the "tcd" parameterization on the skipped grid of T / k
    steps (TCDScheduler's ``original_inference_steps``), sampled in 4 steps with ``--sampler tcd``; the full model
    with LCD's guidance range as an input."""
    lo, hi = settings.guidance_min, settings.guidance_max
    s = teacher.config.default_guidance_scale
    full = settings.method == "tcd"
    return teacher.replace_config(
        kind="consistency", parameterization="tcd", default_sampler="tcd", default_steps=4,
        default_guidance_scale=(s if lo <= s <= hi else (lo + hi) / 2) if full else 1.0,
        guidance_range=[lo, hi] if full else [], embedding_dim=settings.cond_proj_dim, sampling_sigmas={},
        serves_steps=[], original_inference_steps=teacher.schedule.num_train_timesteps // settings.skip)


TCD = Family("TCD", "Zheng et al. 2024", TCD_METHODS, tcd_config, TrajectoryConsistencyLoss, "TCDScheduler",
             call_args=", eta=0.3", lora_title="A TCD-LoRA (Zheng et al. 2024)",
             model_title="trajectory consistency model")


def distill_tcd(teacher: Model, data: ImageData, out: str | Path, config: TrainConfig, settings: LCMSettings,
                command: str = "", accelerator=None) -> Path | None:
    """``tcd`` or ``tcd-lora`` on ``data`` from a diffusion ``teacher`` (module docstring)."""
    return distill_lcm(teacher, data, out, config, settings, command=command, accelerator=accelerator, family=TCD)


def _recipe(teacher: Model, data: ImageData, out: str | Path, config: TrainConfig, settings: LCMSettings,
            command: str) -> Path | None:
    return distill_tcd(teacher, data, out, config, settings, command=command)


def _lora_note(folder: Path) -> str:
    return f"(a diffusers LoRA: {folder}/pytorch_lora_weights.safetensors; sample it with --sampler tcd)"


def _check_teacher(teacher: Model, method: str) -> Model:
    if teacher.config.parameterization == "tcd":
        raise FewstepError(f"{teacher.path} is already a TCD model; distil a diffusion teacher such as models/emoji-sd")
    return check_teacher(teacher, method)


for _name, _summary in (
        ("tcd", "trajectory consistency distillation (Zheng et al. 2024) of a discrete-VP teacher: an ε UNet run by "
                "TCDScheduler, sampled with --sampler tcd --eta G"),
        ("tcd-lora", "TCD-LoRA (Zheng et al. 2024): TCD training only LoRA weights, plugged in like an LCM-LoRA")):
    register(Method(_name, _summary, LCMSettings, _recipe, teacher="models/emoji-sd", check=_check_teacher,
                    options=("consistency", "guided", "latent"), family="latent consistency models (pipelines)",
                    flags={"guidance_min": "min_guidance_scale", "guidance_max": "max_guidance_scale"},
                    frozen_teacher_dtype=True, note=_lora_note if _name == "tcd-lora" else None))
