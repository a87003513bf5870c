"""fewstep: few-step diffusion — consistency models, guided/progressive distillation, latent
consistency models and LCM-LoRA, on diffusers, peft and accelerate."""

from .data import load_captioned, load_dataset
from .denoisers import EDMDenoiser, VPDenoiser
from .distill import ConsistencySettings, distill_consistency
from .guidance import CFGDenoiser, guide
from .guided import GuidedSettings, distill_guided, distill_guided_latent
from .latent_sampling import generate_latent
from .lcm import LCMSettings, LCMStudent, distill_lcm
from .lora import apply_loras, train_style_lora
from .models import LoadedModel, load_model
from .progressive import ProgressiveSettings, distill_progressive, distill_progressive_latent
from .sampling import generate
from .schedules import EDMSchedule, VPSchedule
from .sd import LatentModel, load_latent_model
from .solvers import SAMPLERS, sample_consistency, sample_ddim, sample_ddpm, sample_dpmpp_2m, sample_euler, sample_heun
from .train import TrainConfig

__version__ = "0.1.0"
__all__ = ["EDMDenoiser", "VPDenoiser", "CFGDenoiser", "guide", "LoadedModel", "load_model", "generate",
           "EDMSchedule", "VPSchedule", "SAMPLERS", "sample_ddim", "sample_ddpm", "sample_dpmpp_2m",
           "sample_euler", "sample_heun", "sample_consistency", "LatentModel", "load_latent_model", "generate_latent",
           "LCMStudent", "apply_loras",
           # training: one TrainConfig (steps, batch, lr, work dir) and each method's settings
           "TrainConfig", "load_dataset", "load_captioned", "ConsistencySettings", "distill_consistency",
           "GuidedSettings", "distill_guided", "distill_guided_latent", "ProgressiveSettings", "distill_progressive",
           "distill_progressive_latent", "LCMSettings", "distill_lcm", "train_style_lora"]
