"""The one model handle: every model fewstep samples, edits, evaluates or distils is a :class:`Model`.

A model is a σ-space denoiser over a backbone (:mod:`fewstep.core.denoisers`), a codec between images
and the denoiser's space, a conditioner from what a user asks for to the denoiser's keyword arguments,
and its :class:`~fewstep.models.config.ModelConfig`:

============================  ==============================  ================================
folder                        codec                           conditioner
============================  ==============================  ================================
pixel model (``unet/``)       :class:`PixelCodec` (identity)  :class:`LabelConditioner`
SD 1.x/2.x pipeline           :class:`VAECodec`               :class:`TextConditioner` (CLIP)
SDXL pipeline                 :class:`VAECodec`               :class:`SDXLConditioner` (2 CLIPs)
FLUX / SD3 pipeline           :class:`VAECodec` (shifted)     :class:`PooledTextConditioner` (CLIPs + T5)
============================  ==============================  ================================

so sampling, editing, evaluation and the methods are written once, against this class. The config's
parameterization picks the denoiser (EDM, consistency-model, VP or LCM scalings); a backbone that takes
the guidance scale as an input (:class:`~fewstep.nets.guided.GuidedUNet`) makes :meth:`Model.guided` pass
it, otherwise guidance is classifier-free around the denoiser.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.guidance import CFGDenoiser
from ..errors import FewstepError
from ..nets.flow_transformers import flow_backbone
from ..nets.guided import GuidedUNet
from ..nets.sdxl import AddedCondUNet, takes_added_cond
from .config import ModelConfig
from .data import prepared
from .protocols import Codec, Conditioner


def build_denoiser(net: nn.Module, config: ModelConfig) -> nn.Module:
    """The σ-space denoiser of ``config.parameterization`` over the backbone ``net`` (its registered adapter)."""
    return config.param.build(net, config.make_schedule(), config)


def raw_backbone(net: nn.Module) -> nn.Module:
    """The diffusers network (a UNet, or a transformer) inside a backbone's wrappers (GuidedUNet, AddedCondUNet)."""
    while hasattr(net, "unet"):
        net = net.unet
    return net


raw_unet = raw_backbone   # the name before backbones other than UNets (kept: scripts import it)


def as_backbone(net: nn.Module) -> nn.Module:
    """A diffusers UNet as fewstep's backbone: an SDXL UNet takes its pooled text and time ids as flat keyword
    arguments (:class:`~fewstep.nets.sdxl.AddedCondUNet`); one built with ``time_cond_proj_dim`` takes the
    guidance scale (as ``timestep_cond``), wrapped in :class:`GuidedUNet`. A pixel guided student's
    GuidedUNet (with its own projection) is kept as it is; the other wrappers hold no weights."""
    if isinstance(net, GuidedUNet) and not net.native:
        return net
    unet = raw_backbone(net)
    flow = flow_backbone(unet)
    if flow is not None:                   # a FLUX / SD3 transformer (it takes a guidance scale only if it embeds it)
        return flow
    inner = AddedCondUNet(unet) if takes_added_cond(unet) else unet
    dim = getattr(getattr(unet, "config", None), "time_cond_proj_dim", None)
    return GuidedUNet(inner, dim) if dim else inner


def check_trained_range(trained: tuple[float, float], guidance_scale: float, path: Path | str = "the model") -> None:
    """A guidance-conditioned student has only seen s in its trained range; outside it the embedding is
    extrapolated, so refuse (DESIGN.md §3: a guidance scale out of range is bad input)."""
    lo, hi = trained
    if not lo - 1e-6 <= guidance_scale <= hi + 1e-6:
        raise FewstepError(f"{path} was distilled for guidance scales {lo:g}..{hi:g}; got {guidance_scale:g}. "
                           f"Choose --guidance-scale within that range")


