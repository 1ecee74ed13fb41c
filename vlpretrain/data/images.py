"""Image decoding for corpora: one function that turns a path, bytes or PIL image into RGB.

Example:
    >>> from vlpretrain.data.images import load_rgb
    >>> img = load_rgb("emoji/1f44b.png")   # transparent PNG -> RGB on white
"""
from __future__ import annotations

import io
import os
from typing import Union

from PIL import Image, UnidentifiedImageError

ImageLike = Union[str, "os.PathLike[str]", bytes, bytearray, Image.Image]

__all__ = ["BadImageError", "load_rgb"]


class BadImageError(Exception):
    """An image that cannot be read or decoded; the message says which and why.

    The dataset catches this one exception to skip a sample; anything else is a bug and propagates.
    """


def _has_transparency(img: Image.Image) -> bool:
    # "A" covers RGBA / LA / PA; "transparency" covers P and RGB/L images with a tRNS chunk.
    return "A" in img.getbands() or "transparency" in img.info


def load_rgb(image: ImageLike, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Open and fully decode ``image`` as an RGB PIL image.

    Transparent images (RGBA, LA, P with transparency) are composited onto ``background`` (white):
    a plain ``.convert("RGB")`` keeps whatever colour the fully transparent pixels happen to store,
    often black or noise, which for emoji is most of the picture.

    Raises:
        BadImageError: missing, unreadable, truncated or not an image.

    Example:
        >>> load_rgb(open("cat.jpg", "rb").read()).mode
        'RGB'
    """
    if isinstance(image, Image.Image):
        img = image
        what = "in-memory image"
    else:
        if isinstance(image, (bytes, bytearray)):
            what = f"{len(image)} bytes"
            fp: object = io.BytesIO(image)
        elif isinstance(image, (str, os.PathLike)):
            what = os.fspath(image)
            fp = what
        else:
            raise TypeError(f"load_rgb: expected a path, bytes or PIL image, got {type(image).__name__}")
        try:
            img = Image.open(fp)  # type: ignore[arg-type]
            img.load()  # decode now, so a truncated file fails here and not later in a transform
        except FileNotFoundError as e:
            raise BadImageError(f"{what}: file not found") from e
        except UnidentifiedImageError as e:
            raise BadImageError(f"{what}: not a readable image (unknown or corrupt format)") from e
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise BadImageError(f"{what}: cannot decode image ({type(e).__name__}: {e})") from e
    try:
        if _has_transparency(img):
            rgba = img.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, background + (255,))
            return Image.alpha_composite(canvas, rgba).convert("RGB")
        return img if img.mode == "RGB" else img.convert("RGB")
    except (OSError, ValueError) as e:
        raise BadImageError(f"{what}: cannot convert image to RGB ({type(e).__name__}: {e})") from e
