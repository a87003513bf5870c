"""A UNet that takes the guidance scale as an input: the student of guided distillation (Meng et al.
2023 stage 1) and of latent consistency distillation (Luo et al. 2023).

:class:`GuidedUNet` adds ``cond_proj(get_guidance_scale_embedding(w))`` to the UNet's sinusoidal timestep
features, right before its time-embedding MLP. That is exactly what diffusers' ``TimestepEmbedding`` does
with ``cond_proj_dim`` / ``timestep_cond`` in the LCM UNets (DESIGN.md §2), so a ``UNet2DConditionModel``
built with ``time_cond_proj_dim`` (:func:`w_conditioned_unet`) needs no wrapper projection at all:
:class:`GuidedUNet` then passes the embedding as ``timestep_cond``. Meng et al. say only that w is "an
input of the student"; where it enters and how it is initialised is our choice (no official code
exists): ``cond_proj`` is zero-initialised, so the student starts as the teacher's *conditional*
denoiser D_c for every w. The network sees w = s − 1 (:func:`fewstep.core.guidance.lcm_w`).
"""

from __future__ import annotations

import copy
import threading
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..core.guidance import guidance_scale_embedding, lcm_w
from ..errors import FewstepError
from .wrapped import WrappedUNet

GUIDANCE_WEIGHTS = "guidance_embedding.safetensors"  # beside diffusion_pytorch_model.safetensors in unet/


class GuidedUNet(WrappedUNet):
    """A diffusers UNet that takes the guidance scale as an input (see the module docstring).

    ``forward(sample, timestep, guidance_scale=s, **cond)``; without ``guidance_scale`` it is s = 1, the
    plain conditional denoiser (so code written for any denoiser, e.g. label inference, still works).
    For a UNet2DModel (no ``timestep_cond``)
    the projected w-features are added to the input of ``unet.time_embedding`` by a forward pre-hook
    that lives only for the duration of the call and acts only in the calling thread (no state kept
    between calls; concurrent calls from other threads, as ``fewstep serve`` makes, each add their own
    shift only); a UNet built with
    ``time_cond_proj_dim`` gets the raw embedding as ``timestep_cond`` and this module has no weights.
    """

    def __init__(self, unet: nn.Module, embedding_dim: int = 256) -> None:
        super().__init__(unet)
        self.embedding_dim = embedding_dim
        native = getattr(getattr(unet, "config", None), "time_cond_proj_dim", None)
        self.native = native is not None
        if self.native:
            if native != embedding_dim:
                raise ValueError(f"the UNet's time_cond_proj_dim is {native}, not {embedding_dim}")
            self.cond_proj = None
        else:
            features = unet.time_embedding.linear_1.in_features  # the sinusoidal timestep features
            self.cond_proj = nn.Linear(embedding_dim, features, bias=False)
            nn.init.zeros_(self.cond_proj.weight)  # start as the teacher's conditional denoiser

    def forward(self, sample: Tensor, timestep: Tensor, guidance_scale: Tensor | float | None = None, **cond):
        if guidance_scale is None:
            guidance_scale = 1.0
        w = lcm_w(torch.as_tensor(guidance_scale, dtype=torch.float32, device=sample.device).reshape(-1))
        emb = guidance_scale_embedding(w.expand(sample.shape[0]), self.embedding_dim).to(sample.dtype)
        if self.native:
            return self.unet(sample, timestep, timestep_cond=emb, **cond)
        shift, caller = self.cond_proj(emb), threading.get_ident()

        def add_w(module, args):
            if threading.get_ident() != caller:     # another thread's call of the same UNet
                return None
            return (args[0] + shift.to(args[0].dtype),) + tuple(args[1:])

        handle = self.unet.time_embedding.register_forward_pre_hook(add_w)
        try:
            return self.unet(sample, timestep, **cond)
        finally:
            handle.remove()

    # diffusers-style folder I/O, so models.save_model writes it inside its atomic folder
    def save_pretrained(self, path: str | Path, safe_serialization: bool = True) -> None:
        self.unet.save_pretrained(path, safe_serialization=True)
        if self.cond_proj is not None:
            save_file({"cond_proj.weight": self.cond_proj.weight.detach().contiguous()}, Path(path) / GUIDANCE_WEIGHTS)

    @classmethod
    def from_unet_folder(cls, unet: nn.Module, path: str | Path, embedding_dim: int) -> "GuidedUNet":
        """Wrap a UNet loaded from ``path`` and load the projection saved beside it (safetensors only)."""
        model = cls(unet, embedding_dim)
        if model.cond_proj is not None:
            file = Path(path) / GUIDANCE_WEIGHTS
            try:
                model.cond_proj.load_state_dict({"weight": load_file(file)["cond_proj.weight"]})
            except Exception as e:  # missing file, wrong shape, corrupt safetensors
                raise FewstepError(f"cannot load the guidance embedding {file} (missing or corrupt): "
                                   f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
        return model


def w_conditioned_unet(teacher_unet: nn.Module, embedding_dim: int = 256) -> nn.Module:
    """A ``UNet2DConditionModel`` teacher's UNet with a native ψ(w) input: built from its config with
    ``time_cond_proj_dim`` and loaded with its weights (diffusers' ``train_lcm_distill_sd_wds.py``). The new
    projection is zero-initialised (our choice; the script leaves it random) so the student starts as the
    teacher's conditional ε-prediction for every w. The student of LCD and of latent guided distillation."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config({**teacher_unet.config, "time_cond_proj_dim": embedding_dim})
    missing, unexpected = unet.load_state_dict(teacher_unet.state_dict(), strict=False)
    if unexpected or any(not k.startswith("time_embedding.cond_proj") for k in missing):
        raise FewstepError(f"the teacher's UNet does not fit the student built from its config "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    nn.init.zeros_(unet.time_embedding.cond_proj.weight)
    return unet


def student_takes_guidance(backbone: nn.Module) -> bool:
    """Whether :func:`guidance_conditioned`'s student of ``backbone`` takes the guidance scale as an input: a UNet's
    does (ψ(w)), a FLUX transformer's too (its guidance embedding); an SD3 transformer has no place for one."""
    from .flow_transformers import FLOW_BACKBONES, student_has_guidance

    return student_has_guidance(backbone) if type(backbone).__name__ in FLOW_BACKBONES else True


def guidance_conditioned(unet: nn.Module, embedding_dim: int = 256) -> nn.Module:
    """A copy of a teacher's UNet that takes the guidance scale, starting as the teacher's conditional
    denoiser: a ``UNet2DConditionModel`` rebuilt with its native ψ(w) input (:func:`w_conditioned_unet`),
    any other UNet (``UNet2DModel``) wrapped in :class:`GuidedUNet` with a zero-initialised projection."""
    if isinstance(unet, GuidedUNet):
        raise FewstepError("the teacher already takes the guidance scale as an input; guided distillation and LCD "
                           "start from a classifier-free-guided teacher")
    from diffusers import UNet2DConditionModel

    from .flow_transformers import FLOW_BACKBONES, flow_student

    if type(unet).__name__ in FLOW_BACKBONES:      # FLUX: its own guidance embedding; SD3: none (one scale)
        return flow_student(unet)
    if isinstance(unet, UNet2DConditionModel):
        return GuidedUNet(w_conditioned_unet(unet, embedding_dim), embedding_dim)
    return GuidedUNet(copy.deepcopy(unet), embedding_dim)
