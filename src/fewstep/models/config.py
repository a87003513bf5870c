"""``fewstep.json``: what a model is, one dataclass for every folder kind.

A pixel model folder and a diffusers pipeline folder both carry a ``fewstep.json`` of these fields
(a pipeline folder fewstep did not write gets them from its own configs, :func:`pipeline_defaults`).
Folders written before format 2 spelled a few things differently; :func:`upgrade` reads them unchanged.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..core.flow import FlowSchedule
from ..core.parameterizations import PARAMETERIZATIONS, Parameterization, parameterization, schedule_fields
from ..core.schedules import VPSchedule
from ..errors import FewstepError

CONFIG_NAME = "fewstep.json"
FORMAT_VERSION = 2
KINDS = ("diffusion", "consistency")


@dataclass
class ModelConfig:
    """The contents of ``fewstep.json``."""

    kind: str = "diffusion"                    # "diffusion" (a denoiser D) or "consistency" (f(x, σ) → x_0 in one step)
    parameterization: str = "edm"              # a name in fewstep.core.parameterizations: "edm" (Karras preconditioning),
                                               # "cm" (consistency boundary condition, Song et al. 2023), "vp" (a discrete
                                               # ε/v/x0 UNet), "lcm" (Luo et al. 2023), "flow" (rectified flow), "trigflow"
    schedule: dict[str, Any] = field(default_factory=dict)  # the fields of its space's schedule class
    prediction_type: str = "epsilon"           # for "vp" and "lcm"
    image_size: int = 16                       # of the images (a pipeline's VAE sample size)
    channels: int = 1
    class_names: list[str] = field(default_factory=list)  # a pixel model's classes (empty: unconditional); a
                                               # text model's data set groups (what its accuracy is judged by)
    dataset: str = ""
    default_sampler: str = "dpmpp-2m"
    default_steps: int = 50
    default_guidance_scale: float = 2.0
    sampling_sigmas: dict[str, list[float]] = field(default_factory=dict)  # stored n-step grids ("2": [80, 0.8, 0])
    guidance_range: list[float] = field(default_factory=list)  # [s_min, s_max] a guidance-conditioned student was
                                               # trained on (guided distillation, LCD; empty: none)
    embedding_dim: int = 256                   # width of its guidance-scale embedding ψ(w)
    serves_steps: list[int] = field(default_factory=list)  # the step counts a progressive folder's students serve
    original_inference_steps: int = 50         # LCM: the skipped grid it was distilled on (T / k)
    timestep_scaling: float = 10.0             # LCM: LCMScheduler's timestep_scaling in c_skip/c_out
    loras: list[dict] = field(default_factory=list)  # adapters plugged in (path, weight, kind)
    training: dict[str, Any] = field(default_factory=dict)  # command, settings, final loss, wall-clock
    format_version: int = FORMAT_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def null_label(self) -> int | None:
        """The label of the unconditional branch (one past the last class), or None."""
        return self.num_classes if self.class_names else None

    @property
    def is_lcm(self) -> bool:
        return self.parameterization == "lcm"

    @property
    def takes_guidance(self) -> bool:
        """The guidance scale is an input of the network (one pass per step), not CFG around it."""
        return bool(self.guidance_range)

    @property
    def param(self) -> Parameterization:
        """The registered parameterization this model has (:mod:`fewstep.core.parameterizations`)."""
        return parameterization(self.parameterization)

    def make_schedule(self):
        """Its noise space's schedule (EDMSchedule, VPSchedule, FlowSchedule, …) from the ``schedule`` fields."""
        return self.param.make_schedule(self.schedule)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def upgrade(raw: dict) -> dict:
    """A ``fewstep.json`` of any format as format-2 fields. Format 1 (pixel folders): the w-embedding as
    ``guidance_embedding`` {embedding_dim, min/max_guidance_scale}. Pipeline folders before format 2:
    ``kind`` "lcm" (a consistency model with LCM's scalings) or "guided" (a diffusion model whose UNet
    takes s), and the kinds of LoRA folders, which are not models."""
    raw = dict(raw)
    version = raw.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version >= FORMAT_VERSION:
        return raw                                # (a malformed version is parse_config's to refuse)
    embedding = raw.pop("guidance_embedding", None) or {}
    if embedding:
        try:
            raw["guidance_range"] = [embedding["min_guidance_scale"], embedding["max_guidance_scale"]]
            raw["embedding_dim"] = embedding["embedding_dim"]
        except (KeyError, TypeError):
            raise FewstepError("fewstep.json (format 1): guidance_embedding must be an object with embedding_dim, "
                               "min_guidance_scale and max_guidance_scale") from None
    if raw.get("kind") == "lcm":
        raw.update(kind="consistency", parameterization="lcm")
    elif raw.get("kind") == "guided":
        raw["kind"] = "diffusion"
    raw["format_version"] = FORMAT_VERSION
    return raw


