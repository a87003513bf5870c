"""LoRA sliders served from fused weights: θ = θ_pre + Σ_i λ_i·ΔW_i (Luo et al. 2023b, eq. 1–2), re-fused when a
client's slider weights change, so a slider costs nothing per network call.

- **What a fuse computes** is what diffusers' ``set_adapters(names, weights)`` then ``fuse_lora`` compute: peft's
  ``LoraLayer.merge`` adds ``get_delta_weight(a)`` = B_a·A_a·scaling_a to the base layer's weight for each adapter,
  with ``set_adapters``' scaling_a = λ_a·α_a/r_a (α_a/√r_a under rsLoRA). Here each adapter's unit delta
  ΔW_a = B_a·A_a·α_a/r_a is computed once per adapted layer, by peft's own ``get_delta_weight`` at λ = 1 (so every
  layer kind peft merges — Linear, 1×1 and k×k Conv2d, ``fan_in_fan_out`` — is done its way), and a fuse is
  W = θ_pre + Σ_a λ_a·ΔW_a: adds, no matmul. A test checks it against diffusers' ``fuse_lora`` at several
  settings. Adapters peft merges some other way (DoRA and the other ``lora_variant``\\s, ``lora_bias``) are
  refused (:class:`Unsupported`): the engine then serves them unfused.
- **Never a torn mix**: a fused state (:class:`Fused`) is new tensors, never written after it is made; a request
  takes the state of its weights when it starts and holds it to its end, and a re-fuse makes another state, so
  a request in flight finishes on the weights it started with, whatever the sliders do meanwhile. States are
  kept in a small LRU (``keep``); one evicted while a request holds it lives on until that request ends.
- **Answered unfused until ready**: :meth:`FusedSliders.get` returns the state if it is fused and otherwise asks the
  fusing thread for it and returns None; the engine then answers with peft's unfused adapters at those same
  weights (the image already follows the slider; only slower). The fusing thread takes the newest wanted weights
  only, so dragging a slider fuses where it settles, not every value it passed. Where the last fuse took at most
  ``inline`` seconds (20 ms: ``emoji-sd``'s two adapters fuse in ~7 ms on one thread, while the unfused path adds
  ~80 ms to its 4-step image), the request fuses its weights itself, in its own thread (never the batcher's), and
  runs fused at once.
- **One network for every state**: the served network is a plain copy of the UNet (diffusers' ``unload_lora``:
  each peft layer replaced by its base layer; every tensor shared with the unfused model, nothing copied) whose
  adapted weights are *inputs* of the call (:meth:`FusedSliders.__call__` puts them in place for the call), so
  one trace (:class:`fewstep.serve.traced.Traced` with ``weighted=True``) serves every slider state, and eager is the
  checked fallback as for a plain model.

Memory: one unit delta per adapter and adapted layer, and one set of adapted weights per kept state: for two
adapters and ``keep`` = 4, about six times the adapted weights (a few MB for ``emoji-sd``; ``--no-fuse`` keeps
none, for a large base on a small machine). On ONNX Runtime (:mod:`fewstep.serve.traced`) the session holds a
copy of the network's weights, and each state bound into a session of its own (two at most) another.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import FewstepError
from ..models.handle import Model

log = logging.getLogger("fewstep.serve")


class Unsupported(FewstepError):
    """Adapters that this module cannot fuse as peft would (the engine serves them unfused)."""


@dataclass(frozen=True, eq=False)
class Fused:
    """One slider state: its weights λ and the adapted layers' fused weights, in :attr:`FusedSliders.modules`'
    order. Never written after it is made."""

    weights: tuple[float, ...]
    tensors: tuple[Tensor, ...]


def lora_layers(unet: nn.Module) -> dict[str, nn.Module]:
    """The peft LoRA layers of ``unet`` by their module names."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in unet.named_modules() if isinstance(m, LoraLayer)}


def unit_delta(layer, adapter: str) -> Tensor | None:
    """ΔW = B·A·α/r of ``adapter`` in ``layer``: peft's ``get_delta_weight`` at weight λ = 1 (None where the adapter
    does not adapt this layer), called on a shallow copy of the layer whose scaling peft's ``set_scale`` sets to
    λ = 1, so the layer itself (maybe serving unfused requests meanwhile) is never touched."""
    if adapter not in layer.lora_A:
        return None
    if adapter in getattr(layer, "lora_variant", {}) or getattr(layer, "lora_bias", {}).get(adapter, False) \
            or getattr(layer, "use_dora", {}).get(adapter, False):
        raise Unsupported(f"adapter {adapter} of {type(layer).__name__} is a LoRA variant (DoRA or a LoRA bias) that "
                          f"peft merges its own way")
    if not isinstance(layer.get_base_layer(), (nn.Linear, nn.Conv2d)):
        raise Unsupported(f"adapter {adapter} adapts a {type(layer.get_base_layer()).__name__}, not a Linear or Conv2d")
    shadow = copy.copy(layer)                  # the same A, B and base layer; a scaling dict of its own
    shadow.scaling = dict(layer.scaling)
    shadow.set_scale(adapter, 1.0)             # α/r (α/√r under rsLoRA), as set_adapters sets λ·α/r
    return shadow.get_delta_weight(adapter).detach().clone()


