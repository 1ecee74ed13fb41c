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
import mimetypes
import tarfile
from pathlib import Path
from typing import Optional

from ..data.labelled import IMAGE_EXTENSIONS as IMAGE_SUFFIXES
from ..data.shard_format import IMAGE_EXTENSIONS as SHARD_IMAGE_EXTENSIONS
from .errors import ApiError

__all__ = ["stored_image", "decode_upload", "media_type"]


def media_type(name: str) -> Optional[str]:
    """The image media type of a file name, or None when its suffix is not one of the image files data reads."""
    suffix = Path(name).suffix.lower()
    return mimetypes.types_map.get(suffix, f"image/{suffix[1:]}") if suffix in IMAGE_SUFFIXES else None


def _not_found(message: str) -> ApiError:
    return ApiError(404, "image_not_found", message)


@functools.lru_cache(maxsize=64)
def _tar_members(tar_path: str, mtime: float) -> dict[str, tuple[str, int, int]]:
    """key -> (member name, data offset, size) of the image member of each sample of one shard, read once
    per version. Keys and the image member are webdataset's, as the data readers take them (see
    :func:`vlpretrain.data.shard_format.parse_sample`): the member path up to the first dot of its base name,
    folders included; the first of IMAGE_EXTENSIONS a sample has is its image."""
    from webdataset.tariterators import base_plus_ext

    found: dict[str, dict[str, tuple[str, int, int]]] = {}
    with tarfile.open(tar_path, "r:") as tar:
        for member in tar:
            key, ext = base_plus_ext(member.name)
            if member.isfile() and key is not None and ext.lower() in SHARD_IMAGE_EXTENSIONS:
                found.setdefault(key, {}).setdefault(ext.lower(), (member.name, member.offset_data, member.size))
    return {key: next(by_ext[e] for e in SHARD_IMAGE_EXTENSIONS if e in by_ext) for key, by_ext in found.items()}


def _from_tar(tar_path: Path, key: str, what: str) -> tuple[bytes, str]:
    try:
        members = _tar_members(str(tar_path), tar_path.stat().st_mtime)
    except (OSError, tarfile.TarError) as e:
        raise _not_found(f"{what}: its shard cannot be read ({type(e).__name__})") from None
    # The key is only looked up in the tar's own member table, never joined to a path.
    if key not in members:
        raise _not_found(f"{what}: its shard holds no image for this sample")
    name, offset, size = members[key]
    with open(tar_path, "rb") as f:
        f.seek(offset)
        return f.read(size), media_type(name) or "application/octet-stream"


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
    if sep and shard.endswith(".tar") and key:
        for candidate in (Path(shard), index_dir / shard):
            if candidate.is_file():
                return _from_tar(candidate, key, what)
        raise _not_found(f"{what}: its shard is no longer on disk")
    path = Path(value)
    kind = media_type(path.name)
    if kind is None:
        raise _not_found(f"{what}: the stored file is not an image by its name")
    for candidate in ((path,) if path.is_absolute() else (path, index_dir / path)):
        if candidate.is_file():
            return candidate.read_bytes(), kind
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
