"""fewstep: few-step diffusion — consistency models, guided/progressive distillation, latent
consistency models and LCM-LoRA, on diffusers, peft and accelerate."""

from .denoisers import EDMDenoiser, VPDenoiser
from .guidance import CFGDenoiser, guide
from .models import LoadedModel, load_model
from .sampling import generate
from .schedules import EDMSchedule, VPSchedule
from .solvers import SAMPLERS, sample_ddim, sample_ddpm, sample_dpmpp_2m, sample_euler, sample_heun

__version__ = "0.1.0"
__all__ = ["EDMDenoiser", "VPDenoiser", "CFGDenoiser", "guide", "LoadedModel", "load_model", "generate",
           "EDMSchedule", "VPSchedule", "SAMPLERS", "sample_ddim", "sample_ddpm", "sample_dpmpp_2m",
           "sample_euler", "sample_heun"]
