"""Model folders: build, save and load fewstep's pixel-space models.

A model folder is safetensors + JSON, never pickles, and loading never executes code
(DESIGN.md §2)::

    MODEL/
      fewstep.json        what the model is: parameterization, schedule, classes, sampler defaults,
                          and the command that trained it
      unet/               the backbone in diffusers' own layout (config.json +
                          diffusion_pytorch_model.safetensors): UNet2DModel.from_pretrained(MODEL/"unet")
      README.md           for people: what it is and how it was made
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel
from torch import nn

from .atomic import atomic_path
from .consistency import cm_scalings
from .denoisers import EDMDenoiser, VPDenoiser
from .errors import FewstepError
from .schedules import EDMSchedule, VPSchedule

CONFIG_NAME = "fewstep.json"


@dataclass
class ModelConfig:
    """The contents of ``fewstep.json``."""

    kind: str = "diffusion"                    # "diffusion" (a denoiser) or "consistency" (f(x, σ) → x_0 in one step)
    parameterization: str = "edm"              # "edm" (Karras preconditioning), "cm" (consistency boundary
                                               # condition, Song et al. 2023) or "vp" (discrete ε/v/x0 UNet)
    schedule: dict[str, Any] = field(default_factory=dict)  # EDMSchedule or VPSchedule fields
    prediction_type: str = "epsilon"           # for "vp"
    image_size: int = 16
    channels: int = 1
    class_names: list[str] = field(default_factory=list)  # empty: unconditional
    dataset: str = ""
    default_sampler: str = "dpmpp-2m"
    default_steps: int = 50
    default_guidance_scale: float = 2.0
    sampling_sigmas: dict[str, list[float]] = field(default_factory=dict)  # tuned n-step grids ("2": [80, 0.8, 0])
    training: dict[str, Any] = field(default_factory=dict)  # command, settings, final loss
    guidance_embedding: dict[str, Any] = field(default_factory=dict)  # w-conditioned student (fewstep.guided):
                                               # embedding_dim and the trained guidance-scale range; empty: none
    serves_steps: list[int] = field(default_factory=list)  # step counts a progressive student was distilled for
                                               # (fewstep.progressive; sampling_sigmas holds their grids); empty: any
    format_version: int = 1

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def null_label(self) -> int | None:
        """The label of the unconditional branch (one past the last class), or None."""
        return self.num_classes if self.class_names else None


def build_unet(image_size: int, channels: int, num_classes: int, width: int = 32, dropout: float = 0.1) -> UNet2DModel:
    """A small class-conditional UNet2DModel: 3 levels (width, 2·width, 2·width), self-attention at the
    middle level, class embeddings with one extra "null" class for classifier-free guidance.
    At width 32 and 16×16 it has 1.6M parameters and trains at ~1.5 it/s at batch 128 on 2 CPU cores."""
    if width < 8 or width % 8:
        raise FewstepError(f"UNet width must be a positive multiple of 8 (group norm of 8 groups), got {width}")
    return UNet2DModel(
        sample_size=image_size, in_channels=channels, out_channels=channels, layers_per_block=2,
        block_out_channels=(width, 2 * width, 2 * width),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        num_class_embeds=num_classes + 1 if num_classes else None,
        norm_num_groups=8, attention_head_dim=min(32, 2 * width), dropout=dropout)


def make_schedule(config: ModelConfig) -> EDMSchedule | VPSchedule:
    return VPSchedule(**config.schedule) if config.parameterization == "vp" else EDMSchedule(**config.schedule)


def make_denoiser(unet: nn.Module, config: ModelConfig) -> nn.Module:
    """Wrap a backbone according to the config's parameterization."""
    if config.parameterization in ("edm", "cm"):
        schedule = EDMSchedule(**config.schedule)
        scalings = partial(cm_scalings, sigma_min=schedule.sigma_min) if config.parameterization == "cm" else None
        return EDMDenoiser(unet, sigma_data=schedule.sigma_data, scalings=scalings)
    if config.parameterization == "vp":
        return VPDenoiser(unet, make_schedule(config), config.prediction_type)
    raise FewstepError(f"unknown parameterization {config.parameterization!r} in {CONFIG_NAME}")


@dataclass
class LoadedModel:
    """A model ready to sample: its denoiser, config, schedule and folder."""

    denoiser: nn.Module
    config: ModelConfig
    path: Path

    @property
    def schedule(self) -> EDMSchedule | VPSchedule:
        return make_schedule(self.config)


def save_model(folder: str | Path, unet: UNet2DModel, config: ModelConfig, readme: str = "") -> Path:
    """Write a model folder atomically (a temporary folder renamed over ``folder``)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder, directory=True) as tmp:
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        (tmp / CONFIG_NAME).write_text(json.dumps(asdict(config), indent=2) + "\n")
        if readme:
            (tmp / "README.md").write_text(readme)
    return folder


def read_config(folder: str | Path) -> ModelConfig:
    folder = Path(folder)
    if not folder.is_dir():
        raise FewstepError(f"model folder {folder} does not exist")
    path = folder / CONFIG_NAME
    if not path.exists():
        raise FewstepError(f"{folder} is not a fewstep model folder (no {CONFIG_NAME})")
    try:
        raw = json.loads(path.read_text())
        return ModelConfig(**{k: v for k, v in raw.items() if k in ModelConfig.__dataclass_fields__})
    except (ValueError, TypeError) as e:
        raise FewstepError(f"{path} is corrupt: {e}") from None


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a model folder written by :func:`save_model` (weights from safetensors only)."""
    folder = Path(folder)
    config = read_config(folder)
    try:
        unet = UNet2DModel.from_pretrained(folder / "unet", use_safetensors=True)
    except Exception as e:  # diffusers raises OSError/ValueError/safetensors errors for bad files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FewstepError(f"cannot load the weights in {folder / 'unet'} (missing or corrupt): {first}") from None
    if config.guidance_embedding:  # the guidance scale is an input (Meng et al. 2023 stage 1)
        from .guided import GuidedUNet
        unet = GuidedUNet.from_unet_folder(unet, folder / "unet", int(config.guidance_embedding["embedding_dim"]))
    denoiser = make_denoiser(unet, config).to(device).eval()
    return LoadedModel(denoiser, config, folder)
