"""Data sets as in-memory tensors: images in [−1, 1], shape [N, C, H, W], with integer labels.

- ``digits``: scikit-learn's handwritten digits (1,797 real 8×8 scans, 10 classes, bundled with
  scikit-learn, no download), upsampled bilinearly to 16×16 (DESIGN.md §4).
- ``emoji``: 3,655 real emoji (Noto Color Emoji, drawn by ``scripts/build_emoji.py``) at 32×32 RGB,
  each captioned with its Unicode name and labelled with its Unicode group (9 classes), shipped as
  ``fewstep/assets/emoji.npz`` (licences in ``EMOJI-LICENSE.md`` beside it). The text-to-image set.
- a folder of images: one sub-folder per class (the torchvision ``ImageFolder`` layout), or a
  flat folder for an unconditional data set.

Images from files (folders, saved HF datasets, webdataset shards) are resized as diffusers' training scripts
do (:mod:`fewstep.models.transforms`): the short side to the size, the aspect ratio kept, then cut to a
square at the centre, or at random each time an image is used (``Augment(crop="random")``), and flipped at
random with ``Augment(flip=True)``. ``ImageData.images`` always holds the centre crops; with a random crop
each image's uncropped view is kept beside it, and a training batch is cut by :meth:`ImageData.batch`.
Webdataset shards may instead be streamed (:class:`StreamedImages`): only their index and captions are held,
and each batch's images are read and decoded as it is cut.
"""


from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import FewstepError
from ..io.images import image_tensor, open_image
from .shards import ShardSample, index_shards
from .transforms import Augment, center_crop, resize_short_side, training_crops

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif"}
STREAM_ABOVE = 4 * 2**30   # stream=None: webdataset shards whose decoded images would take more bytes are streamed


@dataclass
class ImageData:
    """Images in [−1, 1] with labels (all 0 for an unconditional set), the class names and, for a
    text-to-image set, one caption per image. ``augment`` says how training batches cut them (module
    docstring); for a random crop ``views`` holds each image with its short side at the size, uncropped."""

    images: Tensor
    labels: Tensor
    class_names: list[str]
    name: str
    captions: list[str] | None = None
    augment: Augment = field(default_factory=Augment)
    views: Sequence[Tensor] | None = None

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    def split(self, holdout: float, seed: int = 0) -> tuple["ImageData", "ImageData"]:
        """A seeded, stratified-by-shuffle train/held-out split."""
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        k = int(round(len(self) * (1 - holdout)))
        a, b = perm[:k], perm[k:]
        return self.subset(a, ":train"), self.subset(b, ":heldout")

    def of_class(self, name: str) -> "ImageData":
        """The images of class ``name`` (e.g. one Unicode group of the emoji), named ``<set>:<class>``."""
        if name not in self.class_names:
            raise FewstepError(f"{name!r} is not one of {self.name}'s classes: {', '.join(self.class_names)}")
        return self.subset((self.labels == self.class_names.index(name)).nonzero().flatten(), f":{name}")

    def subset(self, index: Tensor, suffix: str = "") -> "ImageData":
        """The images at ``index`` (captions, transforms and views kept)."""
        rows = index.tolist()
        captions = None if self.captions is None else [self.captions[i] for i in rows]
        views = None if self.views is None else [self.views[i] for i in rows]
        return ImageData(self.images[index], self.labels[index], self.class_names, self.name + suffix, captions,
                         self.augment, views)

    @property
    def fixed(self) -> bool:
        """Every use of an image is the same (no random crop or flip): what is computed from the images (VAE
        latents) can be computed once for the whole run."""
        return not self.augment.random

    def batch(self, index: Tensor, generator: torch.Generator) -> ImageData:
        """The images at ``index`` as one training batch sees them: cut and flipped by ``augment`` with
        ``generator`` (:func:`fewstep.models.transforms.training_crops`); the centre crops when fixed."""
        if self.fixed:
            return self.subset(index)
        rows = index.tolist()
        views = [self.views[i] for i in rows] if self.augment.crop == "random" else list(self.images[index])
        captions = None if self.captions is None else [self.captions[i] for i in rows]
        return ImageData(training_crops(views, self.image_size, self.augment, generator), self.labels[index],
                         self.class_names, self.name, captions)

    def with_augment(self, augment: Augment | None) -> ImageData:
        """This set cut by ``augment``; a random crop of a set whose images are all square at the training size
        (the embedded sets) is refused: there is nothing to crop."""
        augment = augment or Augment()
        if augment.crop == "random" and (self.views is None or all(v.shape[-2:] == self.images.shape[-2:]
                                                                    for v in self.views)):
            raise FewstepError(f"--crop random: the images of {self.name} are all square at the training size "
                               f"{self.image_size}x{self.image_size}, so there is nothing to crop; use --crop center "
                               f"(--flip works on any set)")
        return ImageData(self.images, self.labels, self.class_names, self.name, self.captions, augment, self.views)


