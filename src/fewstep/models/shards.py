"""Webdataset shards (``.tar`` files of ``KEY.png|jpg|jpeg|webp`` + ``KEY.txt|caption`` pairs, the layout
diffusers' ``train_lcm_distill_sd_wds.py`` reads) as an index: where each sample's image bytes lie in its
shard, and its caption. Building the index reads only the tar headers and the captions; an image is read
(one seek, one read) and decoded when a batch asks for it, so a set of many shards is never held in memory.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")   # the first a sample has is its image
TEXT_EXTS = ("txt", "caption")


@dataclass(frozen=True)
class ShardSample:
    """One image of a shard: its bytes at ``offset`` (``size`` long) in ``shard``, and its caption."""

    shard: Path
    key: str
    offset: int
    size: int
    caption: str

    @property
    def where(self) -> str:
        return f"{self.shard}:{self.key}"

    def read(self) -> bytes:
        with open(self.shard, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


def index_shards(shards: list[Path]) -> list[ShardSample]:
    """The captioned samples of ``shards`` in order (a sample without an image or a caption is skipped; an empty
    ``.txt`` gives way to a ``.caption``)."""
    samples = []
    for shard in shards:
        images: dict[str, dict[str, tarfile.TarInfo]] = {}
        texts: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                ext = ext.lower()
                images.setdefault(key, {})
                texts.setdefault(key, {})
                if ext in TEXT_EXTS:
                    texts[key][ext] = tar.extractfile(member).read()
                else:
                    images[key][ext] = member
        for key, members in images.items():
            image = next((members[e] for e in IMAGE_EXTS if e in members), None)
            text = texts[key].get("txt") or texts[key].get("caption")
            if image is not None and text is not None:
                samples.append(ShardSample(Path(shard), key, image.offset_data, image.size, text.decode("utf-8").strip()))
    return samples
