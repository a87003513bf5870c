"""Conditioners: what a user asks for (class labels, prompts) as the keyword arguments of a denoiser.

Every model has one. It turns conditions into a flat dict of tensors (so classifier-free guidance can
batch the conditional and unconditional branches by concatenating each entry), knows the unconditional
input, and caches the per-image conditioning of a training set with its dropout:

- :class:`LabelConditioner`: class labels → ``class_labels`` (the null class, one past the last, is the
  unconditional branch); a model without classes is unconditional.
- :class:`TextConditioner`: prompts → ``encoder_hidden_states`` of a CLIP text encoder (the empty
  prompt is the unconditional branch), as Stable Diffusion 1.x/2.x pipelines do. An SDXL pipeline is one
  more conditioner (two encoders, pooled embeddings and size/crop ``time_ids``, all flat entries).

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


def padded_ids(tokenizer, prompts: Sequence[str]) -> Tensor:
    """Token ids [B, L] padded (and cut) to the tokenizer's ``model_max_length``, as diffusers' pipelines
    tokenize; thread-safe (:data:`_TOKENIZING`)."""
    limit = tokenizer.model_max_length
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


class SDXLConditioner(TextConditioner):
    """Prompts through SDXL's two tokenizers and text encoders (:func:`fewstep.nets.sdxl.sdxl_embeddings`):
    ``encoder_hidden_states`` (both penultimate layers), ``text_embeds`` (the second encoder's pooled
    projection) and ``time_ids`` (original size, crop, target size). The unconditional input is all zeros
    when the pipeline says ``force_zeros_for_empty_prompt`` (SDXL's default), else the empty prompt's."""

    pipeline = "StableDiffusionXLPipeline"

    def __init__(self, tokenizers: Sequence, text_encoders: Sequence[nn.Module], time_ids: Tensor,
                 force_zeros: bool = True, where: str = "the model") -> None:
        super().__init__(tokenizers[0], text_encoders[0], where)
        self.tokenizer_2, self.text_encoder_2 = tokenizers[1], text_encoders[1]
        self.time_ids, self.force_zeros = time_ids, force_zeros
        self._empty_pooled: Tensor | None = None

    @torch.no_grad()
    def encode_both(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        from ..nets.sdxl import sdxl_embeddings

        device = next(self.text_encoder.parameters()).device
        ids = self.tokenize(prompts).to(device)
        ids_2 = padded_ids(self.tokenizer_2, prompts).to(device)
        return sdxl_embeddings(self.text_encoder, self.text_encoder_2, ids, ids_2)

    def encode(self, prompts: Sequence[str]) -> Tensor:
        return self.encode_both(prompts)[0]

    def time_ids_at(self, size: tuple[int, int] | None = None) -> Tensor:
        """The time ids [1, 6] of an image of ``size`` (H, W): original and target size ``size``, no crop
        (diffusers' defaults for ``height``/``width``); None: the ones held (the model's own size)."""
        from ..nets.sdxl import time_ids

        return self.time_ids if size is None else time_ids(tuple(size))

    def _cond(self, hidden: Tensor, pooled: Tensor, size: tuple[int, int] | None = None) -> Cond:
        return {"encoder_hidden_states": hidden, "text_embeds": pooled,
                "time_ids": self.time_ids_at(size).to(hidden).expand(len(hidden), -1)}

    def __call__(self, prompts: Sequence[str], device=None, size: tuple[int, int] | None = None) -> Cond:
        """Both embeddings of ``prompts`` and the time ids of ``size`` (None: the model's own)."""
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
        c = cond["encoder_hidden_states"]
        hidden, pooled = self.null_single()
        return {"encoder_hidden_states": hidden.to(c).expand_as(c), "text_embeds": pooled.to(c).expand(len(c), -1),
                "time_ids": cond["time_ids"]}

    @torch.no_grad()
    def training_tensors(self, data, batch_size: int = 256) -> dict[str, Tensor]:
        if data.captions is None:
            return super().training_tensors(data)          # the same clear error
        parts = [self.encode_both(data.captions[i:i + batch_size]) for i in range(0, len(data), batch_size)]
        return {"prompt_embeds": torch.cat([h for h, _ in parts]), "pooled_embeds": torch.cat([p for _, p in parts])}

    def training_condition(self, dropout: float) -> ConditionFn:
        """batch → both embeddings, a share ``dropout`` of them the unconditional ones, and the time ids."""
        hidden, pooled = self.null_single()
        drop = dropout_condition({"encoder_hidden_states": "prompt_embeds", "text_embeds": "pooled_embeds"},
                                 {"encoder_hidden_states": hidden, "text_embeds": pooled}, dropout)

        def condition(batch: dict) -> Cond:
            cond = drop(batch)
            c = cond["encoder_hidden_states"]
            return {**cond, "time_ids": self.time_ids.to(c).expand(len(c), -1)}
        return condition

    def to(self, device) -> "SDXLConditioner":
        self.text_encoder.to(device)
        self.text_encoder_2.to(device)
        return self
