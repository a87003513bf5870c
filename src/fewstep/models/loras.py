"""LoRA files: read, write and plug them into a pipeline model (peft adapters, diffusers' loader).

- :func:`save_lora`: diffusers' ``pytorch_lora_weights.safetensors`` (what ``pipe.load_lora_weights``
  takes) plus ``fewstep.json`` saying what the adapter is (an LCM acceleration vector, a style); the file's
  safetensors ``__metadata__`` says it too (:func:`lora_metadata`), so a copy outside its folder still does.
- :func:`lora_info` / :func:`resolve_lora_info`: what an adapter is, from its folder's ``fewstep.json``, else
  its file's metadata, else what the user declared (``PATH[:WEIGHT][:lcm]``, :func:`parse_lora_spec`).
- :func:`apply_loras`: θ' = θ + Σ λ_i·τ_i (Luo et al. 2023b, eq. 1–2: θ_pre + λ1·τ_style + λ2·τ_LCM):
  each file through diffusers' loader (which reads diffusers, peft and kohya/A1111 key layouts),
  combined with ``set_adapters`` weights, optionally fused into the UNet.
- :func:`save_lora_set`: the adapters and their weights kept unfused, as a folder ``--lora`` takes.

Exporting to other tools' layouts (kohya/A1111/ComfyUI, peft) is :mod:`fewstep.models.lora_export`.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..errors import FewstepError
from ..io.specs import check_lora_info as checked_lora_info
from ..io.validate import load_json
from ..io.weights import check_finite, check_weights_file
from ..nets.lora import lora_parameters
from .config import CONFIG_NAME
from .folders import load_model, pipeline_class, pipeline_of, write_folder
from .handle import Model
from .lora_layouts import flow_kohya_state, original_kohya_state, peft_unet_state

LORA_FILE = "pytorch_lora_weights.safetensors"
LORA_SET = "lora-set"                     # fewstep.json kind of an unfused set of adapters with weights
LCM_LORA, STYLE, UNKNOWN = "lcm-lora", "style", "lora"   # fewstep.json kinds of one adapter (UNKNOWN: made elsewhere)
TCD_LORA = "tcd-lora"                     # a TCD acceleration vector (Zheng et al. 2024): TCD's sampler, not LCM's
DECLARED = {"lcm": LCM_LORA, "style": STYLE, "tcd": TCD_LORA}   # PATH[:WEIGHT][:KIND] → kind
ACCELERATORS = (LCM_LORA, TCD_LORA)       # kinds that make the base a few-step model on the skipped grid
META = "fewstep_"                         # prefix of fewstep's keys in a LoRA file's safetensors __metadata__
DEFAULT_ORIGINAL_STEPS = 50               # an LCM-LoRA's grid when nothing says: 1000/20, LCMScheduler's default


class LoraSpec(tuple):
    """A ``(path, weight)`` pair, as every LoRA function takes, that also carries the kind the user declared
    for it (``PATH[:WEIGHT][:lcm|:style]``): ``kind`` is "lcm-lora", "style" or None (not declared)."""

    kind: str | None

    def __new__(cls, path: str | Path, weight: float, kind: str | None = None) -> "LoraSpec":
        spec = super().__new__(cls, (Path(path), float(weight)))
        spec.kind = kind
        return spec

    def __getnewargs__(self) -> tuple:            # copy and pickle rebuild it with its kind
        return (self[0], self[1], self.kind)

    def __repr__(self) -> str:
        return f"LoraSpec({str(self[0])!r}, {self[1]:g}{f', {self.kind!r}' if self.kind else ''})"


def declared_kind(spec: Sequence) -> str | None:
    """The kind declared with a spec (a :class:`LoraSpec`); None for a plain ``(path, weight)`` pair."""
    return getattr(spec, "kind", None)


def lora_metadata(info: dict, layout: str, rank: int | None = None, alpha: float | None = None) -> dict[str, str]:
    """What the adapter is, as safetensors ``__metadata__`` strings: ``fewstep_kind`` (fewstep.json's "kind":
    "lcm-lora" or "style"), ``fewstep_original_inference_steps`` (an LCM-LoRA's grid), ``fewstep_rank``,
    ``fewstep_alpha`` (scale α/r), ``fewstep_base`` (the base model) and ``fewstep_format`` (the key layout)."""
    fields = {"kind": info.get("kind"), "original_inference_steps": info.get("original_inference_steps"),
              "rank": rank if rank is not None else info.get("rank"), "base": info.get("base"), "format": layout}
    fields["alpha"] = alpha if alpha is not None else info.get("alpha", fields["rank"])
    return {META + k: str(v) for k, v in fields.items() if v is not None}


def metadata_info(file: Path) -> dict:
    """The :func:`lora_metadata` fields of a safetensors file, as ``fewstep.json`` would give them (numbers as
    numbers); empty when the file has none. kohya's ``ss_`` keys are not read: none of them says that a LoRA
    is an LCM-LoRA."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata() or {}
    info: dict = {}
    for key, cast in (("kind", str), ("original_inference_steps", int), ("rank", int), ("alpha", float),
                      ("base", str), ("format", str)):
        try:
            if META + key in meta:
                info[key] = cast(meta[META + key])
        except ValueError:
            continue                              # a malformed field says nothing
    return info


def backbone_prefix(backbone: nn.Module) -> str:
    """The key prefix of a backbone's adapters in diffusers' LoRA files: "unet" for a UNet, "transformer" for the
    FLUX and SD3 transformers (each pipeline's ``*_lora_layers`` argument and loader read their own)."""
    return "unet" if "UNet" in type(backbone).__name__ else "transformer"


def pipe_backbone(pipe) -> nn.Module:
    """A diffusers pipeline's denoising network: its ``unet``, or its ``transformer``."""
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def save_lora(folder: str | Path, unet: nn.Module, info: dict, readme: str = "",
              pipeline: str = "StableDiffusionPipeline") -> Path:
    """Write ``pytorch_lora_weights.safetensors`` (diffusers' layout for ``pipeline``'s family: the UNet's adapters
    under "unet.", a FLUX / SD3 transformer's under "transformer.", with :func:`lora_metadata` in its
    ``__metadata__``) and ``fewstep.json`` atomically."""
    from functools import partial

    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    # peft's key names (…to_q.lora_A.weight) under diffusers' "unet." prefix: what load_lora_weights reads
    # natively. (convert_state_dict_to_diffusers' older "…to_q.lora.down" names are silently skipped by
    # diffusers ≥ 0.3x for attention layers: the adapter would load without its attention part.)
    state = get_peft_model_state_dict(unet)
    if not all(bool(torch.isfinite(v).all()) for v in state.values()):
        raise FewstepError(f"refusing to save the LoRA {folder}: its weights are not finite (NaN or inf)")

    config = getattr(unet, "peft_config", {}).get("default")
    rank, alpha = (config.r, config.lora_alpha) if config is not None else (None, None)
    metadata = {"format": "pt", **lora_metadata(info, "diffusers", rank, alpha)}   # "format": as diffusers writes

    def write(tmp: Path) -> None:
        layers = {f"{backbone_prefix(unet)}_lora_layers": state}
        pipeline_class(pipeline).save_lora_weights(tmp, **layers, safe_serialization=True,
                                                   save_function=partial(save_file, metadata=metadata))
        (tmp / CONFIG_NAME).write_text(json.dumps(info, indent=2) + "\n")
    return write_folder(folder, write, readme)


def lora_info(path: str | Path) -> dict:
    """What the adapter is: its folder's ``fewstep.json`` (for a file, only the ``pytorch_lora_weights.safetensors``
    that :func:`save_lora` wrote beside it), else the file's :func:`metadata_info`; empty for a LoRA that says
    nothing (a file made elsewhere)."""
    path = Path(path)
    info = (path if path.is_dir() else path.parent) / CONFIG_NAME
    if info.exists() and (path.is_dir() or path.name == LORA_FILE):
        return checked_lora_info(load_json(info, "a LoRA's fewstep.json (a JSON object)"), info)
    if path.is_dir() and not any(path.glob("*.safetensors")):
        return {}
    try:
        file = lora_file(path)
        return checked_lora_info(metadata_info(file), f"{file} (its fewstep metadata)")
    except (FewstepError, OSError):
        return {}                                 # not a readable LoRA file: loading it says why


def resolve_lora_info(path: str | Path, declared: str | None = None) -> dict:
    """:func:`lora_info` with its "kind" always set: what the adapter records, else what the user declared
    (``PATH:lcm``; an LCM-LoRA then on the 50-step grid unless its file says otherwise), else "lora", treated
    as a style LoRA with a warning that says how to declare it. A declaration that contradicts the record is an
    error."""
    info = lora_info(path)
    recorded = info.get("kind")
    if recorded and declared and recorded != declared:
        raise FewstepError(f"LoRA {path} records that it is kind {recorded!r}, not {declared!r}; drop the "
                           f":{_short(declared)} after its path")
    kind = recorded or declared
    if kind is None:
        warnings.warn(f"LoRA {path} does not say what it is (no fewstep.json beside it, no fewstep_kind in its "
                      f"metadata): treated as a style LoRA, sampled with the base model's own sampler. If it is "
                      f"an LCM-LoRA, write --lora {path}:lcm (or PATH:WEIGHT:lcm)", stacklevel=2)
        kind = UNKNOWN
    out = {**info, "kind": kind}
    if kind in ACCELERATORS:
        out.setdefault("original_inference_steps", DEFAULT_ORIGINAL_STEPS)
    return out


def _short(kind: str) -> str:
    return next(k for k, v in DECLARED.items() if v == kind)


def save_lora_set(folder: str | Path, loras: Sequence[tuple[Path, float]], base: str | Path, command: str = "") -> Path:
    """θ_base + Σ λ_i·τ_i kept unfused: each adapter copied (with its ``fewstep.json``) into its own
    subfolder of ``folder``, the weights in ``folder/fewstep.json`` (kind "lora-set"). ``--lora folder`` and
    :func:`apply_loras` expand it back into its members; diffusers users load each member with its
    weight (the README says how)."""
    folder = Path(folder)
    entries: list[dict] = []

    def write(tmp: Path) -> None:
        for i, spec in enumerate(loras):
            path, weight = spec
            name = f"{i}-{path.stem if path.is_file() else path.name}"
            (tmp / name).mkdir()
            files = [path] if path.is_file() else [f for f in (path / LORA_FILE, path / CONFIG_NAME) if f.exists()]
            for f in files:
                shutil.copy2(f, tmp / name / f.name)
            info = lora_info(path)
            entries.append({"path": f"{name}/{path.name}" if path.is_file() else name, "weight": weight,
                            "kind": info.get("kind") or declared_kind(spec) or UNKNOWN, "source": str(path),
                            **{k: info[k] for k in ("original_inference_steps",) if k in info}})
        (tmp / CONFIG_NAME).write_text(json.dumps({"kind": LORA_SET, "base": str(base), "loras": entries,
                                                   "command": command}, indent=2) + "\n")
        (tmp / "README.md").write_text(_set_readme(folder, entries, base))
    return write_folder(folder, write)


def _set_readme(folder: Path, entries: list[dict], base) -> str:
    names = [f"a{i}" for i in range(len(entries))]

    def load(entry: dict, name: str) -> str:
        member = folder / entry["path"]
        if member.suffix == ".safetensors":
            return f"pipe.load_lora_weights('{member.parent}', weight_name='{member.name}', adapter_name='{name}')\n"
        return f"pipe.load_lora_weights('{member}', adapter_name='{name}')\n"

    lcm = next((e for e in entries if e["kind"] in ACCELERATORS), None)
    index = Path(base) / "model_index.json"      # the base's own pipeline class (SD, SDXL, FLUX, SD3)
    cls = (json.loads(index.read_text()).get("_class_name") if index.is_file() else None) or "StableDiffusionPipeline"
    flow = cls in ("FluxPipeline", "StableDiffusion3Pipeline")
    sched, what = ("TCDScheduler", "a TCD-LoRA") if lcm and lcm["kind"] == TCD_LORA else (
        "FlowMatchLCMScheduler" if flow else "LCMScheduler", "an LCM-LoRA")
    steps = "" if flow else f", original_inference_steps={lcm.get('original_inference_steps', 50) if lcm else 50}"
    return (f"# {folder.name}\n\nLoRAs for `{base}`, unfused, with their weights: "
            + ", ".join(f"`{e['source']}` × {e['weight']:g}" for e in entries) + ".\n\n"
            f"`fewstep sample --model {base} --lora {folder}` applies them all. In diffusers:\n\n```python\n"
            f"from diffusers import {cls}{', ' + sched if lcm else ''}\n"
            f"pipe = {cls}.from_pretrained('{base}')\n"
            + "".join(load(e, n) for e, n in zip(entries, names))
            + f"pipe.set_adapters({names}, adapter_weights={[e['weight'] for e in entries]})\n"
            + (f"pipe.scheduler = {sched}.from_config(pipe.scheduler.config{steps})  # {what} is among them\n"
               if lcm else "")
            + "```\n")


def expand_lora_sets(loras: Sequence[tuple[Path, float]]) -> list[LoraSpec]:
    """Each "lora-set" folder (:func:`save_lora_set`) replaced by its members, their weights times its own and
    their recorded kinds as declarations (a member file keeps no fewstep.json of its own)."""
    out = []
    for spec in loras:
        path, weight = spec
        info = lora_info(path) if Path(path).is_dir() else {}
        if info.get("kind") == LORA_SET:
            out += [LoraSpec(Path(path) / e["path"], weight * e["weight"],
                             e.get("kind") if e.get("kind") in DECLARED.values() else None) for e in info["loras"]]
        else:
            out.append(LoraSpec(path, weight, declared_kind(spec)))
    return out


def parse_lora_spec(spec: str) -> LoraSpec:
    """``PATH[:WEIGHT][:lcm|:style]`` → (path, λ) with the declared kind: the weight defaults to 1; ``:lcm``
    declares a LoRA file that does not say what it is (a downloaded one) an LCM-LoRA, ``:style`` a style LoRA
    (:func:`resolve_lora_info`)."""
    kind = None
    head, sep, tail = spec.rpartition(":")
    if sep and tail.lower() in DECLARED and not Path(spec).exists():
        spec, kind = head, DECLARED[tail.lower()]
    path, sep, weight = spec.rpartition(":")
    if not sep or "/" in weight:
        path, weight = spec, "1"
    try:
        value = float(weight)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value):
        raise FewstepError(f"LoRA weight {weight!r} in {spec!r} is not a {'' if value is None else 'finite '}number; "
                           f"write PATH[:WEIGHT][:lcm], e.g. models/emoji-lcm-lora:1.0")
    if not LORA_WEIGHTS[0] <= value <= LORA_WEIGHTS[1]:
        raise FewstepError(f"LoRA weight {weight} in {spec!r} is outside [{LORA_WEIGHTS[0]:g}, {LORA_WEIGHTS[1]:g}] "
                           f"(ComfyUI's range; weights are usually 0.5 to 1.5): a weight this large overflows the "
                           f"fused model; give e.g. {path}:1.0")
    if not Path(path).exists():
        raise FewstepError(f"LoRA {path} does not exist (a folder with {LORA_FILE}, or a .safetensors file)")
    return LoraSpec(path, value, kind)


PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
LORA_WEIGHTS = (-100.0, 100.0)            # λ of PATH:WEIGHT, ComfyUI's LoraLoader range


def lora_file(path: Path) -> Path:
    """The safetensors file of a LoRA (a folder with one, or the file itself); pickles are refused: loading
    one can run code (DESIGN.md §2), so fewstep reads only safetensors and says how to convert."""
    if path.is_dir():
        found = [path / LORA_FILE] if (path / LORA_FILE).exists() else sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            pickles = [p.name for p in path.iterdir() if p.suffix.lower() in PICKLES]
            raise FewstepError(_pickle_message(path / pickles[0]) if pickles else
                               f"LoRA folder {path} holds {len(found)} .safetensors files; give the file itself")
        return found[0]
    if path.suffix.lower() != ".safetensors":
        raise FewstepError(_pickle_message(path) if path.suffix.lower() in PICKLES else
                           f"LoRA {path} is not a .safetensors file (or a folder holding one)")
    return path


def _pickle_message(path: Path) -> str:
    return (f"LoRA {path} is a pickle ({path.suffix}); fewstep loads only safetensors, since loading a pickle can run "
            f"code. Convert a file you trust with: python -c \"import torch, safetensors.torch as st; "
            f"st.save_file(torch.load('{path}', weights_only=True), '{path.with_suffix('.safetensors')}')\"")


