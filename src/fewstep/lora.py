"""LoRA adapters on a pipeline's UNet (peft), in the formats people exchange (diffusers, peft, kohya).

- :func:`add_lora`: peft LoRA on the reference set of LCM-LoRA modules (diffusers'
  ``train_lcm_distill_lora_sd_wds.py``: attention projections, feed-forward, resnet convolutions,
  down/up-samplers, the resnets' time-embedding projections).
- :func:`save_lora`: diffusers' ``pytorch_lora_weights.safetensors`` (what ``pipe.load_lora_weights``
  takes) plus ``fewstep.json`` saying what the adapter is (an LCM acceleration vector, a style).
- :func:`apply_loras`: θ' = θ + Σ λ_i·τ_i (Luo et al. 2023b, eq. 1–2: θ_pre + λ1·τ_style + λ2·τ_LCM):
  each file through diffusers' loader (which reads diffusers, peft and kohya/A1111 key layouts),
  combined with ``set_adapters`` weights, optionally fused into the UNet. Every file is loaded onto a
  copy of the UNet that replaces the original only when all have loaded, so a LoRA for another base
  model is a clear error before any weight changes.
"""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from .atomic import atomic_path
from .errors import FewstepError
from .objectives import unwrap
from .sd import CONFIG_NAME, LatentModel, pipeline_class

LORA_FILE = "pytorch_lora_weights.safetensors"
LORA_SET = "lora-set"                     # fewstep.json kind of an unfused set of adapters with weights
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


def add_lora(unet: nn.Module, rank: int = 8, alpha: float | None = None,
             targets: Sequence[str] = LORA_TARGETS, adapter_name: str = "default") -> list[nn.Parameter]:
    """Add a peft LoRA adapter (B zero-initialised: the model is unchanged until it trains) and
    freeze everything else; returns the adapter's parameters."""
    from peft import LoraConfig

    if rank < 1:
        raise FewstepError(f"LoRA rank must be at least 1, got {rank}")
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                                target_modules=list(targets)), adapter_name=adapter_name)
    params = lora_parameters(unet)
    if not params:
        raise FewstepError(f"no module of the UNet matches the LoRA targets {', '.join(targets)}")
    for p in params:
        p.requires_grad_(True)
    return params


def save_lora(folder: str | Path, unet: nn.Module, info: dict, readme: str = "") -> Path:
    """Write ``pytorch_lora_weights.safetensors`` (diffusers' layout) and ``fewstep.json`` atomically."""
    from peft.utils import get_peft_model_state_dict

    # peft's key names (…to_q.lora_A.weight) under diffusers' "unet." prefix: what load_lora_weights reads
    # natively. (convert_state_dict_to_diffusers' older "…to_q.lora.down" names are silently skipped by
    # diffusers ≥ 0.3x for attention layers: the adapter would load without its attention part.)
    state = get_peft_model_state_dict(unet)
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder, directory=True) as tmp:
        pipeline_class().save_lora_weights(tmp, unet_lora_layers=state, safe_serialization=True)
        (tmp / CONFIG_NAME).write_text(json.dumps(info, indent=2) + "\n")
        if readme:
            (tmp / "README.md").write_text(readme)
    return folder


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
    folder.parent.mkdir(parents=True, exist_ok=True)
    entries = []
    with atomic_path(folder, directory=True) as tmp:
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
    return folder


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
        raise FewstepError(f"LoRA weight {weight!r} in {spec!r} is not a number; write PATH:WEIGHT, e.g. "
                           f"models/emoji-lcm-lora:1.0") from None
    if not Path(path).exists():
        raise FewstepError(f"LoRA {path} does not exist (a folder with {LORA_FILE}, or a .safetensors file)")
    return Path(path), value