def parse_config(raw: dict, where: Path | str) -> ModelConfig:
    """A :class:`ModelConfig` from JSON values, each checked against its spec (:mod:`fewstep.io.validate`), with
    one line naming ``where``, the field, its bound and the fix on a bad one."""
    from ..core.solvers import SAMPLERS
    from ..io.specs import check_model_config, check_schedule

    try:
        raw = upgrade(raw)
    except FewstepError as e:
        raise FewstepError(f"{where}: {e}") from None
    check_model_config(raw, where, ModelConfig, KINDS, PARAMETERIZATIONS, SAMPLERS, FORMAT_VERSION)
    config = ModelConfig(**raw)
    check_schedule(config.param.space.schedule, config.schedule, where, config.param.space.name)
    return config


def read_json(path: Path) -> dict:
    """A JSON object from ``path``, size- and depth-capped, any problem one line (:func:`fewstep.io.validate.load_json`)."""
    from ..io.validate import load_json

    return load_json(path)


def pipeline_defaults(scheduler_config: dict, image_size: int) -> dict:
    """What a diffusers text-to-image pipeline is, read off its scheduler: a VP diffusion model (an LCM if
    its scheduler is LCMScheduler), sampled with DPM-Solver++ in 25 steps at guidance 3 (an LCM: 4 steps)."""
    lcm = scheduler_config.get("_class_name") in ("LCMScheduler", "FlowMatchLCMScheduler")
    if is_flow_scheduler(scheduler_config):   # FLUX / SD3: a velocity model on the flow ODE, or its LCM
        return {"kind": "consistency" if lcm else "diffusion", "parameterization": "flow", "image_size": image_size,
                "channels": 3, "default_sampler": "consistency" if lcm else "euler", "default_steps": 4 if lcm else 28,
                "default_guidance_scale": 1.0 if lcm else 3.5}
    if scheduler_config.get("_class_name") == "TCDScheduler":   # a TCD model (Zheng et al. 2024): ε UNet, γ sampler
        return {"kind": "consistency", "parameterization": "tcd", "image_size": image_size, "channels": 3,
                "default_sampler": "tcd", "default_steps": 4, "default_guidance_scale": 1.0}
    return {"kind": "consistency" if lcm else "diffusion", "parameterization": "lcm" if lcm else "vp",
            "image_size": image_size, "channels": 3, "default_sampler": "consistency" if lcm else "dpmpp-2m",
            "default_steps": 4 if lcm else 25, "default_guidance_scale": 3.0}


FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchLCMScheduler")


def is_flow_scheduler(scheduler_config: dict) -> bool:
    return scheduler_config.get("_class_name") in FLOW_SCHEDULERS


def scheduler_fields(scheduler_config: dict, base_grid: str = "scheduler", image_seq_len: int | None = None) -> dict:
    """The fields of :class:`ModelConfig` a pipeline's scheduler config decides (its schedule, what the UNet
    predicts, an LCM's grid): the scheduler config is their source of truth, as in diffusers. A flow scheduler's
    (FLUX, SD3) is a :class:`~fewstep.core.flow.FlowSchedule` on its pipeline's ``base_grid``, a dynamic shift taken
    at ``image_seq_len`` tokens."""
    if is_flow_scheduler(scheduler_config):
        return {"schedule": schedule_fields(FlowSchedule.from_diffusers_config(scheduler_config, base_grid,
                                                                              image_seq_len))}
    schedule = VPSchedule.from_diffusers_config(scheduler_config)
    return {"schedule": {"beta_schedule": schedule.beta_schedule, "num_train_timesteps": schedule.num_train_timesteps,
                         "beta_start": schedule.beta_start, "beta_end": schedule.beta_end},
            "prediction_type": scheduler_config.get("prediction_type", "epsilon"),
            "original_inference_steps": int(scheduler_config.get("original_inference_steps", 50)),
            "timestep_scaling": float(scheduler_config.get("timestep_scaling", 10.0))}