def _load(pipe, path: Path, name: str, base: Path) -> None:
    """Load one LoRA file as adapter ``name`` through diffusers' loader; a LoRA made for another base model
    (other shapes or module names, no weights for this UNet, keys it lacks) is a clear error."""
    path = lora_file(path)
    check_weights_file(path, "LoRA")              # float tensors, a sound header, every weight finite
    source, kwargs = path.parent, {"weight_name": path.name}
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # not "no LoRA keys for the text encoder": UNet-only LoRAs are the norm
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            backbone = pipe_backbone(pipe)
            state = peft_unet_state(path, backbone_prefix(backbone)) or (
                original_kohya_state(path, backbone) if hasattr(pipe, "unet") else flow_kohya_state(path, backbone))
            if state is not None:
                pipe.load_lora_weights(state, adapter_name=name)
            else:
                pipe.load_lora_weights(str(source), adapter_name=name, **kwargs)
    except Exception as e:  # diffusers/peft raise ValueError/RuntimeError/KeyError on a mismatch
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FewstepError(f"LoRA {path} does not fit {base} (made for another base model?): {first[:300]}") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    if not lora_parameters(pipe_backbone(pipe), name):
        raise FewstepError(f"LoRA {path} has no weights for {base}'s UNet (made for another base model?)")
    unexpected = [w for w in caught if "unexpected" in str(w.message).lower()]
    if unexpected:
        raise FewstepError(f"LoRA {path} has keys {base}'s UNet lacks (made for another base model?): "
                           f"{str(unexpected[0].message)[:300]}")


