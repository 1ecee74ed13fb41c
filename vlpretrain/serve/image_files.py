"""Images in and out of the service: the indexed image of a hit (by id, never by a path from a request),
and uploaded query images checked to be images.

An index's meta.parquet stores each row's image as a file path, or as ``shard.tar:key`` for a sample
inside a WebDataset shard; :func:`stored_image` turns that stored value into bytes to send. Only files
with an image suffix are served, so a row can never make the service send some other file.

Example:
    >>> data, media_type = stored_image("/data/emoji/images/1f63a.png", Path("indexes/emoji"))
    >>> media_type
    'image/png'
    >>> decode_upload(open("cat.jpg", "rb").read(), "cat.jpg").size
    (640, 480)
"""

from __future__ import annotations

import functools
import os
import tarfile
from pathlib import Path
from typing import Optional

from .errors import ApiError

__all__ = ["IMAGE_TYPES", "stored_image", "decode_upload"]

IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
               ".webp": "image/webp", ".bmp": "image/bmp", ".tif": "image/tiff", ".tiff": "image/tiff"}


def _not_found(message: str) -> ApiError:
    return ApiError(404, "image_not_found", message)


@functools.lru_cache(maxsize=64)
def _tar_members(tar_path: str, mtime: float) -> dict[str, tuple[str, int, int]]:
    """key -> (member name, data offset, size) of the image members of one shard, read once per version."""
    members: dict[str, tuple[str, int, int]] = {}
    with tarfile.open(tar_path, "r:") as tar:
        for member in tar:
            stem, suffix = os.path.splitext(member.name)
            if member.isfile() and suffix.lower() in IMAGE_TYPES:
                members.setdefault(stem, (member.name, member.offset_data, member.size))
    return members


def _from_tar(tar_path: Path, key: str, what: str) -> tuple[bytes, str]:
    try:
        members = _tar_members(str(tar_path), tar_path.stat().st_mtime)
    except (OSError, tarfile.TarError) as e:
        raise _not_found(f"{what}: its shard cannot be read ({type(e).__name__})") from None
    if key not in members:
        raise _not_found(f"{what}: its shard holds no image for this sample")
    name, offset, size = members[key]
    with open(tar_path, "rb") as f:
        f.seek(offset)
        return f.read(size), IMAGE_TYPES[os.path.splitext(name)[1].lower()]


def stored_image(value: Optional[str], index_dir: Path, what: str = "image") -> tuple[bytes, str]:
    """The bytes and media type of a stored image value (a path, or ``shard.tar:key``).

    Relative paths are tried against the working folder, then the index folder. Anything that is not
    an existing file with an image suffix (or an image inside a shard) is a 404 naming ``what``.

    Example:
        >>> stored_image("shards/00000.tar:000000017", Path("indexes/cc3m"))[1]
        'image/jpeg'
    """
    if not value:
        raise _not_found(f"{what}: the index stores no image file for it (images held inside a data set)")
    shard, sep, key = value.rpartition(":")
    if sep and shard.endswith(".tar") and key and "/" not in key:
        for candidate in (Path(shard), index_dir / shard):
            if candidate.is_file():
                return _from_tar(candidate, key, what)
        raise _not_found(f"{what}: its shard is no longer on disk")
    path = Path(value)
    media_type = IMAGE_TYPES.get(path.suffix.lower())
    if media_type is None:
        raise _not_found(f"{what}: the stored file is not an image by its name")
    for candidate in ((path,) if path.is_absolute() else (path, index_dir / path)):
        if candidate.is_file():
            return candidate.read_bytes(), media_type
    raise _not_found(f"{what}: the image file is no longer on disk")


def decode_upload(data: bytes, name: str):
    """An uploaded query image as an upright RGB PIL image; a file that is not an image is a 400 naming it.

    Example:
        >>> decode_upload(b"hello", "notes.txt")
        ApiError: upload 'notes.txt' is not an image: not a readable image (unknown or corrupt format)
    """
    from ..data.images import BadImageError, load_rgb

    if not data:
        raise ApiError(400, "not_an_image", f"upload '{name}' is empty: send an image file")
    try:
        return load_rgb(bytes(data), setting="the server's image pixel limit")
    except BadImageError as e:
        reason = str(e).split(": ", 1)[-1]  # drop "N bytes: ", the name is more useful
        raise ApiError(400, "not_an_image", f"upload '{name}' is not an image: {reason}") from None
