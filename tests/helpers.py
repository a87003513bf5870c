"""Tiny models and data shared by the tests (seconds on a CPU)."""

import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from diffusers import UNet2DModel

from fewstep.denoisers import EDMDenoiser
from fewstep.objectives import DenoisingLoss
from fewstep.schedules import EDMSchedule


def tiny_unet(num_classes: int = 3, channels: int = 1, size: int = 8, dropout: float = 0.1) -> UNet2DModel:
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=1,
                       block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), num_class_embeds=num_classes + 1,
                       norm_num_groups=4, dropout=dropout)


def tiny_setup(model_seed: int = 0, n: int = 32):
    """(denoiser, objective, data) with dropout on, so resume must restore the RNG stream too.
    The data is always the same; ``model_seed`` sets the initial weights."""
    torch.manual_seed(model_seed)
    g = torch.Generator().manual_seed(0)
    data = {"images": torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, "labels": torch.randint(0, 3, (n,), generator=g)}
    return EDMDenoiser(tiny_unet()), DenoisingLoss(EDMSchedule(), null_label=3, label_dropout=0.2), data


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``fewstep ARGV`` in-process: (exit status, stdout, stderr); argparse's SystemExit included."""
    from fewstep.cli import main

    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def tiny_digits_models(root: Path):
    """Fill ``root`` as a models folder: the shipped digits classifier beside a tiny untrained
    'digits-teacher'. Returns the teacher's config."""
    from fewstep.cli import shipped_models_dir
    from fewstep.models import ModelConfig, save_model

    shutil.copytree(shipped_models_dir() / "digits-classifier", root / "digits-classifier")
    torch.manual_seed(0)
    config = ModelConfig(schedule=asdict(EDMSchedule()), image_size=16, channels=1,
                         class_names=[str(i) for i in range(10)], dataset="digits")
    save_model(root / "digits-teacher", tiny_unet(num_classes=10, size=16), config)
    return config