class PerBatch:
    """A training set computed batch by batch: ``fn`` of :meth:`ImageData.batch` (what the training loop calls,
    with its per-micro-batch generator), for data whose every use differs (a random crop or flip)."""

    def __init__(self, data: ImageData, fn: Callable[[ImageData], dict[str, Tensor]]) -> None:
        self.data, self.fn = data, fn

    def __len__(self) -> int:
        return len(self.data)

    @torch.no_grad()
    def batch(self, index: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        return self.fn(self.data.batch(index, generator))


def prepared(data: ImageData, fn: Callable[[ImageData], dict[str, Tensor]]) -> dict[str, Tensor] | PerBatch:
    """What a training run cuts its batches from: ``fn(data)`` computed once (the images' VAE latents, the
    captions' embeddings) when every use of an image is the same, else ``fn`` of each batch (:class:`PerBatch`):
    one formula either way."""
    return fn(data) if data.fixed else PerBatch(data, fn)


class StreamedImages:
    """A captioned webdataset read batch by batch (``--stream``): only the shard index and the captions are in
    memory; :meth:`batch` reads each image from its shard, decodes it and cuts it as :class:`ImageData` does
    (:func:`fewstep.models.transforms.training_crops`). Never fixed: the latents and prompt embeddings of a
    streamed set are computed per batch. It has no ``images`` tensor (that is what it does not hold)."""

    fixed = False
    channels = 3

    def __init__(self, samples: list[ShardSample], size: int, name: str, augment: Augment) -> None:
        self.samples, self.image_size, self.name, self.augment = samples, size, name, augment
        self.captions = [s.caption for s in samples]
        self.class_names = [name]
        self.labels = torch.zeros(len(samples), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_classes(self) -> int:
        return 1

    @property
    def images(self) -> Tensor:
        raise FewstepError(f"{self.name} is streamed from its shards: its images are read per training batch, not "
                           f"held; load it without --stream for this")

    def of_class(self, name: str) -> StreamedImages:
        if name not in self.class_names:
            raise FewstepError(f"{name!r} is not one of {self.name}'s classes: {', '.join(self.class_names)}")
        return self

    def batch(self, index: Tensor, generator: torch.Generator) -> ImageData:
        """The images at ``index`` read, decoded, resized and cut as ``augment`` says, with their captions."""
        rows = index.tolist()
        views = [_view(_open_image(io.BytesIO(self.samples[i].read()), self.samples[i].where), self.image_size)
                 for i in rows]
        return ImageData(training_crops(views, self.image_size, self.augment, generator), self.labels[index],
                         self.class_names, self.name, [self.captions[i] for i in rows])


def check_resize(count: int, channels: int, size: int, what: str) -> None:
    """A data set resized to ``size``² fits in memory (the resized images and the copy resizing makes)."""
    from ..io.budget import check_memory, images_bytes

    check_memory(images_bytes(count, channels, size, copies=2), f"{what} at {size}×{size} ({count:,} images)",
                 "give a smaller --image-size")


def load_digits(size: int = 16) -> ImageData:
    """scikit-learn's digits (values 0–16) scaled to [−1, 1] and resized to ``size``×``size``."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    check_resize(len(bunch.images), 1, size, "the digits")
    x = torch.from_numpy(bunch.images.astype(np.float32))[:, None] / 16.0 * 2 - 1
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(-1, 1)
    return ImageData(x, torch.from_numpy(bunch.target.astype(np.int64)), [str(i) for i in range(10)], "digits")


EMOJI_FILE = Path(__file__).resolve().parents[1] / "assets" / "emoji.npz"


def load_emoji(size: int = 32) -> ImageData:
    """The embedded emoji set: RGB in [−1, 1], Unicode-group labels, Unicode-name captions."""
    raw = np.load(EMOJI_FILE)
    check_resize(len(raw["labels"]), 3, size, "the emoji")
    x = torch.from_numpy(raw["images"]).permute(0, 3, 1, 2).float() / 127.5 - 1
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(-1, 1)
    return ImageData(x, torch.from_numpy(raw["labels"]), [str(c) for c in raw["class_names"]], "emoji",
                     [str(c) for c in raw["captions"]])


def load_image_folder(path: str | Path, size: int, channels: int = 3, augment: Augment | None = None) -> ImageData:
    """Images under ``path``: class sub-folders give labels, a flat folder gives one class. Each is resized and cut
    as diffusers' scripts do (module docstring; ``augment`` for training batches)."""
    root = Path(path)
    if root.is_file():
        raise FewstepError(f"dataset {root} is a file; give a folder of images (one sub-folder per class)")
    if not root.is_dir():
        raise FewstepError(f"dataset folder {root} does not exist")
    subdirs = sorted(d for d in root.iterdir() if d.is_dir())
    groups = [(d.name, d) for d in subdirs] if subdirs else [(root.name, root)]
    files, labels = [], []
    for label, (_, folder) in enumerate(groups):
        for f in sorted(folder.iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(f)
                labels.append(label)
    if not files:
        raise FewstepError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {root}")
    check_resize(len(files), channels, size, f"the images of {root}")
    images, views = _cut((_open_image(f, str(f)) for f in files), size, channels, augment)
    return ImageData(images, torch.tensor(labels), [g[0] for g in groups], root.name, views=views).with_augment(augment)


def load_dataset(name: str, size: int | None = None, channels: int = 1, augment: Augment | None = None) -> ImageData:
    """``digits``, ``emoji`` or a path to an image folder; ``augment``: how training batches cut them."""
    if name == "digits":
        return load_digits(size or 16).with_augment(augment)
    if name == "emoji":
        return load_emoji(size or 32).with_augment(augment)
    if Path(name).exists():
        return load_image_folder(name, size or 32, channels, augment)
    raise FewstepError(f"unknown dataset {name!r}: use 'digits', 'emoji' or the path of an image folder")


# --- captioned sets (text-to-image) -----------------------------------------------------------------
CAPTION_KEYS = ("text", "caption", "prompt")


def load_captioned(name: str, size: int, augment: Augment | None = None,
                   stream: bool | None = False) -> ImageData | StreamedImages:
    """A captioned RGB set at ``size``×``size``: ``emoji``; an image folder with a ``metadata.jsonl`` of
    ``{"file_name": ..., "text": ...}`` lines (Hugging Face's imagefolder convention); a folder saved
    by ``datasets.Dataset.save_to_disk`` (needs the ``datasets`` package) with an image and a text
    column; or webdataset shards (a ``.tar`` file, or a folder of them, holding ``KEY.png|jpg`` +
    ``KEY.txt`` pairs). Every image's short side is resized (bicubic) to ``size``, then cut to a square as
    ``augment`` says (module docstring). ``stream``: read webdataset shards batch by batch instead of into
    memory (:class:`StreamedImages`); None: when their decoded images would take more than
    :data:`STREAM_ABOVE` bytes."""
    path = Path(name)
    kind = "emoji" if name == "emoji" else _captioned_kind(path)
    if stream and kind != "shards":
        raise FewstepError(f"--stream reads webdataset .tar shards batch by batch; {name} is read into memory: leave "
                           f"--stream out, or pack it into shards (KEY.png + KEY.txt per sample)")
    if kind == "emoji":
        return load_emoji(size).with_augment(augment)
    if kind == "shards":
        samples = index_shards(sorted(path.glob("*.tar")) if path.is_dir() else [path])
        if samples and (stream or (stream is None and len(samples) * 3 * size * size * 4 > STREAM_ABOVE)):
            return StreamedImages(samples, size, path.name, augment or Augment())
        ims = (_open_image(io.BytesIO(s.read()), s.where) for s in samples)   # decoded one at a time
        captions = [s.caption for s in samples]
    else:
        pairs = _imagefolder_pairs(path) if kind == "imagefolder" else _hf_dataset_pairs(path)
        ims, captions = (im for im, _ in pairs), [c for _, c in pairs]
    if not captions:
        raise FewstepError(f"no captioned images found in {path}")
    check_resize(len(captions), 3, size, f"the images of {path}")
    images, views = _cut(ims, size, 3, augment)
    return ImageData(images, torch.zeros(len(captions), dtype=torch.long), [path.name], path.name, captions,
                     views=views).with_augment(augment)


def _captioned_kind(path: Path) -> str:
    """Which captioned layout ``path`` has: imagefolder (metadata.jsonl), hf (a saved dataset) or shards."""
    if not path.exists():
        raise FewstepError(f"unknown captioned dataset {str(path)!r}: use 'emoji', an image folder with metadata.jsonl, "
                           f"a saved HF dataset folder or webdataset .tar shards")
    if path.is_dir() and (path / "metadata.jsonl").exists():
        return "imagefolder"
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()):
        return "hf"
    if path.suffix == ".tar" or (path.is_dir() and any(path.glob("*.tar"))):
        return "shards"
    raise FewstepError(f"{path} has no captions: add a metadata.jsonl ({{\"file_name\": ..., \"text\": ...}} per "
                       f"line), or give a saved HF dataset or webdataset .tar shards")


def _caption(record: dict, where: str) -> str:
    for key in CAPTION_KEYS:
        if key in record:
            return str(record[key])
    raise FewstepError(f"{where} has no caption field ({', '.join(CAPTION_KEYS)})")


def _view(im, size: int, channels: int = 3) -> Tensor:
    """A PIL image as [C, H, W] in [−1, 1] (:func:`fewstep.io.images.image_tensor`), its short side resized to
    ``size`` (:func:`fewstep.models.transforms.resize_short_side`)."""
    return resize_short_side(image_tensor(im, channels), size)


def _cut(ims, size: int, channels: int, augment: Augment | None) -> tuple[Tensor, list[Tensor] | None]:
    """The centre crops [N, C, size, size] of PIL images (converted one at a time) and, for a random crop, their
    uncropped views."""
    keep = augment is not None and augment.crop == "random"
    crops, views = [], []
    for im in ims:
        view = _view(im, size, channels)
        crops.append(center_crop(view, size).contiguous())
        if keep:
            views.append(view)
    return torch.stack(crops), views if keep else None


def _open_image(source, where: str):
    return open_image(source, where)


def _imagefolder_pairs(root: Path) -> list:
    from ..io.validate import json_lines

    pairs = []
    for n, record in json_lines(root / "metadata.jsonl", "metadata.jsonl", key="file_name"):
        where = f"{root / 'metadata.jsonl'} line {n}"
        pairs.append((_open_image(root / record["file_name"], str(root / record["file_name"])), _caption(record, where)))
    return pairs


def _hf_dataset_pairs(root: Path) -> list:
    try:
        import datasets
    except ImportError:
        raise FewstepError(f"{root} is a saved Hugging Face dataset: `pip install datasets` to read it") from None
    ds = datasets.load_from_disk(str(root))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    image_key = next((k for k in ("image", "img", "jpg", "png") if k in ds.column_names), None)
    if image_key is None:
        raise FewstepError(f"{root} has no image column (image, img, jpg or png): {ds.column_names}")
    return [(row[image_key], _caption(row, f"{root} row {i}")) for i, row in enumerate(ds)]


def data_for(model, name: str | None = None, augment: Augment | None = None,
             stream: bool | None = False) -> ImageData | StreamedImages:
    """The training data of ``model`` (its own data set unless ``name`` says otherwise): a captioned set at
    its image size for a text-to-image model, a labelled image set for a pixel model; ``augment``: how
    training batches cut them; ``stream``: of webdataset shards (:func:`load_captioned`)."""
    name = name or model.config.dataset.split(":")[0] or ("emoji" if model.conditioner.text else "digits")
    if model.conditioner.text:
        return load_captioned(name, model.config.image_size, augment, stream)
    if stream:
        raise FewstepError(f"--stream reads captioned webdataset shards; {model.path} is a pixel model, trained on "
                           f"images held in memory: leave --stream out")
    return load_dataset(name, model.config.image_size, model.config.channels, augment)
