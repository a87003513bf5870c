"""Score a folder of images made anywhere — diffusers, ComfyUI, AUTOMATIC1111, another library — on a data set's
ruler (``fewstep eval --images DIR --dataset NAME``): the same features, reference set and spreads as
``fewstep eval --model``, so a figure from elsewhere sits beside fewstep's own.

Each image is read as the data set's images are (alpha over white, RGB or luma, centre-cropped to a square and
resized with an antialiased bicubic filter to the ruler's size when it is not that size already). What each image
was meant to show, for conditional accuracy, comes from (first found):

- ``metadata.jsonl`` in the folder (the Hugging Face imagefolder convention): ``file_name`` and one of ``label``
  (a class index or name), ``class_name``, or ``text``/``prompt``/``caption`` (a caption of a text-to-image set,
  which names its group; another caption says nothing);
- the image's own ``fewstep`` PNG text record (``fewstep sample --out-dir`` writes one: ``label`` or ``prompt``).

Accuracy is reported when every image has one; otherwise it is left out (None) and the report says how many had.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from ..errors import FewstepError
from ..io.images import image_tensor, open_image
from .evaluate import SPREAD, Ruler

SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_IMAGES = 50_000         # 50k × 3×32×32 floats = 600 MB; FID rulers rarely use more


def image_files(folder: Path, limit: int | None = None) -> list[Path]:
    """The folder's image files in name order (not its subfolders), at most ``limit``; a clear error when there
    are fewer than 4 (precision/recall take each sample's 3 nearest neighbours)."""
    if not folder.is_dir():
        raise FewstepError(f"--images {folder}: not a folder of images" + (" (it is a file)" if folder.exists() else
                                                                             " (it does not exist)"))
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
    cap = min(limit or MAX_IMAGES, MAX_IMAGES)
    if len(files) > cap and limit is None:
        raise FewstepError(f"--images {folder} holds {len(files):,} images; fewstep scores at most {MAX_IMAGES:,} at "
                           f"once: give --num N to score the first N")
    files = files[:cap]
    if len(files) < 4:
        raise FewstepError(f"--images {folder} holds {len(files)} image(s) ({', '.join(SUFFIXES)}); scoring needs at "
                           f"least 4")
    return files


def _metadata(folder: Path) -> dict[str, dict]:
    path = folder / "metadata.jsonl"
    if not path.is_file():
        return {}
    from ..io.validate import json_lines

    return {record["file_name"]: record for _, record in json_lines(path, "metadata.jsonl", key="file_name")}


def _png_record(im) -> dict:
    text = (im.info or {}).get("fewstep")
    try:
        record = json.loads(text) if text else {}
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _label(record: dict, ruler: Ruler, captions: dict[str, int], where: str) -> int | None:
    """The class a record says its image shows (module docstring); None when it says nothing."""
    names = ruler.data.class_names
    label = record.get("label", record.get("class_name"))
    if isinstance(label, bool):
        label = None
    if isinstance(label, int):
        if not 0 <= label < len(names):
            raise FewstepError(f"{where}: label {label} is not a class of {ruler.data.name} (0–{len(names) - 1})")
        return label
    if isinstance(label, str):
        if label not in names:
            raise FewstepError(f"{where}: {label!r} is not one of {ruler.data.name}'s classes: {', '.join(names)}")
        return names.index(label)
    caption = next((record[k] for k in ("prompt", "text", "caption") if isinstance(record.get(k), str)), None)
    return captions.get(caption) if caption is not None else None   # a caption not of the set: its group is unknown


def read_images(folder: str | Path, ruler: Ruler, limit: int | None = None) -> tuple[Tensor, list[int | None]]:
    """The folder's images as [N, C, S, S] in [−1, 1] at the ruler's size and channels, and each one's class
    (None where nothing says)."""
    folder = Path(folder)
    files = image_files(folder, limit)
    meta = _metadata(folder)
    channels, size = ruler.data.images.shape[1], ruler.data.images.shape[-1]
    captions = {c: int(label) for c, label in zip(ruler.data.captions or [], ruler.data.labels)}
    images, labels = [], []
    for path in files:
        im = open_image(path, str(path))
        record = meta.get(path.name) or _png_record(im)
        where = f"{folder / 'metadata.jsonl'} ({path.name})" if path.name in meta else str(path)
        labels.append(_label(record, ruler, captions, where))
        images.append(image_tensor(im, channels, size))
    return torch.stack(images), labels


def score_folder(folder: str | Path, ruler: Ruler, seed: int = 0, limit: int | None = None) -> dict:
    """``fewstep eval --images``'s JSON object: ``eval --json``'s keys (DESIGN.md §3), with ``model``, ``steps``,
    ``sampler``, ``guidance_scale``, ``nfe`` and ``seconds_per_image`` null (the folder does not say) and
    ``images`` / ``labelled`` added."""
    images, labels = read_images(folder, ruler, limit)
    known = [label for label in labels if label is not None]
    target = torch.tensor(known) if len(known) == len(labels) else None
    row = {"steps": None, "sampler": None, "guidance_scale": None, "nfe": None, "seconds_per_image": None,
           **ruler.score(images, target, seed=seed)}
    return {"model": None, "images": str(folder), "dataset": ruler.data.name, "features": ruler.name, "spread": SPREAD,
            "num_samples": len(images), "labelled": len(known), "seed": seed, "results": [row]}