def _pipeline(model: LatentModel, unet: nn.Module):
    from diffusers import DDIMScheduler

    return pipeline_class()(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                            unet=unet, scheduler=DDIMScheduler.from_config(model.scheduler_config),
                            safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _load(pipe, path: Path, name: str, base: Path) -> None:
    """Load one LoRA file as adapter ``name`` through diffusers' loader; a LoRA made for another base model
    (other shapes or module names, no weights for this UNet, keys it lacks) is a clear error."""
    kwargs = {"weight_name": path.name} if path.is_file() else {}
    source = path.parent if path.is_file() else path
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


def apply_loras(model: LatentModel, loras: Sequence[tuple[Path, float]], fuse: bool = True) -> LatentModel:
    """θ' = θ + Σ λ_i·τ_i on ``model``'s UNet. Every file is loaded onto a copy of the UNet, which replaces
    ``model.unet`` only once all have loaded: a LoRA made for another base model is an error before any
    weight changes. With ``fuse`` the sum is folded into the weights and the adapters dropped; otherwise
    they stay as named peft adapters with their weights. An LCM acceleration vector among them makes the
    result an LCM (sampled on its skipped grid). A saved set of adapters (:func:`save_lora_set`) counts as
    its members."""
    loras = expand_lora_sets(loras)
    unet = copy.deepcopy(model.unet)
    pipe = _pipeline(model, unet)
    names = [f"lora{i}" for i in range(len(loras))]
    for name, (path, _) in zip(names, loras):
        _load(pipe, path, name, model.path)
    pipe.set_adapters(names, adapter_weights=[w for _, w in loras])
    if fuse:
        pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
        pipe.unload_lora_weights()
    model.unet = unet.requires_grad_(False).eval()
    infos = [lora_info(p) for p, _ in loras]
    accel = next((i for i in infos if i.get("kind") == "lcm-lora"), None)
    model.info = {**model.info, "loras": [{"path": str(p), "weight": w, "kind": i.get("kind", "lora")}
                                          for (p, w), i in zip(loras, infos)]}
    if accel is not None:
        model.info.update(kind="lcm", default_sampler="consistency", default_steps=4, default_guidance_scale=1.0,
                          original_inference_steps=accel["original_inference_steps"])
        model.scheduler_config = {**model.scheduler_config, "original_inference_steps": accel["original_inference_steps"]}
    return model


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
                t.copy_(p)
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


def train_style_lora(base: LatentModel, data, out: str | Path, config, rank: int = 8, caption_dropout: float = 0.1,
                     command: str = "") -> Path | None:
    """A style LoRA τ_style: the ordinary ε-prediction diffusion loss (:class:`fewstep.objectives.DenoisingLoss`)
    on ``data``'s VAE latents and cached prompt embeddings, only the adapters trained (the text encoder
    and VAE frozen), captions dropped to the empty prompt so CFG keeps working. Saved like any LoRA."""
    from dataclasses import asdict, replace

    from .denoisers import VPDenoiser
    from .lcm import latent_training_data
    from .objectives import DenoisingLoss
    from .train import train

    tensors = latent_training_data(base, data)
    empty = base.encode_prompts([""])[0]
    params = add_lora(base.unet, rank)
    model = VPDenoiser(base.unet.train(), base.schedule, base.prediction_type)
    objective = DenoisingLoss(base.schedule, null_label=empty, label_dropout=caption_dropout,
                              batch_key="prompt_embeds", cond_key="encoder_hidden_states")
    config = replace(config, extra={"rank": rank, "caption_dropout": caption_dropout, "dataset": data.name})
    result = train(model, objective, tensors, config, params=params)
    from accelerate.state import PartialState
    if not PartialState().is_main_process:
        return None
    lora, total = trainable_fraction(result.ema.net)
    info = {"kind": "style", "base": str(base.path), "dataset": data.name, "rank": rank, "trainable_parameters": lora,
            "base_parameters": total,
            "training": {"command": command, "steps": result.step, "final_loss": result.last_loss,
                         "wall_seconds": round(result.seconds, 1), "config": asdict(config)}}
    readme = (f"# {Path(out).name}\n\nA style LoRA for `{base.path}` fine-tuned on `{data.name}` ({len(data)} images), "
              f"rank {rank}. Combine it with an LCM-LoRA and sample in 4 steps with no further training:\n\n"
              f"```\nfewstep sample --model {base.path} --lora {out}:1.0 --lora models/emoji-lcm-lora:1.0 --steps 4\n```\n\n"
              f"Trained with:\n\n```\n{command}\n```\n")
    return save_lora(out, result.ema.net, info, readme)
