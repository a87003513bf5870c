"""A model folder checked before anything in it is built or loaded, and its weights once loaded
(:func:`fewstep.models.folders.load_model` calls both).

:func:`check_folder`: every JSON config of the folder's parts (``model_index.json``, ``unet/config.json``,
``vae/config.json``, ``text_encoder/config.json``, ``transformer/config.json``, ``scheduler/scheduler_config.json``,
…) read with the size/depth caps of :func:`fewstep.io.validate.load_json` and checked against
:data:`fewstep.io.specs.PART_CONFIG`; every ``.safetensors`` header of the parts read and checked
(:func:`fewstep.io.weights.check_float_weights`); for a pixel model folder, ``fewstep.json`` against the UNet it
describes (image size, channels, classes). :func:`check_loaded`: every weight of the loaded networks finite.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import FewstepError
from ..io.specs import check_part_config
from ..io.validate import load_json
from ..io.weights import check_finite, check_float_weights, read_header

CONFIG_FILES = ("config.json", "scheduler_config.json")


def parts(folder: Path) -> list[Path]:
    """The part folders of a model folder: the folder itself's ``unet/``, ``vae/``, … (any sub-folder holding a
    ``config.json`` or ``scheduler_config.json``)."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and any((p / c).is_file() for c in CONFIG_FILES))


def check_folder(folder: str | Path) -> None:
    """Every config and weights header of ``folder``'s parts (module docstring), before diffusers reads any."""
    from .config import CONFIG_NAME, parse_config

    folder = Path(folder)
    if (folder / CONFIG_NAME).is_file():              # fewstep's record first: its every field (fewstep.io.validate)
        parse_config(load_json(folder / CONFIG_NAME), folder / CONFIG_NAME)
    if (folder / "model_index.json").is_file():
        load_json(folder / "model_index.json", "a diffusers model_index.json (a JSON object)")
    for part in parts(folder):
        for name in CONFIG_FILES:
            if (part / name).is_file():
                check_part_config(load_json(part / name, f"a {name} (a JSON object)"), part / name)
        for weights in sorted(part.glob("*.safetensors")):
            own = weights.name.split(".")[0] in ("diffusion_pytorch_model", "model")
            check_float_weights(weights, f"{part.name} weights" if own else             # e.g. a guided UNet's
                                f"{part.name}'s {weights.name.split('.')[0].replace('_', ' ')}")   # guidance embedding
    if not (folder / "model_index.json").is_file() and (folder / "fewstep.json").is_file() \
            and (folder / "unet" / "config.json").is_file():
        _check_pixel(folder)


def _check_pixel(folder: Path) -> None:
    """A pixel model's fewstep.json against its UNet's config: the image size and channels it was built for, and
    classes it embeds (one more than the classes: the unconditional label)."""
    record, unet = load_json(folder / "fewstep.json"), load_json(folder / "unet" / "config.json")
    fix = "the two files disagree: correct fewstep.json, or re-save the model with fewstep"

    def number(raw: dict, key: str):
        value = raw.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    for ours, theirs, what in (("image_size", "sample_size", "images"), ("channels", "in_channels", "channels")):
        a, b = number(record, ours), number(unet, theirs)
        if a is not None and b is not None and a != b:
            raise FewstepError(f"{folder / 'fewstep.json'}: {ours} is {a}, but unet/config.json's {theirs} is {b} (the "
                               f"UNet was built for {b}{'²' if ours == 'image_size' else ''} {what}) — {fix}")
    names, embeds = record.get("class_names"), unet.get("num_class_embeds", None)
    if isinstance(names, list) and (embeds is None or isinstance(embeds, int)):
        if names and (embeds is None or embeds < len(names) + 1):
            raise FewstepError(f"{folder / 'fewstep.json'}: class_names lists {len(names)} classes, but the UNet embeds "
                               f"{embeds or 0} labels (it needs {len(names) + 1}: the classes and the unconditional "
                               f"one) — {fix}")
        if not names and embeds is not None:
            raise FewstepError(f"{folder / 'fewstep.json'}: class_names is empty (an unconditional model), but the "
                               f"UNet embeds {embeds} class labels (num_class_embeds) — {fix}")


def check_file(path: str | Path) -> None:
    """A single-file checkpoint's header, before it is read (a pickle is refused by the reader, saying why)."""
    if Path(path).suffix.lower() != ".safetensors":
        return
    try:
        read_header(path, "checkpoint")
    except FewstepError as e:
        raise FewstepError(f"{path} is not a model: not a safetensors checkpoint ({e}); give a diffusers pipeline "
                           f"folder, a fewstep model folder or a single-file .safetensors checkpoint") from None
    check_float_weights(path, "checkpoint")


def check_loaded(model) -> None:
    """Every weight of a loaded model's networks (its backbone, VAE, text encoders) finite."""
    path = Path(model.path)
    backbone = "transformer" if (path / "transformer").is_dir() else "unet"
    modules = {backbone: model.net, **{k: v for k, v in model.parts.items() if isinstance(v, nn.Module)}}
    for name, module in modules.items():
        where = path / name if path.is_dir() else path
        check_finite(module.state_dict().items(), where)
