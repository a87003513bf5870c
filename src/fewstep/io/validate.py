"""One validation layer at the edge: every JSON file fewstep reads is checked here against a declarative spec
(typed fields with bounds and what they mean) before any of it is used, so a bad value is one line that names the
file, the field, the bound and the fix, never a traceback deep inside diffusers or a silently wrong model.

- :func:`load_json`: a JSON file as an object: size-capped, UTF-8 (a BOM allowed), nesting depth-capped (a
  100,000-deep array is refused, not a RecursionError), the top level an object.
- :class:`Field` and :func:`check_fields`: the spec of one value (type, bounds, choices, items) and a record
  checked against a spec; unknown keys are refused (fewstep's own files) or ignored (diffusers' and
  transformers' configs, which carry keys of other versions).
- The specs of fewstep's files are :mod:`fewstep.io.specs` (``fewstep.json``, pipeline part configs, LoRA records,
  checkpoint states, metrics lines), written with these.
- :func:`text_lines`: the lines of a user's text file (prompts, JSON lines): BOM stripped, split only at
  ``\\n``/``\\r\\n``/``\\r`` (a U+2028 inside a prompt is not a line break), size-capped.

A leaf: it imports nothing of fewstep's but its errors (the schedule classes and registries are passed in).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..errors import FewstepError

MAX_JSON_BYTES = 64 * 2**20        # a config, a LoRA record or a checkpoint's state: kilobytes; 64 MiB is no config
MAX_DEPTH = 64                     # the deepest fewstep or diffusers writes is 4; Python's reader recurses per level
MAX_TEXT_BYTES = 16 * 2**20        # a prompts file: 16 MiB is ~200,000 prompts, 100× the images a run may make
FIX = "correct it in the file, or re-save the model with fewstep"


# --- reading -----------------------------------------------------------------------------------------
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKET = re.compile(r"[\[\]{}]")


def _depth(text: str) -> int:
    """The deepest nesting of ``[``/``{`` in JSON ``text``, outside strings (no recursion; regexes do the scan)."""
    depth = deepest = 0
    for ch in _BRACKET.findall(_STRING.sub("", text)):
        depth += 1 if ch in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def parse_json(text: str, where: str | Path, what: str = "a JSON object") -> Any:
    """JSON ``text`` (from ``where``) as Python values: nesting capped at :data:`MAX_DEPTH`, any error one line."""
    if text.count("[") + text.count("{") > MAX_DEPTH and _depth(text) > MAX_DEPTH:
        raise FewstepError(f"{where} is corrupt: its JSON is nested more than {MAX_DEPTH} levels deep, which no "
                           f"config is; expected {what}")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise FewstepError(f"{where} is corrupt: not valid JSON ({str(e).splitlines()[0][:200]}); expected {what}") \
            from None


def load_json(path: str | Path, what: str = "a JSON object", max_bytes: int = MAX_JSON_BYTES,
              require_object: bool = True) -> Any:
    """The JSON file ``path``: at most ``max_bytes``, UTF-8 (a BOM is allowed), nesting capped; by default a JSON
    object. Every problem is one :class:`FewstepError` line naming the file."""
    path = Path(path)
    text = _utf8(path, max_bytes, lambda size: f"{path} is {_bytes(size)}; {what} is far smaller (the limit is "
                 f"{_bytes(max_bytes)}): not the file fewstep expects here", f"cannot read {path}",
                 f"{path} is corrupt: not UTF-8 text", f"expected {what}")
    value = parse_json(text, path, what)
    if require_object and not isinstance(value, dict):
        raise FewstepError(f"{path} is corrupt: expected {what}, found a JSON {_kind(value)}")
    return value


def text_lines(path: str | Path, what: str = "text file", max_bytes: int = MAX_TEXT_BYTES) -> list[str]:
    """The lines of a user's UTF-8 text file: a leading BOM dropped; split at ``\\n``, ``\\r\\n`` and ``\\r`` only
    (not at U+2028/U+2029, U+0085 or form feeds, which ``str.splitlines`` takes for line breaks: a prompt holding
    one stays one prompt); at most ``max_bytes``."""
    path = Path(path)
    text = _utf8(path, max_bytes, lambda size: f"{what} {path} is {_bytes(size)}, over the limit of "
                 f"{_bytes(max_bytes)}; split it into smaller files", f"cannot read {what} {path}",
                 f"cannot read {what} {path}: not UTF-8 text", "save it as UTF-8")
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _utf8(path: Path, max_bytes: int, too_big, unreadable: str, not_utf8: str, fix: str) -> str:
    """The text of ``path``, at most ``max_bytes`` (else ``too_big(size)``), UTF-8 with a BOM allowed; each failure one
    line: ``unreadable``: the OS's reason, ``not_utf8`` (where the decoding failed); ``fix``."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise FewstepError(too_big(size))
        return path.read_bytes().decode("utf-8-sig")
    except OSError as e:
        raise FewstepError(f"{unreadable}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise FewstepError(f"{not_utf8} ({e.reason} at byte {e.start}); {fix}") from None


def _bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n} bytes"


def human_bytes(n: float) -> str:
    """``n`` bytes as a person reads it (1.5 GiB)."""
    return _bytes(n)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object", type(None): "null"}.get(type(value), type(value).__name__)


# --- the spec of one value ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Field:
    """What one JSON value may be: ``type`` ("int", "number", "str", "bool", "list", "dict", "any", or several
    joined by "|", e.g. "int|list"), numeric bounds (``lo``/``hi``, open where said), ``choices``, the spec of each
    item of a list or value of a dict (``items``), a list's length, whether null is allowed, and ``meaning``: what
    it is, in words, for the message."""

    type: str
    meaning: str = ""
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple | None = None
    items: "Field | None" = None
    length: tuple[int, int] | None = None
    null: bool = False

    def requirement(self) -> str:
        """The rule, in words: "an integer in [1, 1000]", "an integer in [1, 32] or a list of them"."""
        kinds = {"int": "an integer", "number": "a number", "str": "a string", "bool": true_false,
                 "dict": "an object", "any": "a value"}
        if self.choices is not None:
            scalar = "one of " + ", ".join(map(str, self.choices))
        else:
            scalar = " or ".join(kinds[t] for t in self.type.split("|") if t != "list")
            if scalar and (self.lo is not None or self.hi is not None):
                left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
                scalar += f" in {left}{_num(self.lo, '-inf')}, {_num(self.hi, 'inf')}{right}"
        listed = ""
        if "list" in self.type.split("|"):
            listed = "a list"
            if self.length is not None:
                lo, hi = self.length
                listed += f" of {lo} item{'s' * (lo != 1)}" if lo == hi else f" of {lo} to {hi:,} items"
            if self.items is not None:
                listed += f", each {self.items.requirement()}"
        what = " or ".join(w for w in (scalar, listed) if w)
        return what + (" (or null)" if self.null else "")


true_false = "true or false"


def _num(x: float | None, none: str) -> str:
    if x is None:
        return none
    return f"{int(x):,}" if float(x).is_integer() and abs(x) >= 1 else f"{x:g}"


def show_value(value: Any) -> str:
    try:
        text = json.dumps(value, allow_nan=True)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_ok(value: Any, kind: str) -> bool:
    if kind == "any":
        return True
    if kind == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind == "int":
        return isinstance(value, int) or isinstance(value, float) and value.is_integer() and abs(value) < 2**53
    if kind == "number":
        return isinstance(value, (int, float))
    return isinstance(value, {"str": str, "list": list, "dict": dict}[kind])


def _article(kind: str) -> str:
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def find_problem(value: Any, spec: Field, path: str = "") -> tuple[str, Any, Field, str] | None:
    """The innermost thing wrong with ``value`` under ``spec``: (its path below ``value``, e.g. "[2]" or "['2'][1]",
    the offending value, its spec, what is wrong in words), or None."""
    if value is None:
        return None if spec.null else (path, value, spec, "null")
    kind = next((k for k in spec.type.split("|") if _type_ok(value, k)), None)
    if kind is None:
        integer = "int" in spec.type.split("|") and isinstance(value, float)
        return path, value, spec, "not an integer" if integer else _article(_kind(value))
    if kind in ("int", "number"):
        if not math.isfinite(value):
            return path, value, spec, "not finite"
        if spec.lo is not None and (value <= spec.lo if spec.lo_open else value < spec.lo):
            return path, value, spec, "too small"
        if spec.hi is not None and (value >= spec.hi if spec.hi_open else value > spec.hi):
            return path, value, spec, "too large"
    if spec.choices is not None and value not in spec.choices:
        return path, value, spec, "not a known value"
    if kind == "list":
        if spec.length is not None and not spec.length[0] <= len(value) <= spec.length[1]:
            return path, value, spec, f"a list of {len(value)} item{'s' * (len(value) != 1)}"
        if spec.items is not None:
            for i, item in enumerate(value):
                inner = find_problem(item, spec.items, f"{path}[{i}]")
                if inner is not None:
                    return inner
    if kind == "dict" and spec.items is not None:
        for key, item in value.items():
            inner = find_problem(item, spec.items, f"{path}[{key!r}]")
            if inner is not None:
                return inner
    return None


def problem(value: Any, spec: Field) -> str | None:
    """What is wrong with ``value`` under ``spec``, in words, or None."""
    found = find_problem(value, spec)
    return None if found is None else (found[0] + " is " if found[0] else "") + found[3]


def field_error(where: str | Path, name: str, value: Any, spec: Field, why: str | None = None,
                fix: str = FIX) -> FewstepError:
    """The one line for a bad field: file, field (down to the bad item), its value, what it is, the rule and the
    fix."""
    found = None if why else find_problem(value, spec)
    if found is not None:
        path, value, inner, why = found
        name, spec = name + path, inner if inner.meaning or inner is spec else dataclasses.replace(
            inner, meaning=f"in {spec.meaning}" if spec.meaning else "")
    meaning = f" ({spec.meaning})" if spec.meaning else ""
    shown = "null" if value is None else f"{show_value(value)}, {why or 'invalid'}"
    return FewstepError(f"{where}: {name}{meaning} is {shown}; it must be "
                        f"{spec.requirement()} — {fix}")


def check_fields(raw: Mapping[str, Any], spec: Mapping[str, Field], where: str | Path, *, prefix: str = "",
                 unknown: str = "error", fix: str = FIX) -> None:
    """Each key of ``raw`` that ``spec`` names checked against its :class:`Field`; a key ``spec`` does not name is
    an error (``unknown`` "error": fewstep's own files, where it is a typo or a newer fewstep's) or passed over
    ("ignore": configs of diffusers/transformers, which hold other versions' keys)."""
    for key, value in raw.items():
        name = prefix + str(key)
        if key not in spec:
            if unknown == "error":
                close = difflib.get_close_matches(str(key), list(spec), n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise FewstepError(f"{where}: unknown field {name!r}; {hint}the fields are "
                                   f"{', '.join(sorted(spec))} — {fix}")
            continue
        if problem(value, spec[key]) is not None:
            raise field_error(where, name, value, spec[key], fix=fix)


def spec_of_dataclass(cls: type, known: Mapping[str, Field]) -> dict[str, Field]:
    """``known`` for the init fields of dataclass ``cls`` it names; a type-only :class:`Field` (from the field's
    default or annotation) for any other, so a field added to ``cls`` is checked for its type at least."""
    out = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name in known:
            out[f.name] = known[f.name]
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        out[f.name] = Field(_type_of(default, str(f.type)), null=default is None)
    return out


def _type_of(default: Any, annotation: str) -> str:
    if isinstance(default, bool) or annotation == "bool":
        return "bool"
    if isinstance(default, int) or annotation == "int":
        return "int"
    if isinstance(default, float) or annotation == "float":
        return "number"
    if isinstance(default, str) or annotation == "str":
        return "str"
    if isinstance(default, (list, tuple)) or annotation.startswith(("list", "tuple")):
        return "list"
    if isinstance(default, dict) or annotation.startswith("dict"):
        return "dict"
    return "any"


def json_lines(path: str | Path, what: str = "JSON-lines file", key: str | None = None) -> list[tuple[int, dict]]:
    """(line number, record) of each non-blank line of a user's JSON-lines file (``metadata.jsonl``): each a JSON
    object (with a string ``key`` where given), read with :func:`text_lines` (a BOM and U+2028 inside captions
    are fine) and :func:`parse_json` (depth-capped)."""
    out = []
    for n, line in enumerate(text_lines(path, what, max_bytes=1 << 30), 1):
        if not line.strip():
            continue
        record = parse_json(line, f"{path} line {n}", "one JSON object per line")
        if not isinstance(record, dict):
            raise FewstepError(f"{path} line {n} is a JSON {_kind(record)}; each line of a {what} is one JSON object")
        if key is not None and not isinstance(record.get(key), str):
            raise FewstepError(f"{path} line {n} needs a {key!r} string (the imagefolder convention: "
                               f'{{"{key}": "0001.png", "text": "a caption"}})')
        out.append((n, record))
    return out
