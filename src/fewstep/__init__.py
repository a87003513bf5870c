"""fewstep: few-step diffusion — consistency models, guided/progressive distillation, latent
consistency models and LCM-LoRA, on diffusers, peft and accelerate."""

from .denoisers import EDMDenoiser, VPDenoiser
from .guidance import CFGDenoiser, guide
from .latent_sampling import generate_latent
from .lcm import LCMStudent
from .lora import apply_loras
from .models import LoadedModel, load_model
from .sampling import generate
from .schedules import EDMSchedule, VPSchedule
from .sd import LatentModel, load_latent_model
from .solvers import SAMPLERS, sample_consistency, sample_ddim, sample_ddpm, sample_dpmpp_2m, sample_euler, sample_heun

__version__ = "0.1.0"
__all__ = ["EDMDenoiser", "VPDenoiser", "CFGDenoiser", "guide", "LoadedModel", "load_model", "generate",
           "EDMSchedule", "VPSchedule", "SAMPLERS", "sample_ddim", "sample_ddpm", "sample_dpmpp_2m",
           "sample_euler", "sample_heun", "sample_consistency", "LatentModel", "load_latent_model", "generate_latent",
           "LCMStudent", "apply_loras"]
