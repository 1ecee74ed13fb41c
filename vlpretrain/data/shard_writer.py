"""Write a corpus as WebDataset shards (the layout of :mod:`vlpretrain.data.shard_format`), once, resized.

Each image is decoded once (:func:`~vlpretrain.data.images.load_rgb`: transparency composited on white),
resized with PIL's LANCZOS filter (``reducing_gap=3``: a box pre-shrink for large reductions, the result
indistinguishable from plain LANCZOS and much faster on big images), encoded as JPEG / PNG / WebP and
written with its caption(s) and metadata. Shard ``k`` holds corpus rows ``[k*S, (k+1)*S)``; a sample's
key is its row number, so keys and bytes do not depend on how many processes wrote them.

Files in ``out`` (no time fields anywhere, so a rerun gives the same bytes)::

    .shard_state.json       written first: source, settings, rows (a rerun must match them)
    00000.tar ...           the shards, each written to a temporary name, then renamed
    00000_stats.json ...    written after its tar: counts, and each skipped row with its reason
    manifest.json           written last: counts, settings, source, [{name, samples, bytes, sha256}]

A shard is finished when its tar and its stats file exist; a rerun keeps finished shards and
rewrites the others. Bad images (unreadable, too large by their header, undecodable, truncated)
are skipped, counted and named in the stats, never a crash.

Example:
    >>> from vlpretrain.data.named import open_named_corpus
    >>> manifest = write_shards(open_named_corpus("emoji:test"), "shards/emoji-test", image_size=64,
    ...                         shard_size=100, image_format="png", source="emoji:test")
    >>> manifest["counts"]["written"], [s["name"] for s in manifest["shards"]][:2]
    (380, ['00000.tar', '00001.tar'])
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

from PIL import Image

from ..io import atomic_write, check_replaceable, read_json, write_text
from .images import BadImageError, load_rgb
from .shard_format import MANIFEST_FORMAT, MANIFEST_NAME, sample_key, sha256_of, shard_name, stats_name

logger = logging.getLogger(__name__)

__all__ = ["ShardSettings", "write_shards", "write_shard", "STATE_NAME", "IMAGE_FORMATS", "DEFAULT_MAX_PIXELS"]

STATE_NAME = ".shard_state.json"
STATE_FORMAT = "vlpretrain-shard-state-v1"
IMAGE_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
#: Without --max-pixels: PIL's own refusal limit (twice its warning limit of 89,478,485 pixels).
DEFAULT_MAX_PIXELS = 2 * 89_478_485
RESAMPLE = "lanczos"
TAR_FORMAT = tarfile.PAX_FORMAT  # fixed, so the bytes do not depend on the Python default
MAX_DROPPED_LISTED = 1000  # rows the reader dropped, listed in the manifest (all of them are counted)


def _dumps(data: Any, indent: Optional[int] = 2) -> str:
    # Sorted keys: the same content always gives the same bytes. str() for odd extra-column values.
    return json.dumps(data, sort_keys=True, indent=indent, ensure_ascii=False, default=str)


@dataclass(frozen=True)
class ShardSettings:
    """What decides the bytes of the shards (the number of processes does not).

    Example:
        >>> ShardSettings(image_size=64).target_size(200, 100)
        (128, 64)
    """

    shard_size: int = 10_000
    image_size: Optional[int] = None
    max_side: Optional[int] = None
    image_format: str = "jpg"
    quality: int = 95
    max_pixels: int = DEFAULT_MAX_PIXELS
    resample: str = RESAMPLE

    def validate(self) -> None:
        """One-line errors, named by the command-line option."""
        for flag, value, what in (("--image-size", self.image_size, "pixels"), ("--max-side", self.max_side, "pixels"),
                                  ("--max-pixels", self.max_pixels, "pixels"),
                                  ("--shard-size", self.shard_size, "samples per shard")):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{flag}: expected a positive number of {what}, got {value}")
        if self.image_size is not None and self.max_side is not None:
            raise ValueError("--image-size and --max-side: give one of them (--image-size N: shorter side N; "
                             "--max-side N: longer side at most N)")
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"--format: unknown image format {self.image_format!r}; use jpg, png or webp")
        if isinstance(self.quality, bool) or not isinstance(self.quality, int) or not 1 <= self.quality <= 100:
            raise ValueError(f"--quality: expected a number from 1 to 100, got {self.quality}")

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """The written size: shorter side ``image_size`` or longer side at most ``max_side``, aspect
        ratio kept, never enlarged."""
        if self.image_size is not None and min(width, height) > self.image_size:
            scale = self.image_size / min(width, height)
        elif self.max_side is not None and max(width, height) > self.max_side:
            scale = self.max_side / max(width, height)
        else:
            return width, height
        # The constrained side gets exactly N (no rounding drift); the other side is rounded.
        width_is_n = (width <= height) == (self.image_size is not None)
        n = self.image_size if self.image_size is not None else self.max_side
        if width_is_n:
            return n, max(1, round(height * scale))
        return max(1, round(width * scale)), n


class _Skip(Exception):
    """A row that is not written: ``kind`` (too_large, unreadable, decode_failed, encode_failed) and why."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