def apply_loras(model: Model, loras: Sequence[tuple[Path, float]], fuse: bool = True) -> Model:
    """θ' = θ + Σ λ_i·τ_i on ``model``'s UNet, as a new model (``model`` is left as it was). Every file is
    loaded onto a copy of the UNet through diffusers' loader: a LoRA made for another base model is an error
    before anything is made. With ``fuse`` the sum is folded into the weights and the adapters dropped;
    otherwise they stay as named peft adapters with their weights. An LCM acceleration vector among them
    makes the result an LCM (sampled on its skipped grid, guidance 1 by default): what each adapter is comes
    from :func:`resolve_lora_info` (its fewstep.json, its file's metadata, or the kind declared with a
    :class:`LoraSpec`). A saved set of adapters (:func:`save_lora_set`) counts as its members."""
    if not model.is_pipeline:
        raise FewstepError(f"{model.path} is not a text-to-image pipeline; LoRAs apply to those")
    loras = expand_lora_sets(loras)
    unet = copy.deepcopy(model.unet)
    pipe = pipeline_of(model, unet)
    names = [f"lora{i}" for i in range(len(loras))]
    for name, (path, _) in zip(names, loras):
        _load(pipe, path, name, model.path)
    infos = [resolve_lora_info(spec[0], declared_kind(spec)) for spec in loras]   # each one loaded: a LoRA
    pipe.set_adapters(names, adapter_weights=[w for _, w in loras])
    if fuse:
        pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
        pipe.unload_lora_weights()
        check_finite(unet.state_dict().items(), f"{model.path} with the LoRAs fused in", "lower the LoRA weights")
    changes: dict = {"loras": [*model.config.loras, *({"path": str(p), "weight": w, "kind": i["kind"]}
                                                      for (p, w), i in zip(loras, infos))]}
    accel = next((i for i in infos if i["kind"] in ACCELERATORS), None)
    check_lora_grid(accel, model)
    if accel is not None and accel["kind"] == TCD_LORA:   # TCD's ε student: the γ sampler on the skipped grid
        changes.update(kind="consistency", parameterization="tcd", default_sampler="tcd", default_steps=4,
                       default_guidance_scale=1.0, original_inference_steps=int(accel["original_inference_steps"]))
    elif accel is not None and model.config.param.space.name == "flow":   # a flow LCM-LoRA: FlowMatchLCMScheduler's
        changes.update(kind="consistency", default_sampler="consistency", default_steps=4, default_guidance_scale=1.0)
    elif accel is not None:
        changes.update(kind="consistency", parameterization="lcm", default_sampler="consistency", default_steps=4,
                       default_guidance_scale=1.0, original_inference_steps=int(accel["original_inference_steps"]))
    return model.derive(net=unet.requires_grad_(False).eval(), config=model.replace_config(**changes))


def check_lora_grid(info: dict | None, model: Model) -> None:
    """An acceleration LoRA's skipped grid fits its base's training timesteps (LCM: 50 of 1000)."""
    steps, total = (info or {}).get("original_inference_steps"), getattr(model.schedule, "num_train_timesteps", None)
    if isinstance(steps, int) and isinstance(total, int) and steps > total:
        raise FewstepError(f"LoRA {info.get('path', '')} records original_inference_steps {steps}, more than its "
                           f"base's {total} training timesteps (an LCM-LoRA's grid skips along them: 50 of 1000); "
                           f"correct its fewstep.json")


def load_with_loras(path: str | Path, loras: Sequence[str] = (), dtype: str | None = None,
                    variant: str | None = None, config: str | None = None) -> Model:
    """A model folder (or single-file checkpoint, its architecture from ``config``) with ``PATH[:WEIGHT][:lcm]``
    LoRAs fused in (each spec checked before anything loads); a pipeline's weights in ``dtype`` ("float32",
    "bfloat16", "float16") from its ``variant`` files."""
    specs = [parse_lora_spec(s) for s in loras or []]
    model = load_model(path, dtype=dtype, variant=variant, config=config)
    return apply_loras(model, specs) if specs else model
