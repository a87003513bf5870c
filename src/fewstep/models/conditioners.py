"""Conditioners: what a user asks for (class labels, prompts) as the keyword arguments of a denoiser.

Every model has one. It turns conditions into a flat dict of tensors (so classifier-free guidance can
batch the conditional and unconditional branches by concatenating each entry), knows the unconditional
input, and caches the per-image conditioning of a training set with its dropout:

- :class:`LabelConditioner`: class labels → ``class_labels`` (the null class, one past the last, is the
  unconditional branch); a model without classes is unconditional.
- :class:`TextConditioner`: prompts → ``encoder_hidden_states`` of a CLIP text encoder (the empty
  prompt is the unconditional branch), as Stable Diffusion 1.x/2.x pipelines do.
- :class:`PooledTextConditioner`: several tokenizers and encoders into text tokens and a pooled vector, by one
  ``embed`` function per family: SDXL (:class:`SDXLConditioner`, plus its size/crop ``time_ids``), FLUX (CLIP's
  pooled + T5's tokens) and SD3 (CLIP-L + CLIP-G + T5), all flat entries.

``conditioner(cond, device, size=(H, W))`` and ``null(n, device, size=...)`` take the image size being
generated: only SDXL conditions on it (its time ids); the others accept and ignore it. A negative prompt
is ``conditioner(negative_prompts, device, size=...)`` used as the unconditional branch (diffusers'
``negative_prompt``; for SDXL both embeddings are the negative prompt's, never ``force_zeros``' zeros).
"""

from __future__ import annotations

import threading
import warnings
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..errors import FewstepError
from ..objectives.base import Cond, ConditionFn, dropout_condition

_TOKENIZING = threading.Lock()
"""Held around every tokenizer call. A fast (Rust-backed) tokenizer keeps truncation and padding as state of
the one shared backend, set anew by each call, and releases the GIL while it encodes (transformers#47085,
tokenizers#537): two threads tokenizing at once (``fewstep serve``'s requests) get "Already borrowed" errors
or, worse, one call's ids padded by the other's settings — 77 ids in, 5 out, a different image."""


def padded_ids(tokenizer, prompts: Sequence[str], length: int | None = None) -> Tensor:
    """Token ids [B, L] padded (and cut) to ``length`` (default the tokenizer's ``model_max_length``), as diffusers'
    pipelines tokenize; thread-safe (:data:`_TOKENIZING`)."""
    limit = length or tokenizer.model_max_length
    with _TOKENIZING:
        return tokenizer(list(prompts), padding="max_length", max_length=limit, truncation=True,
                         return_tensors="pt").input_ids


class LabelConditioner:
    """Class labels for a class-conditional pixel model (or nothing, for an unconditional one)."""

    text = False
    pipeline: str | None = None            # the diffusers pipeline family that runs such a model (none: fewstep's own)

    def __init__(self, class_names: Sequence[str], where: str = "the model") -> None:
        self.class_names = list(class_names)
        self.where = where

    @property
    def conditional(self) -> bool:
        return bool(self.class_names)

    @property
    def null_label(self) -> int:
        return len(self.class_names)

    def check(self, cond: Any) -> Tensor:
        """Labels as a long tensor, each one of the model's classes."""
        if not self.conditional:
            raise FewstepError(f"{self.where} is unconditional; it takes no labels")
        if isinstance(cond, str) or (isinstance(cond, (list, tuple)) and any(isinstance(c, str) for c in cond)):
            raise FewstepError(f"{self.where} is a class-conditional model: give labels, not prompts")
        labels = torch.as_tensor(cond, dtype=torch.long).reshape(-1)
        bad = [int(v) for v in labels.unique() if not 0 <= v < len(self.class_names)]
        if bad:
            raise FewstepError(f"label {bad[0]} is not one of {self.where}'s classes 0..{len(self.class_names) - 1} "
                               f"({', '.join(self.class_names)})")
        return labels

    def __call__(self, labels: Tensor, device=None, size: tuple[int, int] | None = None) -> Cond:
        """``class_labels`` (``size`` is ignored: a pixel model has one size)."""
        return {"class_labels": labels.to(device)} if self.conditional else {}

    def null(self, n: int, device=None, size: tuple[int, int] | None = None) -> Cond:
        return {"class_labels": torch.full((n,), self.null_label, device=device)} if self.conditional else {}

    def null_like(self, cond: Cond) -> Cond:
        return {"class_labels": torch.full_like(cond["class_labels"], self.null_label)} if cond else {}

    def training_tensors(self, data) -> dict[str, Tensor]:
        """The per-image conditioning a training batch carries."""
        return {"labels": data.labels}

    def to(self, device) -> "LabelConditioner":
        return self

    def training_condition(self, dropout: float) -> ConditionFn:
        """batch → ``class_labels``, a share ``dropout`` of them the null label."""
        if not self.conditional:
            return lambda batch: {}
        return dropout_condition({"class_labels": "labels"}, {"class_labels": torch.tensor(self.null_label)}, dropout)


