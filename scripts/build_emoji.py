"""Rebuild fewstep's embedded emoji text-to-image data set (DESIGN.md §4).

Every fully-qualified emoji of Unicode's ``emoji-test.txt`` is drawn with the Noto Color Emoji
font (Pillow, RAQM layout, ``embedded_color=True``) on white, cropped to its glyph, padded to a
square and box-downsampled to 32×32 RGB. Its caption is its Unicode name ("thumbs up: medium skin
tone") and its label the Unicode group ("People & Body"). Both inputs are Debian packages:

    apt-get download unicode-data fonts-noto-color-emoji
    for f in *.deb; do dpkg-deb -x "$f" ex; done
    python scripts/build_emoji.py --emoji-test ex/usr/share/unicode/emoji/emoji-test.txt \
        --font ex/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf

writes ``src/fewstep/assets/emoji.npz`` (licences: ``src/fewstep/assets/EMOJI-LICENSE.md``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

OUT = Path(__file__).resolve().parents[1] / "src" / "fewstep" / "assets" / "emoji.npz"


def parse_emoji_test(path: Path) -> list[tuple[str, str, str, str]]:
    """(characters, name, group, subgroup) of each fully-qualified line of emoji-test.txt."""
    rows, group, subgroup = [], "", ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#") and "; fully-qualified" in line:
            chars = line.split("#", 1)[1].split()[0]
            # "# 😀 E1.0 grinning face": the name follows the E<version> field
            name = line.split("#", 1)[1].split(maxsplit=2)[2].strip()
            rows.append((chars, name, group, subgroup))
    return rows


def render(chars: str, font: ImageFont.FreeTypeFont, size: int) -> np.ndarray:
    canvas = Image.new("RGBA", (256, 160), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((8, 8), chars, font=font, embedded_color=True)
    box = canvas.getbbox()
    if box is None:
        raise ValueError(f"{chars!r} rendered nothing")
    glyph = canvas.crop(box)
    side = max(glyph.size)
    square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    square.alpha_composite(glyph, ((side - glyph.size[0]) // 2, (side - glyph.size[1]) // 2))
    return np.asarray(square.convert("RGB").resize((size, size), Image.BOX), dtype=np.uint8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--emoji-test", type=Path, default=Path("/usr/share/unicode/emoji/emoji-test.txt"))
    ap.add_argument("--font", type=Path, default=Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"))
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    font = ImageFont.truetype(str(args.font), 109, layout_engine=ImageFont.Layout.RAQM)
    rows = parse_emoji_test(args.emoji_test)
    images, kept = [], []
    for row in rows:
        try:
            images.append(render(row[0], font, args.size))
            kept.append(row)
        except ValueError as e:
            print("skipped:", e)
    groups = sorted({r[2] for r in kept}, key=[r[2] for r in kept].index)  # file order
    np.savez_compressed(
        args.out, images=np.stack(images), captions=np.array([r[1] for r in kept]),
        labels=np.array([groups.index(r[2]) for r in kept], dtype=np.int64), class_names=np.array(groups),
        subgroups=np.array([r[3] for r in kept]), characters=np.array([r[0] for r in kept]))
    print(f"{len(kept)} emoji in {len(groups)} groups → {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
