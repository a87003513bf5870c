"""The page's messages: what a client may ask for, checked field by field, and the images sent back.

Client → server, one JSON object per WebSocket text frame::

    {"type": "generate", "id": 7, "prompt": "red apple" | "label": 3, "steps": 4, "guidance_scale": 3.0,
     "seed": 0, "num": 2, "image": "data:image/png;base64,..." | null, "strength": 0.6, "loras": [1.0, 0.5]}

Server → client: ``{"type": "hello", "info": {...}}`` on connecting (the ranges below, the LoRA sliders),
``{"type": "result", "id": 7, "images": ["data:image/png;base64,..."], "latency_ms": ..., "stats": {...}}``,
``{"type": "error", "id": 7 | null, "error": "one clear line"}`` (with ``"busy": true`` when the server was too
busy to take the request: the page sends its newest request again after a short back-off).

Every field is checked against the model's ranges (:func:`limits`); anything else — not JSON, JSON nested too
deeply, a wrong type, an unknown field, a too-long prompt, text that is not Unicode (a lone UTF-16 surrogate
such as ``"\\ud800"``: refused, not replaced, so no one is served a prompt they did not write), a non-image,
damaged or oversized upload — is a :class:`ProtocolError` with one line for the person at the page (never a
Python object's text). :func:`parse` decodes the uploaded image, so the server calls it off the event loop.
Nothing a client sends names a file: models and LoRAs are chosen when the server starts, and a request picks
LoRA *weights* by position.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ..errors import FewstepError
from .uploads import MAX_SIDE, UploadError, decode_upload

MAX_PROMPT = 500                 # characters (the tokenizer keeps 32 tokens; longer is a mistake or abuse)
MAX_NUM = 8                      # images per request
MAX_UPLOAD = 2 * 1024 * 1024     # bytes of an uploaded image
MAX_UPLOAD_SIDE = MAX_SIDE       # pixels, each side (refused from the image's header, before decoding)
MAX_SEED = 2**32 - 1
LORA_RANGE = (-2.0, 2.0)
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp")
FIELDS = {"type", "id", "prompt", "label", "steps", "guidance_scale", "seed", "num", "image", "strength", "loras"}


class ProtocolError(FewstepError):
    """A request the server refuses, with the ``id`` it carried (if any)."""

    def __init__(self, message: str, request_id: int | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


@dataclass(frozen=True)
class Request:
    """One checked generation request."""

    prompt: str | None = None        # text-to-image models
    label: int | None = None         # class-conditional pixel models (None: unconditional)
    steps: int = 4
    guidance_scale: float = 1.0
    seed: int = 0
    num: int = 1
    image: Tensor | None = field(default=None, compare=False)   # [1, C, H, W] in [−1, 1]: img2img from it
    image_digest: str = ""           # what the image is, for the result cache
    strength: float = 0.6
    loras: tuple[float, ...] = ()
    id: int | None = field(default=None, compare=False)

    def cache_key(self) -> tuple:
        """Everything the images depend on (not the id)."""
        return (self.prompt, self.label, self.steps, self.guidance_scale, self.seed, self.num, self.image_digest,
                self.strength if self.image_digest else None, self.loras)


def limits(model, lora_weights: list[float]) -> dict[str, Any]:
    """The ranges the page offers and requests are checked against, from the model's config."""
    c = model.config
    if c.serves_steps:                      # a progressive folder serves only its students' step counts
        steps = {"min": min(c.serves_steps), "max": max(c.serves_steps), "allowed": sorted(c.serves_steps)}
    else:
        steps = {"min": 1, "max": 8 if c.kind == "consistency" else 50}
    lo, hi = (c.guidance_range or [1.0, 10.0])[:2] if model.takes_guidance else (1.0, 10.0)
    lo = max(1.0, lo)                       # 1 = no guidance; below it the prompt fades out (0: ignored)
    return {"model": model.path.name, "text": model.conditioner.text, "classes": list(c.class_names),
            "conditional": model.conditioner.conditional, "channels": c.channels, "image_size": c.image_size,
            "steps": {**steps, "default": c.default_steps}, "sampler": c.default_sampler,
            "guidance": {"min": float(lo), "max": float(hi), "default": float(c.default_guidance_scale),
                         "input": model.takes_guidance},
            "loras": [{"name": lora["path"].rstrip("/").rsplit("/", 1)[-1], "kind": lora.get("kind", "lora"),
                       "weight": w} for lora, w in zip(c.loras, lora_weights)],
            "max_num": MAX_NUM, "max_prompt": MAX_PROMPT, "max_upload": MAX_UPLOAD, "lora_range": list(LORA_RANGE),
            "seed_max": MAX_SEED}


def parse(text: str | None, info: dict[str, Any]) -> Request:
    """A client's text frame → a :class:`Request`, or a :class:`ProtocolError` saying what is wrong."""
    if text is None:
        raise ProtocolError("send JSON text frames, not binary ones")
    try:
        msg = json.loads(text)
    except ValueError as e:
        raise ProtocolError(f"malformed message: not JSON ({str(e)[:120]})") from None
    except RecursionError:
        raise ProtocolError("malformed message: JSON nested too deeply (a request is one flat object)") from None
    if not isinstance(msg, dict):
        raise ProtocolError("malformed message: expected a JSON object like {\"type\": \"generate\", ...}")
    rid = msg.get("id")
    rid = rid if _is_int(rid) and abs(rid) < 2**53 else None
    try:
        return _request(msg, info, rid)
    except ProtocolError as e:
        e.request_id = rid
        raise