class TextConditioner:
    """Prompts through a CLIP tokenizer and text encoder (the last hidden states, as StableDiffusionPipeline
    uses them); the empty prompt's embedding is computed once."""

    text = True
    conditional = True
    pipeline: str | None = "StableDiffusionPipeline"

    def __init__(self, tokenizer, text_encoder: nn.Module, where: str = "the model") -> None:
        self.tokenizer, self.text_encoder, self.where = tokenizer, text_encoder, where
        self._empty: Tensor | None = None

    def check(self, cond: Any) -> list[str]:
        prompts = [cond] if isinstance(cond, str) else list(cond)
        if not all(isinstance(p, str) for p in prompts):
            raise FewstepError(f"{self.where} is a text-to-image pipeline: give prompts, not labels")
        return prompts

    def tokenize(self, prompts: Sequence[str]) -> Tensor:
        """Token ids padded to the tokenizer's length; a longer prompt is cut, with a warning (as diffusers'
        pipelines do), since the text encoder has no positions beyond it."""
        limit = self.tokenizer.model_max_length
        prompts = list(prompts)
        ids = padded_ids(self.tokenizer, prompts)
        with _TOKENIZING:
            lengths = [len(row) for row in self.tokenizer(prompts).input_ids]  # one batched call, untruncated
        long = [p for p, n in zip(prompts, lengths) if n > limit]
        if long:
            warnings.warn(f"{len(long)} prompt(s) longer than the tokenizer's {limit} tokens were truncated, "
                          f"e.g. {long[0][:60]!r}", stacklevel=3)
        return ids

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Tensor:
        """CLIP hidden states [B, L, D]."""
        device = next(self.text_encoder.parameters()).device
        return self.text_encoder(self.tokenize(prompts).to(device))[0]

    def empty(self) -> Tensor:
        """The empty prompt's embedding [L, D] (the unconditional branch), computed once per device."""
        device = next(self.text_encoder.parameters()).device
        if self._empty is None or self._empty.device != device:
            self._empty = self.encode([""])[0]
        return self._empty

    def __call__(self, prompts: Sequence[str], device=None, size: tuple[int, int] | None = None) -> Cond:
        """``encoder_hidden_states`` of ``prompts`` (``size`` is ignored: SD 1.x/2.x has no size conditioning)."""
        return {"encoder_hidden_states": self.encode(prompts).to(device)}

    def null(self, n: int, device=None, size: tuple[int, int] | None = None) -> Cond:
        return {"encoder_hidden_states": self.empty().to(device).expand(n, -1, -1)}

    def null_like(self, cond: Cond) -> Cond:
        c = cond["encoder_hidden_states"]
        return {"encoder_hidden_states": self.empty().to(c).expand_as(c)}

    @torch.no_grad()
    def training_tensors(self, data, batch_size: int = 256) -> dict[str, Tensor]:
        """Every caption's embedding, computed once (the text encoder stays frozen)."""
        if data.captions is None:
            raise FewstepError(f"{data.name} has no captions; a text-to-image model trains on a captioned set (emoji, "
                               f"an image folder with metadata.jsonl, a saved HF dataset or webdataset shards)")
        return {"prompt_embeds": torch.cat([self.encode(data.captions[i:i + batch_size])
                                            for i in range(0, len(data), batch_size)])}

    def training_condition(self, dropout: float) -> ConditionFn:
        """batch → the cached prompt embeddings, a share ``dropout`` of them the empty prompt's."""
        return dropout_condition({"encoder_hidden_states": "prompt_embeds"}, {"encoder_hidden_states": self.empty()},
                                 dropout)

    def to(self, device) -> "TextConditioner":
        self.text_encoder.to(device)
        return self