@dataclass
class Model:
    """A model ready to sample, edit, evaluate or distil (module docstring)."""

    config: ModelConfig
    net: nn.Module                                  # the backbone (protocols.Backbone): a diffusers UNet or transformer,
                                                    # in its wrappers (GuidedUNet's w input, AddedCondUNet's SDXL inputs)
    conditioner: Conditioner                        # LabelConditioner, TextConditioner, SDXLConditioner, …
    codec: Codec                                    # PixelCodec, VAECodec, TinyVAECodec, …
    path: Path
    parts: dict[str, Any] = field(default_factory=dict)  # a pipeline's other parts: vae, text_encoder, tokenizer,
                                                    # scheduler_config (what its folder holds besides the UNet)
    denoiser: nn.Module = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.net = as_backbone(self.net)
        self.denoiser = build_denoiser(self.net, self.config)

    # --- what it is ---------------------------------------------------------------------------------
    @property
    def schedule(self):
        return self.config.make_schedule()

    @property
    def backbone(self) -> nn.Module:
        """The diffusers network inside the σ-space wrappers: a ``UNet2DModel`` / ``UNet2DConditionModel`` (or a
        transformer): what LoRAs adapt, what a student copies, what a diffusers pipeline takes as its ``unet``."""
        return raw_backbone(self.net)

    @property
    def unet(self) -> nn.Module:
        """:attr:`backbone` by its name from before transformers (kept for scripts and the README's examples)."""
        return self.backbone

    @property
    def is_pipeline(self) -> bool:
        return not self.codec.pixels

    @property
    def diffusers_pipeline(self) -> str | None:
        """The diffusers pipeline class that runs this model's folder as it is saved: its conditioner's family
        (StableDiffusionPipeline, StableDiffusionXLPipeline), LatentConsistencyModelPipeline for an SD 1.x/2.x LCM;
        None for a pixel model (a fewstep folder)."""
        family = self.conditioner.pipeline
        if family == "StableDiffusionPipeline" and self.config.is_lcm:   # (a flow LCM runs in its own family's)
            return "LatentConsistencyModelPipeline"
        return family

    @property
    def takes_guidance(self) -> bool:
        """The guidance scale is an input of the network (one pass per step), not CFG around it."""
        return isinstance(self.net, GuidedUNet) or bool(getattr(self.net, "takes_guidance", False))

    def step_noise(self, generator: torch.Generator):
        """Where a stochastic sampler's step noise comes from: ``generator``, or the backbone's own layout of it
        (FLUX draws on packed latents, :class:`~fewstep.nets.flow_transformers.PackedNoise`), so that a seed gives
        the image its diffusers pipeline gives."""
        own = getattr(self.net, "step_noise", None)
        return own(generator) if own is not None else generator

    @property
    def shape(self) -> tuple[int, int, int]:
        """The shape of one sample in the denoiser's space (pixels, or latents)."""
        return self.codec.shape

    @property
    def sigma_end(self) -> float:
        """Where multistep consistency sampling re-noises down to: √(σ'² − σmin²)·z for an EDM-space model
        (Song et al. 2023, Algorithm 1), √(σ'²)·z on a VP grid (Luo et al. 2023, Algorithm 3)."""
        return self.config.param.space.boundary(self.schedule)

    @property
    def device(self) -> torch.device:
        parameters = getattr(self.denoiser, "parameters", None)   # the exact oracle has none
        first = next(iter(parameters()), None) if parameters else None
        return torch.device("cpu") if first is None else first.device

    # --- conditioning -------------------------------------------------------------------------------
    def guided(self, cond: dict[str, Tensor], guidance_scale: float) -> tuple[nn.Module, dict[str, Tensor]]:
        """(denoiser, extra_args) to sample ``cond`` with at ``guidance_scale``: the scale as an input for a
        guidance-conditioned student (refused outside its trained range), classifier-free guidance against
        the conditioner's unconditional input otherwise (one pass when s = 1 or there is no condition)."""
        if self.takes_guidance:
            if self.config.guidance_range:
                check_trained_range(tuple(self.config.guidance_range), guidance_scale, self.path)
            n = len(next(iter(cond.values()))) if cond else 1
            return self.denoiser, {**cond, "guidance_scale": torch.full((n,), float(guidance_scale), device=self.device)}
        if not cond:
            return self.denoiser, cond
        return CFGDenoiser(self.denoiser, guidance_scale, self.conditioner.null_like(cond)), cond

    def check_data(self, data) -> None:
        """The training data fits the model: image size and channels, and a class-conditional model's classes."""
        c = self.config
        if (data.image_size, data.channels) != (c.image_size, c.channels):
            raise FewstepError(f"{self.path} takes {c.channels}×{c.image_size}² images but the data {data.name} is "
                               f"{data.channels}×{data.image_size}²: use the model's data set or resize it")
        if not self.conditioner.text and data.num_classes != c.num_classes:
            raise FewstepError(f"{self.path} has {c.num_classes} classes but the data {data.name} has "
                               f"{data.num_classes}: use the model's data set")

    @torch.no_grad()
    def training_tensors(self, data) -> dict[str, Tensor]:
        """The images of ``data`` in the model's space (VAE latents for a pipeline) and each image's conditioning
        (prompt embeddings for a pipeline)."""
        self.check_data(data)
        return {"images": self.codec.encode(data.images).cpu(), **self.conditioner.training_tensors(data)}

    def training_data(self, data):
        """What a training run cuts its batches from: :meth:`training_tensors` of the whole set, computed once,
        or of each batch as it is cut when every use of an image differs (``--crop random``, ``--flip``:
        :func:`fewstep.models.data.prepared`)."""
        self.check_data(data)
        return prepared(data, self.training_tensors)

    # --- new models from this one ----------------------------------------------------------------
    def derive(self, net: nn.Module | None = None, config: ModelConfig | None = None, path: Path | str | None = None,
               **parts: Any) -> "Model":
        """A model with this one's codec and conditioner and a new backbone, config, folder or parts
        (what a method makes of its teacher)."""
        return Model(config or self.config, self.net if net is None else net, self.conditioner, self.codec,
                     Path(path) if path is not None else self.path, {**self.parts, **parts})

    def replace_config(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self.config, **changes)

    def to(self, device: str | torch.device) -> "Model":
        self.denoiser.to(device)
        self.codec.to(device)
        self.conditioner.to(device)
        return self

    def eval(self) -> "Model":
        """Frozen: no gradients, dropout off (as loaded)."""
        for module in (self.denoiser, *self.parts.values()):
            if isinstance(module, nn.Module):
                module.requires_grad_(False).eval()
        return self