# BadImageError.kind (see data/images.py) -> the kind named in the stats.
_SKIP_KINDS = {"unreadable": "unreadable", "too_large": "too_large", "decode": "decode_failed"}


def convert_image(image: Any, settings: ShardSettings) -> tuple[bytes, tuple[int, int], tuple[int, int]]:
    """Encoded bytes, written size and original size of one corpus image (path, bytes or PIL image).

    Raises:
        _Skip: the image is not written (too large by its header, unreadable, undecodable, unencodable).
    """
    try:  # the pixel limit is checked from the header, before decoding (data/images.py)
        img = load_rgb(image, max_pixels=settings.max_pixels, setting="--max-pixels")
    except BadImageError as e:
        raise _Skip(_SKIP_KINDS.get(e.kind, "decode_failed"), str(e).split(": ", 1)[-1]) from None
    except Exception as e:  # noqa: BLE001 - a corrupt file may make a PIL plugin raise anything
        raise _Skip("decode_failed", f"cannot decode image ({type(e).__name__}: {e})") from None
    original = img.size
    size = settings.target_size(*original)
    try:
        if size != original:
            img = img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        buffer = io.BytesIO()
        options = {} if settings.image_format == "png" else {"quality": settings.quality}
        img.save(buffer, IMAGE_FORMATS[settings.image_format], **options)
    except Exception as e:  # noqa: BLE001 - counted and named, like a decoding failure
        raise _Skip("encode_failed", f"cannot resize or encode ({type(e).__name__}: {e})") from None
    return buffer.getvalue(), size, original


def _sample_meta(row: Any, key: str, size: tuple[int, int], original: tuple[int, int]) -> dict[str, Any]:
    """The ``{key}.json`` member: extra columns first, so our own fields win a name clash."""
    meta = dict(row.extras or {})
    meta.update(key=key, source=row.source, width=size[0], height=size[1],
                original_width=original[0], original_height=original[1])
    if isinstance(row.image, (str, os.PathLike)):
        meta["source_path"] = os.fspath(row.image)
    if len(row.captions) > 1:
        meta["captions"] = list(row.captions)
    return meta


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shard(corpus: Any, out: Union[str, os.PathLike], index: int, settings: ShardSettings,
                on_row: Optional[Callable[[], None]] = None) -> dict[str, Any]:
    """Write shard ``index`` (corpus rows ``[index*S, (index+1)*S)``) and then its stats file; returns
    the stats. ``on_row`` is called after each row (progress).

    Example:
        >>> write_shard(corpus, "shards", 0, ShardSettings(shard_size=100, image_size=64))["written"]
        100
    """
    out = Path(out)
    start = index * settings.shard_size
    stop = min(len(corpus), start + settings.shard_size)
    written, skipped = 0, []

    def write_tar(tmp: Path) -> None:
        nonlocal written
        with tarfile.open(tmp, "w", format=TAR_FORMAT) as tar:
            for position, r in enumerate(range(start, stop)):
                row = corpus[r]
                key = sample_key(index, position, settings.shard_size)
                try:
                    data, size, original = convert_image(row.image, settings)
                except _Skip as e:
                    skipped.append({"key": key, "source": row.source, "kind": e.kind, "reason": e.reason})
                else:
                    _add_member(tar, f"{key}.{settings.image_format}", data)
                    _add_member(tar, f"{key}.txt", row.captions[0].encode("utf-8"))
                    _add_member(tar, f"{key}.json", _dumps(_sample_meta(row, key, size, original), None).encode())
                    written += 1
                if on_row is not None:
                    on_row()

    tar_path = atomic_write(out / shard_name(index), write_tar)
    by_kind: dict[str, int] = {}
    for s in skipped:
        by_kind[s["kind"]] = by_kind.get(s["kind"], 0) + 1
    stats = {"shard": shard_name(index), "rows": [start, stop], "count": stop - start, "written": written,
             "successes": written, "skipped": len(skipped), "skipped_by_reason": by_kind, "skipped_samples": skipped,
             "bytes": tar_path.stat().st_size, "sha256": sha256_of(tar_path)}
    write_text(out / stats_name(index), _dumps(stats) + "\n")  # after the tar: the shard is now finished
    return stats


