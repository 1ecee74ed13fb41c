"""WebDataset shards on disk: img2dataset's layout, our manifest, and how a spec names a set of shards.

A shard is a tar of samples; the members of one sample share a key (``000001234``)::

    {key}.jpg | .png | .webp   the image (resized once when we wrote it)
    {key}.txt                  the caption (the first one when there are several)
    {key}.json                 original path, width, height, extra columns; "captions": [...] when several
    {shard}_stats.json         beside each tar: written / skipped counts and why (img2dataset writes these too)
    manifest.json              ours only: counts, the shard list with sizes and SHA-256 (checked when read)

Shards written by img2dataset (LAION, DataComp, CC3M / CC12M, COYO) have no manifest and are read as
they are. A shard spec is a folder (every ``*.tar`` in it, or the shards its manifest lists), a
``manifest.json``, or a brace pattern such as ``shards/{00000..00099}.tar``.

Example:
    >>> shards = resolve_shards("shards/emoji")            # folder with a manifest.json
    >>> [s.name for s in shards[:2]], sum(s.samples or 0 for s in shards)
    (['00000.tar', '00001.tar'], 3764)
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

from ..io import read_manifest

__all__ = ["MANIFEST_NAME", "MANIFEST_FORMAT", "IMAGE_EXTENSIONS", "ShardInfo", "ShardSample", "shard_name",
           "sample_key", "stats_name", "is_shard_spec", "resolve_shards", "sha256_of", "parse_sample", "BadSampleError",
           "read_shard_samples"]

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "vlpretrain-shards-v1"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
KEY_DIGITS = 9  # img2dataset's: shard number (5 digits) then position in the shard (4)


@dataclass(frozen=True)
class ShardInfo:
    """One tar of a shard set; ``samples``, ``bytes`` and ``sha256`` are known when a manifest lists it."""

    path: Path
    samples: Optional[int] = None
    bytes: Optional[int] = None
    sha256: Optional[str] = None

    @property
    def name(self) -> str:
        return self.path.name


class BadSampleError(ValueError):
    """A tar sample that cannot be used (no image member, no caption, unreadable JSON); the message
    names the shard and the key, and the readers count and skip it."""


@dataclass(frozen=True)
class ShardSample:
    """One sample of a shard, not yet decoded: the encoded image and its captions.

    ``source`` names it for messages (``shards/00003.tar:000003017``); ``meta`` is its ``.json``
    member (original path, width, height, extra columns) or {}.
    """

    key: str
    image: bytes
    image_ext: str
    captions: list[str]
    meta: dict
    source: str


def parse_sample(sample: dict) -> ShardSample:
    """A webdataset sample dict (``__key__``, ``__url__`` and one entry per member extension, as bytes)
    as a :class:`ShardSample`. Captions: ``json["captions"]`` when present (several per image), else the
    ``.txt`` member, else ``json["caption"]``.

    Raises:
        BadSampleError: no image member, no caption, or a ``.json`` member that is not a JSON object.

    Example:
        >>> parse_sample({"__key__": "000000001", "__url__": "s/00000.tar", "jpg": b"...", "txt": b"a frog"}).captions
        ['a frog']
    """
    import json

    key = str(sample.get("__key__", "?"))
    source = f"{sample.get('__url__', '?')}:{key}"
    ext = next((e for e in IMAGE_EXTENSIONS if sample.get(e) is not None), None)
    if ext is None:
        raise BadSampleError(f"{source}: no image member ({'/'.join(IMAGE_EXTENSIONS)})")
    meta: dict = {}
    if sample.get("json") is not None:
        try:
            meta = json.loads(sample["json"])
        except (ValueError, UnicodeDecodeError) as e:
            raise BadSampleError(f"{source}: {key}.json is not valid JSON ({e})") from None
        if not isinstance(meta, dict):
            raise BadSampleError(f"{source}: {key}.json is not a JSON object")
    captions = meta.get("captions")
    if not (isinstance(captions, list) and captions):
        text = sample.get("txt")
        if text is not None:
            captions = [text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)]
        elif isinstance(meta.get("caption"), str):
            captions = [meta["caption"]]
        else:
            captions = []
    captions = [str(c).strip() for c in captions if str(c).strip()]
    if not captions:
        raise BadSampleError(f"{source}: no caption (.txt member or \"captions\" in {key}.json)")
    return ShardSample(key, bytes(sample[ext]), ext, captions, meta, source)


def shard_name(index: int) -> str:
    """File name of shard ``index``: ``00042.tar``."""
    return f"{index:05d}.tar"


def stats_name(index: int) -> str:
    """File name of shard ``index``'s statistics: ``00042_stats.json``."""
    return f"{index:05d}_stats.json"


def sample_key(shard_index: int, position: int, shard_size: int) -> str:
    """The key of the ``position``-th sample of shard ``shard_index`` (img2dataset's numbering: the
    sample's global number, zero-padded), deterministic whatever process wrote it.

    Example:
        >>> sample_key(3, 17, 1000)
        '000003017'
    """
    return f"{shard_index * shard_size + position:0{KEY_DIGITS}d}"


