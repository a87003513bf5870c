"""Train a class-conditional pixel-space diffusion teacher (EDM preconditioning on a diffusers UNet2DModel)."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import torch

from .data import ImageData
from .denoisers import EDMDenoiser
from .models import ModelConfig, build_unet, save_model
from .objectives import DenoisingLoss
from .schedules import EDMSchedule
from .train import TrainConfig, train


def train_teacher(data: ImageData, out: str | Path, config: TrainConfig, width: int = 32,
                  label_dropout: float = 0.1, command: str = "", accelerator=None) -> Path | None:
    """Train on ``data`` with the EDM loss and write the EMA weights as a model folder at ``out``.

    Label dropout (to the null class) makes the one network both conditional and unconditional,
    so classifier-free guidance works at sampling time (Ho & Salimans 2022).
    Returns the folder (on the main process; None on the others).
    """
    schedule = EDMSchedule()
    torch.manual_seed(config.seed)
    unet = build_unet(data.image_size, data.channels, data.num_classes, width=width)
    denoiser = EDMDenoiser(unet, sigma_data=schedule.sigma_data)
    objective = DenoisingLoss(schedule, null_label=data.num_classes, label_dropout=label_dropout)
    config = replace(config, extra={"width": width, "label_dropout": label_dropout, "dataset": data.name})
    result = train(denoiser, objective, {"images": data.images, "labels": data.labels}, config, accelerator)
    from accelerate.state import PartialState
    if not PartialState().is_main_process:
        return None
    model_config = ModelConfig(
        kind="diffusion", parameterization="edm", schedule=asdict(schedule), image_size=data.image_size,
        channels=data.channels, class_names=data.class_names, dataset=data.name,
        training={"command": command, "steps": result.step, "final_loss": result.last_loss,
                  "parameters": sum(p.numel() for p in unet.parameters()), "config": asdict(config)})
    readme = (f"# {Path(out).name}\n\nA class-conditional EDM diffusion model on `{data.name}` "
              f"({len(data)} images, {data.num_classes} classes, {data.image_size}×{data.image_size}), "
              f"{model_config.training['parameters'] / 1e6:.2f}M parameters, EMA weights after {result.step} steps.\n\n"
              f"Trained with:\n\n```\n{command}\n```\n")
    return save_model(out, result.ema.net, model_config, readme)