def _request(msg: dict, info: dict, rid: int | None) -> Request:
    unknown = sorted(set(msg) - FIELDS)
    if unknown:
        raise ProtocolError(f"unknown field {unknown[0][:40]!r}; a request has {', '.join(sorted(FIELDS))}")
    for key, value in msg.items():
        if isinstance(value, str) and not _unicode(value):
            raise ProtocolError(f"{key} is not valid text: it holds a lone UTF-16 surrogate (such as \\ud800); send "
                                f"Unicode text")
    if msg.get("type") != "generate":
        raise ProtocolError(f"unknown message type {_show(msg.get('type'))}; send {{\"type\": \"generate\", ...}}")
    if "id" in msg and rid is None:
        raise ProtocolError("id must be an integer")
    steps = _int(msg, "steps", info["steps"]["default"], info["steps"]["min"], info["steps"]["max"])
    if "allowed" in info["steps"] and steps not in info["steps"]["allowed"]:
        raise ProtocolError(f"{info['model']} serves steps {', '.join(map(str, info['steps']['allowed']))}; got {steps}")
    g = info["guidance"]
    prompt, label = _condition(msg, info)
    image, digest = _image(msg.get("image"), info)
    weights = _loras(msg.get("loras"), info["loras"])
    return Request(prompt=prompt, label=label, steps=steps,
                   guidance_scale=_number(msg, "guidance_scale", g["default"], g["min"], g["max"]),
                   seed=_int(msg, "seed", 0, 0, MAX_SEED), num=_int(msg, "num", 1, 1, MAX_NUM), image=image,
                   image_digest=digest, strength=_number(msg, "strength", 0.6, 0.0, 1.0, lo_open=True),
                   loras=weights, id=rid)


def _condition(msg: dict, info: dict) -> tuple[str | None, int | None]:
    if info["text"]:
        if "label" in msg:
            raise ProtocolError(f"{info['model']} is a text-to-image model: send a prompt, not a label")
        prompt = msg.get("prompt", "")
        if not isinstance(prompt, str):
            raise ProtocolError(f"prompt must be a string, got {type(prompt).__name__}")
        if len(prompt) > MAX_PROMPT:
            raise ProtocolError(f"prompt too long: {len(prompt):,} characters, at most {MAX_PROMPT}")
        return prompt, None
    if "prompt" in msg:
        raise ProtocolError(f"{info['model']} is a class-conditional pixel model: pick a label, not a prompt")
    label = msg.get("label")
    if label is None:
        return None, None
    if not info["conditional"]:
        raise ProtocolError(f"{info['model']} is unconditional; it takes no label")
    return None, _int(msg, "label", None, 0, len(info["classes"]) - 1)


def _loras(value: Any, sliders: list[dict]) -> tuple[float, ...]:
    if value is None:
        return tuple(float(s["weight"]) for s in sliders)
    if not isinstance(value, list) or len(value) != len(sliders):
        raise ProtocolError(f"loras must be a list of {len(sliders)} weight(s), one per LoRA the server was started "
                            f"with")
    lo, hi = LORA_RANGE
    for v in value:
        if not _is_number(v) or not lo <= v <= hi:
            raise ProtocolError(f"LoRA weights must be numbers in [{lo:g}, {hi:g}], got {_show(v)}")
    return tuple(float(v) for v in value)


def _image(value: Any, info: dict) -> tuple[Tensor | None, str]:
    """An uploaded or drawn image (a data URL) as [1, C, H, W] at the model's size, and its digest."""
    if value is None:
        return None, ""
    if not isinstance(value, str):
        raise ProtocolError("image must be a data URL string (data:image/png;base64,...) or null")
    head, sep, data = value.partition(",")
    mime = head.removeprefix("data:").removesuffix(";base64")
    if not sep or not head.startswith("data:") or not head.endswith(";base64") or mime not in IMAGE_TYPES:
        raise ProtocolError(f"image must be a base64 data URL of a {', '.join(IMAGE_TYPES)} image")
    if len(data) > MAX_UPLOAD * 4 // 3 + 4:
        raise ProtocolError(f"image too large: at most {MAX_UPLOAD // 1024 // 1024} MB")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("image is not valid base64") from None
    try:
        image = decode_upload(raw, info["channels"], info["image_size"])
    except UploadError as e:
        raise ProtocolError(str(e)) from None
    return image, hashlib.sha1(raw).hexdigest()


def _unicode(text: str) -> bool:
    """Whether ``text`` can be encoded as UTF-8 (JSON's ``\\ud800`` escapes make lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _show(v: Any) -> str:
    """A client's value, short and safe to echo: JSON for a scalar (cut at 40 characters), the kind of a container."""
    if isinstance(v, (list, dict)):
        return f"a JSON {'array' if isinstance(v, list) else 'object'}"
    text = json.dumps(v)
    return text if len(text) <= 40 else text[:39] + "…"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:          # an integer of hundreds of digits
        return False


def _int(msg: dict, key: str, default: int | None, lo: int, hi: int) -> int:
    v = msg.get(key, default)
    if not _is_int(v):
        raise ProtocolError(f"{key} must be an integer, got {_show(v)}")
    if not lo <= v <= hi:
        raise ProtocolError(f"{key} must be in {lo}..{hi}, got {_show(v)}")
    return v


def _number(msg: dict, key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = msg.get(key, default)
    if not _is_number(v):
        raise ProtocolError(f"{key} must be a finite number, got {_show(v)}")
    if v < lo or v > hi or (lo_open and v == lo):
        raise ProtocolError(f"{key} must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v:g}")
    return float(v)


def to_json(message: dict) -> str:
    """A server message as one compact JSON text (ASCII: anything a client sent is escaped)."""
    return json.dumps(message, separators=(",", ":"))