def sha256_of(path: Union[str, os.PathLike]) -> str:
    """Hex SHA-256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def is_shard_spec(spec: Union[str, os.PathLike]) -> bool:
    """True when ``spec`` names WebDataset shards rather than a table or dataset: a ``.tar`` path or
    pattern, a shard ``manifest.json``, or a folder holding ``.tar`` files.

    Example:
        >>> is_shard_spec("shards/{00000..00009}.tar"), is_shard_spec("pairs.csv")
        (True, False)
    """
    text = os.fspath(spec)
    if text.endswith(".tar") or (".tar" in text and "{" in text):
        return True
    path = Path(text)
    if path.is_file() and path.name == MANIFEST_NAME:
        return _manifest_format(path) == MANIFEST_FORMAT
    return path.is_dir() and (any(path.glob("*.tar")) or (path / MANIFEST_NAME).is_file()
                              and _manifest_format(path / MANIFEST_NAME) == MANIFEST_FORMAT)


def _manifest_format(path: Path) -> Any:
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8")).get("format")
    except (ValueError, OSError, AttributeError):
        return None


def _expand_braces(pattern: str) -> list[str]:
    from braceexpand import braceexpand

    return list(braceexpand(pattern))


def resolve_shards(spec: Union[str, os.PathLike], verify: bool = False) -> list[ShardInfo]:
    """The shards a spec names, in order, each checked to exist and to have the size its manifest says
    (and, with ``verify``, the SHA-256). Every problem is one line naming the file and the fix.

    Example:
        >>> resolve_shards("shards/{00000..00001}.tar")
        [ShardInfo(path=PosixPath('shards/00000.tar'), samples=None, bytes=None, sha256=None), ...]
    """
    text = os.fspath(spec)
    path = Path(text)
    manifest_path = path if path.name == MANIFEST_NAME else path / MANIFEST_NAME
    if manifest_path.is_file():
        return _from_manifest(manifest_path, verify)
    if path.is_dir():
        tars = sorted(path.glob("*.tar"))
        if not tars:
            raise FileNotFoundError(f"{text}: no .tar shards in this folder (write some with `vlp data shard`)")
        return [ShardInfo(p) for p in tars]
    names = _expand_braces(text)
    found = [Path(n) for n in names if Path(n).is_file()]
    if not found:
        raise FileNotFoundError(f"{text}: the pattern matches no shard (expanded to {len(names)} names, "
                                f"e.g. {names[0]}); check the folder and the brace range")
    missing = [n for n in names if not Path(n).is_file()]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: no such shard ({len(missing)} of the {len(names)} shards the "
                                f"pattern {text} names are missing)")
    return [ShardInfo(p) for p in found]


def _from_manifest(manifest_path: Path, verify: bool) -> list[ShardInfo]:
    manifest = read_manifest(manifest_path, MANIFEST_FORMAT, "write the shards again with `vlp data shard`")
    shards = []
    for entry in manifest.get("shards", []):
        shard = ShardInfo(manifest_path.parent / entry["name"], entry.get("samples"), entry.get("bytes"),
                          entry.get("sha256"))
        if not shard.path.is_file():
            raise FileNotFoundError(f"{shard.path}: listed in {manifest_path} but missing; rerun `vlp data shard` "
                                    f"with the same arguments to write it again")
        size = shard.path.stat().st_size  # cheap, so always: a truncated copy fails here, not mid-epoch
        if shard.bytes is not None and size != shard.bytes:
            raise ValueError(f"{shard.path}: {size} bytes, {manifest_path} says {shard.bytes}: the shard is "
                             f"truncated or was changed; write it again with `vlp data shard`")
        if verify:
            if shard.sha256 is not None and sha256_of(shard.path) != shard.sha256:
                raise ValueError(f"{shard.path}: SHA-256 does not match {manifest_path}: the shard is corrupt or "
                                 f"was changed; write it again with `vlp data shard`")
        shards.append(shard)
    if not shards:
        raise ValueError(f"{manifest_path}: lists no shards; write them with `vlp data shard`")
    return shards


def read_shard_samples(url: Union[str, os.PathLike], on_bad: Callable[[str, str], None]) -> Iterator[ShardSample]:
    """The usable samples of one tar, in order, read with webdataset's tar iterator. A bad sample (see
    :func:`parse_sample`) or an unreadable tail (a truncated or corrupt tar) is passed to
    ``on_bad(source, reason)`` and skipped; reading never raises on bad data.

    Example:
        >>> bad = []
        >>> samples = list(read_shard_samples("shards/00000.tar", lambda source, why: bad.append((source, why))))
    """
    from webdataset.tariterators import tarfile_samples

    url = os.fspath(url)
    errors: list[Exception] = []

    def keep_going(error: Exception) -> bool:
        errors.append(error)
        return True  # webdataset's handler protocol: True = continue with the next member / shard

    try:
        for sample in tarfile_samples([{"url": url}], handler=keep_going):
            if errors:
                on_bad(url, f"unreadable tar data ({errors.pop()})")
                errors.clear()
            try:
                yield parse_sample(sample)
            except BadSampleError as e:
                source, _, reason = str(e).partition(": ")
                on_bad(source, reason)
    except Exception as e:  # noqa: BLE001 - a tar that cannot be opened at all is one counted skip
        on_bad(url, f"unreadable shard ({type(e).__name__}: {e})")
    for error in errors:
        on_bad(url, f"unreadable tar data ({error})")
