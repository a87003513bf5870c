"""The three parts of a model, as protocols (DESIGN.md §6, "the house"): what :class:`fewstep.models.handle.Model`
and everything above it may rely on. A new model family is a conditioner, a codec and a backbone that fit these —
a diffusers transformer (``SD3Transformer2DModel``, ``FluxTransformer2DModel``) is a backbone like a UNet.

- :class:`Backbone`: the network, ``net(x, t, **cond)`` → its prediction (ε, v, F, …; a diffusers output's
  ``.sample`` is taken), called by the noise space's adapter (:mod:`fewstep.core.parameterizations`) with the
  time it was trained on.
- :class:`Conditioner`: what a user asks for (labels, prompts) → the backbone's keyword arguments, the
  unconditional input of classifier-free guidance, the training condition with dropout.
- :class:`Codec`: images ↔ the denoiser's space (the identity for pixels, a VAE for latents), and what the space
  allows (``pixels``: zero-shot editing's linear constraints; ``resizable``: other sizes than the model's own).
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

from torch import Tensor

Cond = dict[str, Tensor]


@runtime_checkable
class Backbone(Protocol):
    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Any: ...


@runtime_checkable
class Conditioner(Protocol):
    text: bool                         # takes prompts (else labels)
    conditional: bool                  # has a condition at all (an unconditional pixel model has none)
    pipeline: str | None               # the diffusers pipeline family that runs its models (None: fewstep's own)

    def check(self, cond: Any) -> Any: ...
    def __call__(self, cond: Any, device: Any = None, size: tuple[int, int] | None = None) -> Cond: ...
    def null(self, n: int, device: Any = None, size: tuple[int, int] | None = None) -> Cond: ...
    def null_like(self, cond: Cond) -> Cond: ...
    def training_tensors(self, data: Any) -> dict[str, Tensor]: ...
    def training_condition(self, dropout: float) -> Callable[[dict], Cond]: ...
    def to(self, device: Any) -> Any: ...


@runtime_checkable
class Codec(Protocol):
    pixels: bool                       # the denoiser's space is pixels
    resizable: bool                    # samples other sizes than the model's own (multiples of ``factor``)

    @property
    def shape(self) -> tuple[int, int, int]: ...
    @property
    def factor(self) -> int: ...
    def encode(self, images: Tensor) -> Tensor: ...
    def decode(self, x: Tensor) -> Tensor: ...
    def clip(self, x0: Tensor) -> Tensor: ...
    def mask(self, known: Tensor) -> Tensor: ...
    def to(self, device: Any) -> Any: ...
