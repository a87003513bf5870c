"""LoRA files: read, write and plug them into a pipeline model (peft adapters, diffusers' loader).

- :func:`save_lora`: diffusers' ``pytorch_lora_weights.safetensors`` (what ``pipe.load_lora_weights``
  takes) plus ``fewstep.json`` saying what the adapter is (an LCM acceleration vector, a style).
- :func:`apply_loras`: θ' = θ + Σ λ_i·τ_i (Luo et al. 2023b, eq. 1–2: θ_pre + λ1·τ_style + λ2·τ_LCM):
  each file through diffusers' loader (which reads diffusers, peft and kohya/A1111 key layouts),
  combined with ``set_adapters`` weights, optionally fused into the UNet.
- :func:`save_lora_set`: the adapters and their weights kept unfused, as a folder ``--lora`` takes.
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
from ..nets.lora import lora_parameters
from .config import CONFIG_NAME
from .folders import load_model, pipeline_class, pipeline_of, write_folder
from .handle import Model

LORA_FILE = "pytorch_lora_weights.safetensors"
LORA_SET = "lora-set"                     # fewstep.json kind of an unfused set of adapters with weights


def save_lora(folder: str | Path, unet: nn.Module, info: dict, readme: str = "") -> Path:
    """Write ``pytorch_lora_weights.safetensors`` (diffusers' layout) and ``fewstep.json`` atomically."""
    from peft.utils import get_peft_model_state_dict

    # peft's key names (…to_q.lora_A.weight) under diffusers' "unet." prefix: what load_lora_weights reads
    # natively. (convert_state_dict_to_diffusers' older "…to_q.lora.down" names are silently skipped by
    # diffusers ≥ 0.3x for attention layers: the adapter would load without its attention part.)
    state = get_peft_model_state_dict(unet)
    if not all(bool(torch.isfinite(v).all()) for v in state.values()):
        raise FewstepError(f"refusing to save the LoRA {folder}: its weights are not finite (NaN or inf)")

    def write(tmp: Path) -> None:
        pipeline_class().save_lora_weights(tmp, unet_lora_layers=state, safe_serialization=True)
        (tmp / CONFIG_NAME).write_text(json.dumps(info, indent=2) + "\n")
    return write_folder(folder, write, readme)


def lora_info(path: str | Path) -> dict:
    """The adapter's ``fewstep.json`` (empty for a LoRA file made elsewhere)."""
    path = Path(path)
    info = (path if path.is_dir() else path.parent) / CONFIG_NAME
    return json.loads(info.read_text()) if info.exists() else {}


def save_lora_set(folder: str | Path, loras: Sequence[tuple[Path, float]], base: str | Path, command: str = "") -> Path:
    """θ_base + Σ λ_i·τ_i kept unfused: each adapter copied (with its ``fewstep.json``) into its own
    subfolder of ``folder``, the weights in ``folder/fewstep.json`` (kind "lora-set"). ``--lora folder`` and
    :func:`apply_loras` expand it back into its members; diffusers users load each member with its
    weight (the README says how)."""
    folder = Path(folder)
    entries: list[dict] = []

    def write(tmp: Path) -> None:
        for i, (path, weight) in enumerate(loras):
            name = f"{i}-{path.stem if path.is_file() else path.name}"
            (tmp / name).mkdir()
            files = [path] if path.is_file() else [f for f in (path / LORA_FILE, path / CONFIG_NAME) if f.exists()]
            for f in files:
                shutil.copy2(f, tmp / name / f.name)
            info = lora_info(path)
            entries.append({"path": f"{name}/{path.name}" if path.is_file() else name, "weight": weight,
                            "kind": info.get("kind", "lora"), "source": str(path),
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

    lcm = next((e for e in entries if e["kind"] == "lcm-lora"), None)
    return (f"# {folder.name}\n\nLoRAs for `{base}`, unfused, with their weights: "
            + ", ".join(f"`{e['source']}` × {e['weight']:g}" for e in entries) + ".\n\n"
            f"`fewstep sample --model {base} --lora {folder}` applies them all. In diffusers:\n\n```python\n"
            f"from diffusers import StableDiffusionPipeline{', LCMScheduler' if lcm else ''}\n"
            f"pipe = StableDiffusionPipeline.from_pretrained('{base}')\n"
            + "".join(load(e, n) for e, n in zip(entries, names))
            + f"pipe.set_adapters({names}, adapter_weights={[e['weight'] for e in entries]})\n"
            + (f"pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps="
               f"{lcm.get('original_inference_steps', 50)})  # an LCM-LoRA is among them\n" if lcm else "")
            + "```\n")


def expand_lora_sets(loras: Sequence[tuple[Path, float]]) -> list[tuple[Path, float]]:
    """Each "lora-set" folder (:func:`save_lora_set`) replaced by its members, their weights times its own."""
    out = []
    for path, weight in loras:
        info = lora_info(path) if Path(path).is_dir() else {}
        if info.get("kind") == LORA_SET:
            out += [(Path(path) / e["path"], weight * e["weight"]) for e in info["loras"]]
        else:
            out.append((Path(path), weight))
    return out


def parse_lora_spec(spec: str) -> tuple[Path, float]:
    """``PATH[:WEIGHT]`` → (path, λ); the weight defaults to 1."""
    path, sep, weight = spec.rpartition(":")
    if not sep or "/" in weight:
        path, weight = spec, "1"
    try:
        value = float(weight)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value):
        raise FewstepError(f"LoRA weight {weight!r} in {spec!r} is not a {'' if value is None else 'finite '}number; "
                           f"write PATH:WEIGHT, e.g. models/emoji-lcm-lora:1.0")
    if not Path(path).exists():
        raise FewstepError(f"LoRA {path} does not exist (a folder with {LORA_FILE}, or a .safetensors file)")
    return Path(path), value


PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


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
    source, kwargs = path.parent, {"weight_name": path.name}
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # not "no LoRA keys for the text encoder": UNet-only LoRAs are the norm
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(source), adapter_name=name, **kwargs)
    except Exception as e:  # diffusers/peft raise ValueError/RuntimeError/KeyError on a mismatch
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FewstepError(f"LoRA {path} does not fit {base} (made for another base model?): {first[:300]}") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    if not lora_parameters(pipe.unet, name):
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
    makes the result an LCM (sampled on its skipped grid, guidance 1 by default). A saved set of adapters
    (:func:`save_lora_set`) counts as its members."""
    if not model.is_pipeline:
        raise FewstepError(f"{model.path} is not a text-to-image pipeline; LoRAs apply to those")
    loras = expand_lora_sets(loras)
    unet = copy.deepcopy(model.unet)
    pipe = pipeline_of(model, unet)
    names = [f"lora{i}" for i in range(len(loras))]
    for name, (path, _) in zip(names, loras):
        _load(pipe, path, name, model.path)
    pipe.set_adapters(names, adapter_weights=[w for _, w in loras])
    if fuse:
        pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
        pipe.unload_lora_weights()
    infos = [lora_info(p) for p, _ in loras]
    changes: dict = {"loras": [*model.config.loras, *({"path": str(p), "weight": w, "kind": i.get("kind", "lora")}
                                                      for (p, w), i in zip(loras, infos))]}
    accel = next((i for i in infos if i.get("kind") == "lcm-lora"), None)
    if accel is not None:
        changes.update(kind="consistency", parameterization="lcm", default_sampler="consistency", default_steps=4,
                       default_guidance_scale=1.0, original_inference_steps=int(accel["original_inference_steps"]))
    return model.derive(net=unet.requires_grad_(False).eval(), config=model.replace_config(**changes))


def load_with_loras(path: str | Path, loras: Sequence[str] = ()) -> Model:
    """A model folder with ``PATH[:WEIGHT]`` LoRAs fused in (each spec checked before anything loads)."""
    specs = [parse_lora_spec(s) for s in loras or []]
    model = load_model(path)
    return apply_loras(model, specs) if specs else model