# ----------------------------------------------------------------------------- the folder


def _check_out(out: Path, record: dict[str, Any]) -> Optional[dict[str, Any]]:
    """Refuse a folder that is not ours or holds shards of another source or settings; returns the
    manifest when ``out`` already holds this very shard set, finished."""
    advice = "choose another --out, or delete it to write it again"
    check_replaceable(out, [MANIFEST_NAME, STATE_NAME], "folder of shards written by `vlp data shard`", advice,
                      name=f"--out {out}")
    manifest_path, state_path = out / MANIFEST_NAME, out / STATE_NAME
    path = manifest_path if manifest_path.is_file() else state_path if state_path.is_file() else None
    if path is None:
        return None
    old = read_json(path, advice)
    expected = MANIFEST_FORMAT if path == manifest_path else STATE_FORMAT
    if not isinstance(old, dict) or old.get("format") != expected:
        raise ValueError(f"--out {out}: {path.name} is not a shard set of `vlp data shard`; {advice}")
    if old.get("source") != record["source"]:
        raise ValueError(f"--out {out}: holds shards of {old.get('source')!r}, not {record['source']!r}; {advice}")
    if old.get("rows") != record["rows"]:
        raise ValueError(f"--out {out}: holds shards of {old.get('rows')} rows, the source now has "
                         f"{record['rows']}; {advice}")
    old_settings = old.get("settings") or {}
    for name, value in record["settings"].items():
        if old_settings.get(name) != value:
            raise ValueError(f"--out {out}: holds shards written with {name}={old_settings.get(name)!r}, "
                             f"not {value!r}; {advice}")
    return old if path == manifest_path else None


def _finished(out: Path, num_shards: int) -> set[int]:
    return {k for k in range(num_shards) if (out / shard_name(k)).is_file() and (out / stats_name(k)).is_file()}


def _remove_temp_files(out: Path) -> None:
    """Temporary files of a killed run (``atomic_write`` names them ``.NAME.XXXX.tmp``), never renamed."""
    for tmp in out.glob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)


def _write_manifest(out: Path, record: dict[str, Any], num_shards: int, dropped: list) -> dict[str, Any]:
    shards, by_kind = [], {}
    written = skipped = 0
    for k in range(num_shards):
        stats = read_json(out / stats_name(k), "delete it and rerun `vlp data shard` to write the shard again")
        shards.append({"name": shard_name(k), "samples": stats["written"], "bytes": stats["bytes"],
                       "sha256": stats["sha256"]})
        written, skipped = written + stats["written"], skipped + stats["skipped"]
        for kind, n in stats["skipped_by_reason"].items():
            by_kind[kind] = by_kind.get(kind, 0) + n
    manifest = {"format": MANIFEST_FORMAT, "source": record["source"], "settings": record["settings"],
                "rows": record["rows"], "num_shards": num_shards,
                "counts": {"rows": record["rows"], "written": written, "skipped": skipped,
                           "skipped_by_reason": by_kind, "dropped_when_read": len(dropped)},
                "dropped_when_read": [{"source": s, "reason": r} for s, r in dropped[:MAX_DROPPED_LISTED]],
                "shards": shards}
    write_text(out / MANIFEST_NAME, _dumps(manifest) + "\n")  # last of all files
    return manifest


