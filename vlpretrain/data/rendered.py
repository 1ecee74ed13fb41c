"""Out-of-style and out-of-domain image sets that Debian packages provide, when installed.

- ``noto-emoji:SPLIT``: the emoji of a demo-corpus split drawn in a second style, Google's Noto Color
  Emoji font (Debian ``fonts-noto-color-emoji``), rendered with Pillow: a cross-style test set.
- ``tuxpaint:[SPLIT]``: Tux Paint's stamps (Debian ``tuxpaint-stamps-default``): photos and clip art
  with a human-written caption and one of 16 categories: an out-of-domain set (``all``, the default),
  split by category into ``train`` and ``heldout`` for the fine-tuning example.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Optional

import pandas as pd

from ..io import atomic_write

NOTO_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
TUXPAINT_STAMPS = Path("/usr/share/tuxpaint/stamps")


class MissingSourceError(FileNotFoundError):
    """An optional data set whose system package is not installed."""


def _emoji_text(codepoints: str) -> str:
    return "".join(chr(int(cp, 16)) for cp in codepoints.split("-"))


def build_noto_emoji_split(split: str = "test", cache_dir: Optional[Path] = None, size: int = 72) -> Path:
    """Render a split of the emoji corpus with Noto Color Emoji (once); returns the CSV path."""
    from PIL import Image, ImageDraw, ImageFont

    from .emoji import build_emoji_corpus, default_cache_dir

    if not NOTO_FONT.is_file():
        raise MissingSourceError(f"{NOTO_FONT} not found: install Debian's fonts-noto-color-emoji "
                                 f"(apt-get install fonts-noto-color-emoji)")
    source = build_emoji_corpus(cache_dir)
    table = pd.read_csv(source / f"{split}.csv")
    target = Path(cache_dir or default_cache_dir()) / "emoji-noto-v1"
    out_csv = target / f"{split}.csv"
    if out_csv.is_file():
        return out_csv
    font = ImageFont.truetype(str(NOTO_FONT), 109)  # the font's only bitmap size
    rows = []
    for row in table.itertuples(index=False):
        codepoints = Path(row.image).stem
        canvas = Image.new("RGBA", (136, 128), (255, 255, 255, 0))
        ImageDraw.Draw(canvas).text((0, 0), _emoji_text(codepoints), font=font, embedded_color=True)
        box = canvas.getbbox()
        if box is None:  # the font lacks this emoji
            continue
        glyph = canvas.crop(box)
        side = max(glyph.size)
        square = Image.new("RGBA", (side, side), (255, 255, 255, 0))
        square.paste(glyph, ((side - glyph.size[0]) // 2, (side - glyph.size[1]) // 2))
        background = Image.new("RGB", (side, side), (255, 255, 255))
        background.paste(square, mask=square.split()[3])
        name = f"images/{codepoints}.png"
        square_image = background.resize((size, size), Image.Resampling.LANCZOS)
        # Each image atomically: the images folder is shared by the splits and by concurrent builders.
        atomic_write(target / name, lambda tmp: square_image.save(tmp, format="PNG"))
        rows.append({**row._asdict(), "image": name})
    _write_csv_atomically(pd.DataFrame(rows), out_csv)  # last: the CSV exists only once its images do
    return out_csv


# The fine-tuning example's split: it trains on four fifths of the five largest categories' stamps,
# tests in-domain retrieval on the other fifth (val), and classifies the other eleven categories
# zero-shot (heldout), so the classes scored there never appear in training.
TUXPAINT_TRAIN_CATEGORIES = ("animals", "food", "seasonal", "symbols", "town")
TUXPAINT_SPLITS = ("all", "train", "val", "heldout")


def build_tuxpaint_table(cache_dir: Optional[Path] = None, split: str = "all") -> Path:
    """A CSV over the installed Tux Paint stamps: image path, caption (first line of the stamp's
    .txt), category (its top folder). ``split``: ``all``; ``train`` (the categories in
    ``TUXPAINT_TRAIN_CATEGORIES`` less val, 490 stamps); ``val`` (about one stamp in five of those categories,
    by a hash of its path, 107 stamps); ``heldout`` (the other 11 categories, 188 stamps)."""
    from .emoji import default_cache_dir

    if split not in TUXPAINT_SPLITS:
        raise ValueError(f"tuxpaint split '{split}' does not exist (use {', '.join(TUXPAINT_SPLITS)})")
    if not TUXPAINT_STAMPS.is_dir():
        raise MissingSourceError(f"{TUXPAINT_STAMPS} not found: install Debian's tuxpaint-stamps-default "
                                 f"(apt-get install tuxpaint-stamps-default)")
    target = Path(cache_dir or default_cache_dir()) / "tuxpaint-v1"
    out_csv = target / f"{split}.csv"
    if out_csv.is_file():
        return out_csv
    if split != "all":
        table = pd.read_csv(build_tuxpaint_table(cache_dir, "all"))
        seen = table["category"].isin(TUXPAINT_TRAIN_CATEGORIES)
        # A hash of the path inside the stamps folder: the same split on every machine.
        in_val = table["image"].map(lambda p: zlib.crc32(Path(p).relative_to(TUXPAINT_STAMPS).as_posix().encode()) % 5 == 0)
        chosen = table[{"train": seen & ~in_val, "val": seen & in_val, "heldout": ~seen}[split]]
        _write_csv_atomically(chosen, out_csv)
        return out_csv
    rows = []
    for png in sorted(TUXPAINT_STAMPS.rglob("*.png")):
        caption_file = png.with_suffix(".txt")
        if not caption_file.is_file():
            continue
        lines = [l.strip() for l in caption_file.read_text(errors="replace").splitlines() if l.strip()]
        if not lines:
            continue
        category = png.relative_to(TUXPAINT_STAMPS).parts[0]
        rows.append({"image": str(png), "caption": lines[0], "category": category})
    _write_csv_atomically(pd.DataFrame(rows), out_csv)
    return out_csv


def _write_csv_atomically(table: pd.DataFrame, path: Path) -> None:
    atomic_write(path, lambda tmp: table.to_csv(tmp, index=False))
