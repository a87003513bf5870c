"""fewstep: few-step diffusion — consistency models, guided/progressive distillation, latent
consistency models and LCM-LoRA, on diffusers, peft and accelerate.

The layers, each importing only the ones below it: ``core`` (schedules, denoisers and scalings,
guidance, solvers, oracle, the parameterization registry) → ``nets`` → ``objectives`` → ``models`` (the one :class:`Model` handle,
conditioners, codecs, folders, LoRA files, data) → ``training`` → ``sampling`` → ``editing`` →
``methods`` (recipes and the method registry) → ``eval`` → ``bench`` → ``cli``.
"""

from .core.denoisers import EDMDenoiser, VPDenoiser
from .core.flow import FlowDenoiser, FlowSchedule
from .core.guidance import CFGDenoiser, guide
from .core.parameterizations import PARAMETERIZATIONS, SPACES, parameterization
from .core.schedules import EDMSchedule, VPSchedule
from .core.solvers import (
    SAMPLERS,
    sample_consistency,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_euler,
    sample_heun,
)
from .core.trigflow import TrigFlowDenoiser, TrigFlowSchedule
from .methods.consistency import ConsistencySettings, distill_consistency
from .methods.guided import GuidedSettings, distill_guided
from .methods.lcm import LCMSettings, distill_lcm
from .methods.progressive import ProgressiveSettings, distill_progressive
from .methods.registry import METHODS, Method
from .methods.style_lora import train_style_lora
from .models.data import load_captioned, load_dataset
from .models.folders import load_model, save_model
from .models.handle import Model
from .models.loras import apply_loras
from .sampling.generate import generate, generate_latent
from .training import TrainConfig

__version__ = "0.1.0"

# the names the Python API had before the one handle: a pixel model and a pipeline are both a Model now
LoadedModel = LatentModel = Model
load_latent_model = load_model


def distill_guided_latent(teacher, data, out, config, settings, command: str = "", accelerator=None):
    """:func:`distill_guided` with the teacher first (the Python API's name for pipeline teachers)."""
    return distill_guided(data, out, config, settings, teacher, command, accelerator)


def distill_progressive_latent(teacher, data, out, config, settings, command: str = "", accelerator=None):
    """:func:`distill_progressive` with the teacher first (the Python API's name for pipeline teachers)."""
    return distill_progressive(data, out, config, settings, teacher, command, accelerator)


__all__ = ["EDMDenoiser", "VPDenoiser", "CFGDenoiser", "guide", "Model", "LoadedModel", "LatentModel", "load_model",
           "load_latent_model", "save_model", "generate", "generate_latent", "EDMSchedule", "VPSchedule", "SAMPLERS",
           "sample_ddim", "sample_ddpm", "sample_dpmpp_2m", "sample_euler", "sample_heun", "sample_consistency",
           "apply_loras",
           # training: one TrainConfig (steps, batch, lr, work dir) and each method's settings
           "TrainConfig", "load_dataset", "load_captioned", "ConsistencySettings", "distill_consistency",
           "GuidedSettings", "distill_guided", "distill_guided_latent", "ProgressiveSettings", "distill_progressive",
           "distill_progressive_latent", "LCMSettings", "distill_lcm", "train_style_lora",
           # the registries: noise spaces (EDM, VP, flow, TrigFlow) and methods
           "PARAMETERIZATIONS", "SPACES", "parameterization", "FlowSchedule", "FlowDenoiser", "TrigFlowSchedule",
           "TrigFlowDenoiser", "METHODS", "Method"]