# ----------------------------------------------------------------------------- processes

_WORKER_CORPUS: Any = None


def _init_worker(corpus: Any) -> None:
    # The corpus is sent once per worker process, not once per shard.
    global _WORKER_CORPUS
    _WORKER_CORPUS = corpus


def _worker_shard(out: str, index: int, settings: ShardSettings) -> dict[str, Any]:
    return write_shard(_WORKER_CORPUS, out, index, settings)


def _write_pending(corpus: Any, out: Path, pending: list[int], settings: ShardSettings, processes: int,
                   bar: Any) -> None:
    if processes <= 1 or len(pending) <= 1:
        for k in pending:
            write_shard(corpus, out, k, settings, on_row=lambda: bar.update(1))
        return
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(max_workers=min(processes, len(pending)), initializer=_init_worker,
                             initargs=(corpus,)) as pool:
        futures = [pool.submit(_worker_shard, str(out), k, settings) for k in pending]
        for future in as_completed(futures):
            bar.update(future.result()["count"])  # per finished shard: rows are counted in the workers


def write_shards(corpus: Any, out: Union[str, os.PathLike], *, image_size: Optional[int] = None,
                 max_side: Optional[int] = None, shard_size: int = 10_000, image_format: str = "jpg",
                 quality: int = 95, processes: int = 1, max_pixels: Optional[int] = None, source: str = "",
                 progress: bool = True) -> dict[str, Any]:
    """Write ``corpus`` (rows with ``image``, ``captions``, ``extras``, ``source``) as shards in ``out``
    and return the manifest. Resumes a killed run with the same arguments; refuses ``out`` holding
    anything else. ``source`` names the corpus in the manifest (default: the corpus's name).

    Example:
        >>> m = write_shards(open_named_corpus("emoji:val"), "shards/val", image_size=64, shard_size=200,
        ...                  processes=2, source="emoji:val")
        >>> m["counts"]["written"] + m["counts"]["skipped"] == m["rows"]
        True
    """
    settings = ShardSettings(shard_size=shard_size, image_size=image_size, max_side=max_side,
                             image_format=image_format, quality=quality,
                             max_pixels=DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels)
    settings.validate()
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ValueError(f"--processes: expected a positive number of processes, got {processes}")
    out = Path(out)
    rows = len(corpus)
    name = source or str(getattr(corpus, "name", "corpus"))
    if rows == 0:
        raise ValueError(f"{name}: no usable rows to shard (check the image and caption columns)")
    num_shards = max(1, -(-rows // shard_size))
    record = {"format": STATE_FORMAT, "source": name, "rows": rows,
              "settings": asdict(settings)}
    manifest = _check_out(out, record)
    if manifest is not None and len(_finished(out, num_shards)) == num_shards:
        logger.info("%s: already finished (%d shards, same source and settings); nothing to do", out, num_shards)
        return manifest
    out.mkdir(parents=True, exist_ok=True)
    _remove_temp_files(out)
    if not (out / STATE_NAME).is_file():  # first of all files: what any later file was written with
        write_text(out / STATE_NAME, _dumps(record) + "\n")
    done = _finished(out, num_shards)
    if done:
        logger.info("resuming: %d of %d shards already written, kept", len(done), num_shards)
    pending = [k for k in range(num_shards) if k not in done]
    from ..progress import progress_bar

    done_rows = sum(min(rows, (k + 1) * shard_size) - k * shard_size for k in done)
    with progress_bar(total=rows, initial=done_rows, unit="img", desc="shard", enabled=progress) as bar:
        _write_pending(corpus, out, pending, settings, processes, bar)
    return _write_manifest(out, record, num_shards, list(getattr(corpus, "skipped", []) or []))
