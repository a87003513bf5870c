"""LoRA adapters on a UNet (peft), as LCM-LoRA and style LoRAs train them.

- :func:`add_lora`: peft LoRA on the reference set of LCM-LoRA modules (diffusers'
  ``train_lcm_distill_lora_sd_wds.py``: attention projections, feed-forward, resnet convolutions,
  down/up-samplers, the resnets' time-embedding projections).
- :class:`AdaptersOff`: the base model under the adapters, so LCM-LoRA's teacher and student are one UNet.
- :class:`EMAAdapter`: LCM-LoRA's target network as a second adapter on that same UNet.

Reading and writing LoRA files, and plugging them into a model, is :mod:`fewstep.models.loras`.
"""

from __future__ import annotations

import copy
import warnings
from typing import Sequence

import torch
from torch import Tensor, nn

from ..core.denoisers import unwrap
from ..errors import FewstepError

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


# the modules a LoRA adapts, by backbone class: a new backbone (a diffusers transformer) registers its own here
BACKBONE_LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "UNet2DConditionModel": LORA_TARGETS, "UNet2DModel": LORA_TARGETS,
    # diffusers' examples/dreambooth/train_dreambooth_lora_flux.py's default target_modules (both streams'
    # attention and feed-forwards; the single blocks' attention) and train_dreambooth_lora_sd3.py's (joint attention)
    "FluxTransformer2DModel": ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
                               "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
                               "ff_context.net.0.proj", "ff_context.net.2"),
    "SD3Transformer2DModel": ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
                              "attn.to_out.0", "attn.to_q", "attn.to_v"),
}


def lora_targets(backbone: nn.Module) -> tuple[str, ...]:
    """The LoRA target modules of ``backbone``'s class (:data:`BACKBONE_LORA_TARGETS`; UNets' by default)."""
    return BACKBONE_LORA_TARGETS.get(type(backbone).__name__, LORA_TARGETS)


def add_lora(unet: nn.Module, rank: int = 8, alpha: float | None = None,
             targets: Sequence[str] | None = None, adapter_name: str = "default") -> list[nn.Parameter]:
    """Add a peft LoRA adapter (B zero-initialised: the model is unchanged until it trains) and
    freeze everything else; returns the adapter's parameters. ``targets``: the backbone's own
    (:func:`lora_targets`) unless given."""
    from peft import LoraConfig

    targets = lora_targets(unet) if targets is None else targets

    if rank < 1:
        raise FewstepError(f"LoRA rank must be at least 1, got {rank}")
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                                target_modules=list(targets)), adapter_name=adapter_name)
    params = lora_parameters(unet)
    if not params:
        raise FewstepError(f"no module of the UNet matches the LoRA targets {', '.join(targets)}")
    for p in params:   # fp32 adapters on a bf16/fp16 base (peft casts their input up and their output back)
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


class AdaptersOff:
    """The base model under a LoRA: ``denoiser`` called with ``unet``'s adapters disabled, so LCM-LoRA's
    teacher and student share one UNet in memory (diffusers' ``train_lcm_distill_lora_sd_wds.py``)."""

    def __init__(self, denoiser: nn.Module, unet: nn.Module) -> None:
        self.denoiser, self.unet = denoiser, unet

    def __call__(self, *args, **kwargs) -> Tensor:
        self.unet.disable_adapters()
        try:
            return self.denoiser(*args, **kwargs)
        finally:
            self.unet.enable_adapters()


class EMAAdapter:
    """LCM-LoRA's target network f_θ⁻ without a second UNet: a second peft adapter (``name``) on the same
    UNet holds the EMA of the trained one (``adapter``), and the target pass runs with it active. Same
    methods as :class:`fewstep.consistency_losses.EMACopy`; θ⁻ starts equal to θ. Made before training so
    the adapter exists when accelerate wraps the model; :meth:`remove` drops it from a copy to be saved."""

    def __init__(self, unet: nn.Module, adapter: str = "default", name: str = "target") -> None:
        self.unet, self.adapter, self.name = unet, adapter, name
        with warnings.catch_warnings():  # peft warns that a second adapter is being added: that is the point
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            unet.add_adapter(copy.deepcopy(unet.peft_config[adapter]), adapter_name=name)
        unet.set_adapter(adapter)                  # add_adapter activates the new one: the student trains the first
        with torch.no_grad():
            for t, p in self._pairs():
                t.data = p.detach().clone()    # θ⁻ = θ, in θ's (fp32) precision whatever the base's
                t.requires_grad_(False)

    def _pairs(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        named = dict(self.unet.named_parameters())
        mine, theirs = f".{self.adapter}.", f".{self.name}."
        return [(named[n.replace(mine, theirs)], p) for n, p in named.items() if "lora_" in n and mine in n]

    def __call__(self, model: nn.Module, mu: float):
        def target(*args, **kwargs):
            self.unet.set_adapter(self.name)
            try:
                return unwrap(model)(*args, **kwargs)
            finally:
                self.unet.set_adapter(self.adapter)
        return target

    @torch.no_grad()
    def update(self, model: nn.Module, mu: float) -> None:
        for t, p in self._pairs():
            t.lerp_(p.detach(), 1 - mu)

    def state_dict(self) -> dict[str, Tensor]:
        return {f"{i}": t.detach() for i, (t, _) in enumerate(self._pairs())}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for i, (t, _) in enumerate(self._pairs()):
                t.copy_(state[f"{i}"])

    def remove(self, unet: nn.Module) -> nn.Module:
        """``unet`` (e.g. the EMA copy of the trained one) without the target adapter."""
        unet.delete_adapters(self.name)
        unet.set_adapter(self.adapter)
        return unet


def lora_parameters(unet: nn.Module, adapter: str | None = None) -> list[nn.Parameter]:
    """The LoRA weights of ``unet`` (peft names them ``…lora_A.<adapter>.weight``), of one adapter if named."""
    return [p for n, p in unet.named_parameters() if "lora_" in n and (adapter is None or f".{adapter}." in n)]


def trainable_fraction(unet: nn.Module) -> tuple[int, int]:
    """(LoRA parameters, base UNet parameters)."""
    lora = sum(p.numel() for p in lora_parameters(unet))
    return lora, sum(p.numel() for p in unet.parameters()) - lora
