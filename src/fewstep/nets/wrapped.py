"""The base of fewstep's modules around a diffusers UNet (:class:`~fewstep.nets.guided.GuidedUNet`,
:class:`~fewstep.nets.sdxl.AddedCondUNet`): they answer for the UNet they hold, its ``config`` and ``dtype``
(what the denoisers, the savers and the LoRA code read), once."""

from __future__ import annotations

import torch
from torch import nn


class WrappedUNet(nn.Module):
    """A module holding a diffusers UNet as ``self.unet`` and reporting its config and dtype."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    @property
    def config(self):
        return self.unet.config

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype
