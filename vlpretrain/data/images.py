"""Image decoding for corpora: one function that turns a path, bytes or PIL image into RGB.

The one decoding policy of the toolkit: images larger than a pixel limit are refused from their header
before any pixel is decoded; EXIF orientation is applied (a portrait photo stays portrait); 16-bit and
float images are scaled to 8 bits; transparency is composited onto white.

Example:
    >>> from vlpretrain.data.images import load_rgb
    >>> img = load_rgb("emoji/1f44b.png")   # transparent PNG -> RGB on white
    >>> load_rgb("huge.png")                # 20000 x 20000 by its header: refused, not decoded
    BadImageError: huge.png: 20000x20000 = 400000000 pixels, over the limit of 89478485 (data.max_pixels); not decoded
"""
from __future__ import annotations

import contextlib
import io
import os
import threading
from typing import Iterator, Optional, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageLike = Union[str, "os.PathLike[str]", bytes, bytearray, Image.Image]

__all__ = ["BadImageError", "DEFAULT_MAX_PIXELS", "check_pixel_limit", "load_rgb"]

#: The default of ``data.max_pixels``: PIL's own warning limit (``Image.MAX_IMAGE_PIXELS``, about 90 MP).
DEFAULT_MAX_PIXELS = 89_478_485

# High bit-depth modes PIL cannot convert to RGB without clipping (a 16-bit mid-grey would turn white).
_WIDE_MODES = ("I", "F")


class BadImageError(Exception):
    """An image that cannot be read or decoded; the message says which and why.

    The dataset catches this one exception to skip a sample; anything else is a bug and propagates.
    ``kind`` says at which stage it failed: ``"unreadable"`` (missing, or not an image by its header),
    ``"too_large"`` (over the pixel limit, not decoded) or ``"decode"`` (the pixels do not decode).

    Example:
        >>> try: load_rgb("gone.png")
        ... except BadImageError as e: print(e.kind, e)
        unreadable gone.png: file not found
    """

    def __init__(self, message: str, kind: str = "decode") -> None:
        super().__init__(message)
        self.kind = kind


_limit_lock = threading.Lock()
_limit_users = 0
_saved_limit: Optional[int] = None


@contextlib.contextmanager
def _pil_limit_off() -> Iterator[None]:
    """PIL's decompression-bomb check off while we open and decode: we apply our own limit from the
    header first, so PIL must neither warn about nor refuse an image we allowed. Counted, so that
    threads and nested uses restore PIL's value only when the last one leaves."""
    global _limit_users, _saved_limit
    with _limit_lock:
        if _limit_users == 0:
            _saved_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        _limit_users += 1
    try:
        yield
    finally:
        with _limit_lock:
            _limit_users -= 1
            if _limit_users == 0:
                Image.MAX_IMAGE_PIXELS = _saved_limit


def check_pixel_limit(size: tuple[int, int], max_pixels: Optional[int], what: str,
                      setting: str = "data.max_pixels") -> None:
    """Refuse an image of ``size`` (width, height; read from its header) over ``max_pixels`` (None: no limit).

    The one pixel-limit check: training, inference and ``vlp data shard --max-pixels`` all go through it.

    Raises:
        BadImageError: kind ``"too_large"``, naming ``what``, its size, the limit and ``setting``.

    Example:
        >>> check_pixel_limit((20000, 20000), 89_478_485, "huge.png")
        BadImageError: huge.png: 20000x20000 = 400000000 pixels, over the limit of 89478485 (data.max_pixels); not decoded
    """
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        raise BadImageError(f"{what}: {width}x{height} = {width * height} pixels, over the limit of {max_pixels} "
                            f"({setting}); not decoded", kind="too_large")


def _has_transparency(img: Image.Image) -> bool:
    # "A" covers RGBA / LA / PA; "transparency" covers P and RGB/L images with a tRNS chunk.
    return "A" in img.getbands() or "transparency" in img.info


def _to_8bit(img: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float grey image as 8-bit "L", scaled rather than clipped.

    I;16* (16-bit PNG / TIFF): divided by 257 (65535 -> 255). I: values up to 255 kept, up to 65535
    scaled as 16-bit (how older PIL opens 16-bit PNGs), wider ranges stretched from min..max.
    F: values in 0..1 times 255, in 0..255 kept, others stretched from min..max; NaN -> 0.
    """
    a = np.asarray(img).astype(np.float32)  # float32: 8-bit output needs no more, and big images are big
    a[~np.isfinite(a)] = 0.0
    low, high = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if img.mode.startswith("I;16"):
        scaled = a / 257.0
    elif low >= 0 and high <= (1.0 if img.mode == "F" else 255.0):
        scaled = a * 255.0 if img.mode == "F" else a
    elif low >= 0 and high <= (255.0 if img.mode == "F" else 65535.0):
        scaled = a if img.mode == "F" else a / 257.0
    else:
        scaled = (a - low) * (255.0 / (high - low)) if high > low else np.zeros_like(a)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")


def _upright(img: Image.Image, owned: bool) -> Image.Image:
    """``img`` turned as its EXIF orientation says (PIL's ``exif_transpose``); a caller's own image is
    copied, never changed. Unreadable EXIF data leaves the image as it is: its pixels are fine."""
    try:
        if owned:
            ImageOps.exif_transpose(img, in_place=True)
            return img
        if img.getexif().get(0x0112, 1) in (None, 1):  # 0x0112: Orientation; copy only when it turns
            return img
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a corrupt EXIF block makes PIL raise many kinds of error
        return img


def _open(image: ImageLike, max_pixels: Optional[int], setting: str) -> tuple[Image.Image, str]:
    """Open a path or bytes, check its header size against the limit, then decode all of it."""
    if isinstance(image, (bytes, bytearray)):
        what = f"{len(image)} bytes"
        fp: object = io.BytesIO(image)
    elif isinstance(image, (str, os.PathLike)):
        what = os.fspath(image)
        fp = what
    else:
        raise TypeError(f"load_rgb: expected a path, bytes or PIL image, got {type(image).__name__}")
    with _pil_limit_off():
        try:
            img = Image.open(fp)  # type: ignore[arg-type]  # lazy: reads the header only
        except FileNotFoundError as e:
            raise BadImageError(f"{what}: file not found", kind="unreadable") from e
        except UnidentifiedImageError as e:
            raise BadImageError(f"{what}: not a readable image (unknown or corrupt format)", kind="unreadable") from e
        except (OSError, SyntaxError, ValueError) as e:
            raise BadImageError(f"{what}: cannot decode image ({type(e).__name__}: {e})", kind="unreadable") from e
        try:
            check_pixel_limit(img.size, max_pixels, what, setting)
            img.load()  # decode now, so a truncated file fails here and not later in a transform
        except BadImageError:
            img.close()  # the file stays open until then: thousands of refused images would leak handles
            raise
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            img.close()
            raise BadImageError(f"{what}: cannot decode image ({type(e).__name__}: {e})") from e
    return _upright(img, owned=True), what


def load_rgb(image: ImageLike, background: tuple[int, int, int] = (255, 255, 255),
             max_pixels: Optional[int] = DEFAULT_MAX_PIXELS, setting: str = "data.max_pixels") -> Image.Image:
    """Open and fully decode ``image`` as an upright RGB PIL image.

    - An image of more than ``max_pixels`` pixels by its header (None: no limit) is refused before
      any pixel is decoded; ``setting`` names the option in the message.
    - EXIF orientation is applied (``ImageOps.exif_transpose``): a portrait photo stays portrait.
    - 16-bit, 32-bit integer and float images are scaled to 8 bits (see ``_to_8bit``), not clipped.
    - Transparent images (RGBA, LA, P with transparency) are composited onto ``background`` (white):
      a plain ``.convert("RGB")`` keeps whatever colour the fully transparent pixels happen to store,
      often black or noise, which for emoji is most of the picture.

    An in-memory PIL image is checked against the limit too (one opened lazily is then never decoded).

    Raises:
        BadImageError: missing, unreadable, too large, truncated or not an image (``kind`` says which).

    Example:
        >>> load_rgb(open("cat.jpg", "rb").read()).mode
        'RGB'
        >>> load_rgb("scan-16bit.png").getpixel((0, 0))   # 16-bit grey 32768
        (128, 128, 128)
    """
    if isinstance(image, Image.Image):
        check_pixel_limit(image.size, max_pixels, "in-memory image", setting)
        img, what = _upright(image, owned=False), "in-memory image"
    else:
        img, what = _open(image, max_pixels, setting)
    try:
        if img.mode in _WIDE_MODES or img.mode.startswith("I;16"):
            img = _to_8bit(img)
        if _has_transparency(img):
            rgba = img.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, background + (255,))
            return Image.alpha_composite(canvas, rgba).convert("RGB")
        return img if img.mode == "RGB" else img.convert("RGB")
    except (OSError, ValueError) as e:
        raise BadImageError(f"{what}: cannot convert image to RGB ({type(e).__name__}: {e})") from e
