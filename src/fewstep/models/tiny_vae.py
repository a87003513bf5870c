"""A pipeline model with a tiny autoencoder (TAESD) in place of its VAE: ``--tiny-vae DIR`` of ``fewstep
sample``, ``eval`` and ``serve``. ``DIR`` is an ``AutoencoderTiny`` folder in diffusers' layout (what
``fewstep train-tiny-vae`` writes: ``config.json`` and ``diffusion_pytorch_model.safetensors``), so
``AutoencoderTiny.from_pretrained(DIR)`` loads it too; weights come from safetensors only."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..errors import FewstepError
from ..io.specs import check_part_config
from ..io.validate import load_json
from ..io.weights import check_finite, check_float_weights
from .codecs import TinyVAECodec
from .handle import Model

KIND = "tiny-vae"      # the fewstep.json kind of a tiny-autoencoder folder (a decoder: it makes no images alone)

TINY_VAE_CLASS = "AutoencoderTiny"


def load_tiny_vae(folder: str | Path):
    """The ``AutoencoderTiny`` in ``folder``, frozen; a missing, foreign or corrupt folder is one clear error."""
    from diffusers import AutoencoderTiny

    folder = Path(folder)
    config = folder / "config.json"
    if not config.is_file():
        raise FewstepError(f"tiny VAE {folder} is not an AutoencoderTiny folder (no config.json); make one with "
                           f"fewstep train-tiny-vae")
    raw = load_json(config, "a tiny VAE's config.json (a JSON object)")
    name = raw.get("_class_name")
    if name != TINY_VAE_CLASS:
        raise FewstepError(f"{folder} holds a {name}, not an {TINY_VAE_CLASS}")
    check_part_config(raw, config)                       # sizes, scaling factor (fewstep.io.validate)
    for weights in sorted(folder.glob("*.safetensors")):
        check_float_weights(weights, "tiny VAE weights")
    try:
        tiny = AutoencoderTiny.from_pretrained(folder, use_safetensors=True)
    except Exception as e:  # diffusers raises OSError/ValueError/safetensors errors for bad files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FewstepError(f"cannot load the tiny VAE in {folder} (missing or corrupt weights): {first}") from None
    check_finite(tiny.state_dict().items(), folder)
    return tiny.requires_grad_(False).eval()


def with_tiny_vae(model: Model, folder: str | Path | None) -> Model:
    """``model`` decoding (and encoding) through the tiny VAE in ``folder`` (``model`` itself for None); the
    tiny VAE must fit the pipeline's latents: channels and spatial factor."""
    if folder is None:
        return model
    if not model.is_pipeline:
        raise FewstepError(f"{model.path} is a pixel-space model; --tiny-vae replaces a pipeline's VAE")
    tiny = load_tiny_vae(folder)
    codec = TinyVAECodec(tiny, model.codec.latent_channels, model.codec.latent_size)
    if tiny.config.latent_channels != model.codec.latent_channels or codec.factor != model.codec.factor:
        raise FewstepError(f"tiny VAE {folder} has {tiny.config.latent_channels}-channel latents at 1/{codec.factor} "
                           f"scale but {model.path} has {model.codec.latent_channels} channels at 1/{model.codec.factor}: "
                           f"it was made for another pipeline")
    return dataclasses.replace(model, codec=codec.to(model.device), parts={**model.parts, "tiny_vae": tiny})
