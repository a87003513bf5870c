"""Webdataset shards (``.tar`` files of ``KEY.png|jpg|jpeg|webp`` + ``KEY.txt|caption`` pairs, the layout
diffusers' ``train_lcm_distill_sd_wds.py`` reads) as an index: where each sample's image bytes lie in its
shard, and its caption. Building the index reads only the tar headers and the captions; an image is read
(one seek, one read) and decoded when a batch asks for it, so a set of many shards is never held in memory.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import FewstepError

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")   # the first a sample has is its image
TEXT_EXTS = ("txt", "caption")
MAX_CAPTION = 1 << 20                         # a caption is a line of text: a MiB is no caption
MAX_IMAGE = 1 << 30                           # an encoded image: a GiB is far past any training image


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
        try:
            samples += _index(Path(shard))
        except (tarfile.TarError, OSError, EOFError) as e:
            raise FewstepError(f"webdataset shard {shard} is not a readable .tar ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                               f"re-create it (tar cf SHARD.tar KEY.png KEY.txt ...)") from None
    return samples


def _index(shard: Path) -> list[ShardSample]:
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
            limit = MAX_CAPTION if ext in TEXT_EXTS else MAX_IMAGE
            if member.size > limit and (ext in TEXT_EXTS or ext in IMAGE_EXTS):
                raise FewstepError(f"webdataset shard {shard}: member {member.name} is {member.size:,} bytes, over the "
                                   f"{limit:,} a {'caption' if ext in TEXT_EXTS else 'training image'} may be; not a "
                                   f"{'caption' if ext in TEXT_EXTS else 'training image'} (or a damaged shard)")
            if ext in TEXT_EXTS:
                texts[key][ext] = tar.extractfile(member).read()
            else:
                images[key][ext] = member
    samples = []
    for key, members in images.items():
        image = next((members[e] for e in IMAGE_EXTS if e in members), None)
        text = texts[key].get("txt") or texts[key].get("caption")
        if image is not None and text is not None:
            try:
                caption = text.decode("utf-8-sig").strip()
            except UnicodeDecodeError:
                raise FewstepError(f"webdataset shard {shard}: the caption of {key} is not UTF-8 text") from None
            samples.append(ShardSample(shard, key, image.offset_data, image.size, caption))
    return samples