class PooledTextConditioner(TextConditioner):
    """Prompts through several tokenizers and text encoders into a sequence of text tokens and a pooled vector, the
    conditioning of SDXL, FLUX and SD3 (each family's ``embed``: :func:`fewstep.nets.sdxl.sdxl_embeddings`,
    :func:`fewstep.nets.flow_transformers.flux_embeddings` / ``sd3_embeddings``), as two flat entries (``keys``).
    The unconditional input is the empty prompt's embeddings, or all zeros under ``force_zeros`` (SDXL's
    ``force_zeros_for_empty_prompt``). ``lengths``: each tokenizer's padded length (default its ``model_max_length``;
    a T5 is padded to the pipeline's ``max_sequence_length``)."""

    pipeline: str | None = None
    keys = ("encoder_hidden_states", "pooled_projections")

    def __init__(self, tokenizers: Sequence, text_encoders: Sequence[nn.Module | None], embed, force_zeros: bool = False,
                 where: str = "the model", lengths: Sequence[int | None] | None = None, pipeline: str | None = None
                 ) -> None:
        super().__init__(tokenizers[0], text_encoders[0], where)
        self.tokenizers, self.text_encoders = list(tokenizers), list(text_encoders)
        self.embed, self.force_zeros = embed, force_zeros
        self.lengths = list(lengths or [None] * len(self.tokenizers))
        self.pipeline = pipeline or self.pipeline
        self._empty_pooled: Tensor | None = None

    def ids(self, prompts: Sequence[str]) -> list[Tensor]:
        """Each tokenizer's padded ids (the first warns of a truncated prompt, as diffusers' pipelines do)."""
        device = next(self.text_encoder.parameters()).device
        first = self.tokenize(prompts) if self.lengths[0] is None else padded_ids(self.tokenizers[0], prompts,
                                                                                  self.lengths[0])
        return [first.to(device)] + [padded_ids(t, prompts, n).to(device)
                                     for t, n in zip(self.tokenizers[1:], self.lengths[1:])]

    @torch.no_grad()
    def encode_both(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """(text tokens [B, L, D], pooled [B, P]) of ``prompts``."""
        return self.embed(self.text_encoders, self.ids(prompts))

    def encode(self, prompts: Sequence[str]) -> Tensor:
        return self.encode_both(prompts)[0]

    def _cond(self, hidden: Tensor, pooled: Tensor, size: tuple[int, int] | None = None) -> Cond:
        return {self.keys[0]: hidden, self.keys[1]: pooled}

    def __call__(self, prompts: Sequence[str], device=None, size: tuple[int, int] | None = None) -> Cond:
        """Both embeddings of ``prompts`` (and what ``size`` adds for a family that conditions on it)."""
        hidden, pooled = self.encode_both(prompts)
        return self._cond(hidden.to(device), pooled.to(device), size)

    def null_single(self) -> tuple[Tensor, Tensor]:
        """The unconditional (hidden [L, D], pooled [P]) — zeros under force_zeros, else the empty prompt's."""
        if self._empty is None or self._empty.device != next(self.text_encoder.parameters()).device:
            hidden, pooled = self.encode_both([""])
            self._empty, self._empty_pooled = hidden[0], pooled[0]
            if self.force_zeros:
                self._empty, self._empty_pooled = torch.zeros_like(self._empty), torch.zeros_like(self._empty_pooled)
        return self._empty, self._empty_pooled

    def empty(self) -> Tensor:
        return self.null_single()[0]

    def null(self, n: int, device=None, size: tuple[int, int] | None = None) -> Cond:
        hidden, pooled = self.null_single()
        return self._cond(hidden.to(device).expand(n, -1, -1), pooled.to(device).expand(n, -1), size)

    def null_like(self, cond: Cond) -> Cond:
        c = cond[self.keys[0]]
        hidden, pooled = self.null_single()
        return {**cond, self.keys[0]: hidden.to(c).expand_as(c), self.keys[1]: pooled.to(c).expand(len(c), -1)}

    @torch.no_grad()
    def training_tensors(self, data, batch_size: int = 256) -> dict[str, Tensor]:
        if data.captions is None:
            return super().training_tensors(data)          # the same clear error
        parts = [self.encode_both(data.captions[i:i + batch_size]) for i in range(0, len(data), batch_size)]
        return {"prompt_embeds": torch.cat([h for h, _ in parts]), "pooled_embeds": torch.cat([p for _, p in parts])}

    def training_condition(self, dropout: float) -> ConditionFn:
        """batch → both embeddings, a share ``dropout`` of them the unconditional ones."""
        hidden, pooled = self.null_single()
        drop = dropout_condition({self.keys[0]: "prompt_embeds", self.keys[1]: "pooled_embeds"},
                                 {self.keys[0]: hidden, self.keys[1]: pooled}, dropout)
        return lambda batch: self._extra(drop(batch))

    def _extra(self, cond: Cond) -> Cond:
        """What a family adds to a training condition besides the text (SDXL: its time ids)."""
        return cond

    def to(self, device) -> "PooledTextConditioner":
        for encoder in self.text_encoders:
            if encoder is not None:
                encoder.to(device)
        return self


class SDXLConditioner(PooledTextConditioner):
    """Prompts through SDXL's two tokenizers and text encoders (:func:`fewstep.nets.sdxl.sdxl_embeddings`):
    ``encoder_hidden_states`` (both penultimate layers), ``text_embeds`` (the second encoder's pooled
    projection) and ``time_ids`` (original size, crop, target size). The unconditional input is all zeros
    when the pipeline says ``force_zeros_for_empty_prompt`` (SDXL's default), else the empty prompt's."""

    pipeline = "StableDiffusionXLPipeline"
    keys = ("encoder_hidden_states", "text_embeds")

    def __init__(self, tokenizers: Sequence, text_encoders: Sequence[nn.Module], time_ids: Tensor,
                 force_zeros: bool = True, where: str = "the model") -> None:
        from ..nets.sdxl import sdxl_embeddings

        super().__init__(tokenizers, text_encoders, lambda encoders, ids: sdxl_embeddings(*encoders, *ids),
                         force_zeros, where)
        self.tokenizer_2, self.text_encoder_2 = tokenizers[1], text_encoders[1]
        self.time_ids = time_ids

    def time_ids_at(self, size: tuple[int, int] | None = None) -> Tensor:
        """The time ids [1, 6] of an image of ``size`` (H, W): original and target size ``size``, no crop
        (diffusers' defaults for ``height``/``width``); None: the ones held (the model's own size)."""
        from ..nets.sdxl import time_ids

        return self.time_ids if size is None else time_ids(tuple(size))

    def _cond(self, hidden: Tensor, pooled: Tensor, size: tuple[int, int] | None = None) -> Cond:
        return {"encoder_hidden_states": hidden, "text_embeds": pooled,
                "time_ids": self.time_ids_at(size).to(hidden).expand(len(hidden), -1)}

    def _extra(self, cond: Cond) -> Cond:
        c = cond["encoder_hidden_states"]
        return {**cond, "time_ids": self.time_ids.to(c).expand(len(c), -1)}