class FusedSliders:
    """Fused weights for the LoRA sliders of ``model`` (whose backbone carries the unfused peft adapters
    ``names``), one :class:`Fused` state per slider setting, and the network that runs them (module docstring)."""

    def __init__(self, model: Model, names: Sequence[str], keep: int = 4, inline: float = 0.02) -> None:
        self.names, self.keep, self.inline = tuple(names), keep, inline
        self.last_fuse_seconds: float | None = None          # unknown until the first fuse
        unet = model.backbone
        peft = lora_layers(unet)
        if not peft:
            raise Unsupported("the model has no peft LoRA layers")
        if any(layer.merged for layer in peft.values()):
            raise Unsupported("the adapters are already merged into the weights")
        with torch.no_grad():
            self.deltas = [tuple(unit_delta(layer, a) for a in self.names) for layer in peft.values()]
        # the plain network: the UNet's structure copied, every parameter and buffer shared (the memo), and
        # diffusers' own unload_lora replacing each peft layer by its base layer
        shared = {id(t): t for t in (*unet.parameters(), *unet.buffers())}
        plain = copy.deepcopy(unet, shared)
        plain.unload_lora()
        self.model = model.derive(net=plain.requires_grad_(False).eval())
        self.modules = [plain.get_submodule(name) for name in peft]       # the adapted base layers, plain
        self.base = tuple(m.weight.detach() for m in self.modules)        # θ_pre (shared, never written)
        self.denoiser = self.model.denoiser
        self._states: OrderedDict[tuple[float, ...], Fused] = OrderedDict()
        self._cond = threading.Condition()
        self._wanted: tuple[float, ...] | None = None
        self._stopped = False
        self.fuses = 0
        self._thread = threading.Thread(target=self._loop, name="fewstep-fuse", daemon=True)
        self._thread.start()

    # --- states --------------------------------------------------------------------------------------
    def get(self, weights: Sequence[float]) -> Fused | None:
        """The fused state of ``weights`` if it is ready, or fused now in the calling thread when the last fuse took
        at most ``inline`` seconds; otherwise None, and the fusing thread is asked for it (only the newest weights
        asked for are fused next)."""
        weights = tuple(float(w) for w in weights)
        with self._cond:
            state = self._states.get(weights)
            if state is not None:
                self._states.move_to_end(weights)
                return state
            last = self.last_fuse_seconds
            if last is None or last > self.inline:            # not known to be cheap: the fusing thread's job
                if not self._stopped:
                    self._wanted = weights
                    self._cond.notify_all()
                return None
        return self.fuse(weights)                             # cheap: fused here, by this request

    def fuse(self, weights: Sequence[float]) -> Fused:
        """The fused state of ``weights``, computed now if it is not kept (in the calling thread)."""
        weights = tuple(float(w) for w in weights)
        if len(weights) != len(self.names):
            raise ValueError(f"{len(self.names)} slider weight(s) expected, got {len(weights)}")
        with self._cond:
            if weights in self._states:
                return self._states[weights]
        started = time.perf_counter()
        state = Fused(weights, self._fused_tensors(weights))
        with self._cond:
            self.last_fuse_seconds = time.perf_counter() - started
            state = self._states.setdefault(weights, state)
            self._states.move_to_end(weights)
            while len(self._states) > self.keep:
                self._states.popitem(last=False)
            self.fuses += 1
            self._cond.notify_all()
        return state

    @torch.no_grad()
    def _fused_tensors(self, weights: tuple[float, ...]) -> tuple[Tensor, ...]:
        """θ_pre + Σ_a λ_a·ΔW_a for every adapted layer, into new tensors (θ_pre and the deltas are only read)."""
        out = []
        for base, deltas in zip(self.base, self.deltas):
            w = base.clone()
            for lam, delta in zip(weights, deltas):
                if delta is not None and lam != 0.0:
                    w.add_(delta, alpha=lam)
            out.append(w)
        return tuple(out)

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._wanted is not None or self._stopped)
                if self._stopped:
                    return
                weights, self._wanted = self._wanted, None
            try:
                self.fuse(weights)
            except Exception:  # a fuse that fails leaves those weights unfused (served by peft); logged once each
                log.exception("fusing the LoRA sliders at %s failed; they are served unfused", weights)

    def close(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout=5)

    # --- the network ---------------------------------------------------------------------------------
    def __call__(self, tensors: Sequence[Tensor], *args: Tensor, **kwargs: Tensor) -> Tensor:
        """The plain denoiser with ``tensors`` (a :class:`Fused` state's) as its adapted layers' weights, for this
        call only. Called from one thread at a time (the batcher's), as the module is shared between calls."""
        saved = [m._parameters["weight"] for m in self.modules]
        try:
            for module, weight in zip(self.modules, tensors):
                module._parameters["weight"] = weight
            return self.denoiser(*args, **kwargs)
        finally:
            for module, weight in zip(self.modules, saved):
                module._parameters["weight"] = weight

    def backbone_state(self, state: Fused) -> dict[str, Tensor]:
        """The plain backbone's state dict with ``state``'s fused weights: what diffusers' ``fuse_lora`` then
        ``unload_lora_weights`` leave in the UNet (the tests compare them)."""
        fused = {id(m): t for m, t in zip(self.modules, state.tensors)}
        out = {}
        for name, module in self.model.backbone.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                out[f"{name}.{pname}" if name else pname] = fused.get(id(module), p) if pname == "weight" else p
            for bname, b in module.named_buffers(recurse=False):
                out[f"{name}.{bname}" if name else bname] = b
        return out
