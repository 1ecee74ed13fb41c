"""The files of an index folder: writing them (info.json last), reading info.json, and loading a checked index.

Layout of an index folder ``INDEX_DIR``::

    INDEX_DIR/index.faiss   inner-product faiss index over unit-norm float32 vectors
    INDEX_DIR/meta.parquet  one row per vector in id order: id, modality, row, image, caption, source, extras
    INDEX_DIR/info.json     kind, factory string, search parameters, recall@10, signature, ... (written last)
    INDEX_DIR/embeddings/   only when built from a model and data: the embeddings it was built from

Example:
    >>> read_info("indexes/pairs")["kind"]
    'flat'
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Any, Union

import numpy as np

from ..io import check_replaceable, old_sibling, read_manifest, write_json

__all__ = ["FORMAT", "INDEX_NAME", "META_NAME", "INFO_NAME", "JOINT_NAME", "EMBEDDINGS_NAME", "finish_index_folder",
           "BUSY_ADVICE", "sha256_file",
           "link_or_copy", "check_destination", "remove_stale_temp_folders", "write_index_folder", "read_info",
           "read_faiss", "MetaRows"]

FORMAT = "vlpretrain-index-v1"
INDEX_NAME = "index.faiss"
META_NAME = "meta.parquet"
INFO_NAME = "info.json"
JOINT_NAME = "joint.json"  # marks a joint index folder: image/ and text/ index folders of one corpus
EMBEDDINGS_NAME = "embeddings"  # embeddings exported by build_from_corpus live inside the index folder
BUSY_ADVICE = "wait for it, or choose another --out"  # what io.folder_lock tells a second writer


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def link_or_copy(src: str, dst: str) -> None:
    """Hard-link ``src`` to ``dst`` (no copy, and the source stays whole), or copy where links fail."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def check_destination(out: Path) -> None:
    """Refuse to build into ``out`` unless it is missing, an empty folder or an index folder (with
    info.json): a user's other folder or file is never replaced.

    Example:
        >>> check_destination(Path("notes.txt"))
        ValueError: --out notes.txt: exists and is not a folder; choose another --out, or delete it to build there
    """
    check_replaceable(out, [INFO_NAME, JOINT_NAME], f"vlpretrain index folder (it has no {INFO_NAME})",
                      "choose another --out, or delete it to build there", name=f"--out {out}")


def remove_stale_temp_folders(out: Path) -> list[Path]:
    """Remove the temporary folders that killed writes of ``out`` left beside it, and return them.

    Only folders named exactly as :func:`vlpretrain.io.temp_folder_beside` names them (``.OUT.tmp-``
    and tempfile's 8 random characters) are removed; anything else is left alone. Call it holding
    :func:`vlpretrain.io.folder_lock` of ``out``, so no running write's folder is taken.

    Example:
        >>> remove_stale_temp_folders(Path("indexes/pairs"))
        [PosixPath('indexes/.pairs.tmp-k2x_9qa1')]
    """
    out = Path(os.path.abspath(out))
    pattern = re.compile(re.escape(f".{out.name}.tmp-") + r"[a-z0-9_]{8}")
    if not out.parent.is_dir():
        return []
    stale = [p for p in sorted(out.parent.iterdir())
             if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    return stale


def write_index_folder(tmp: Path, index, meta, info: dict[str, Any]) -> dict[str, Any]:
    """Write index.faiss, meta.parquet and (last) info.json into the temp folder ``tmp``."""
    import faiss

    faiss.write_index(index, str(tmp / INDEX_NAME))
    meta.to_parquet(tmp / META_NAME, index=False)
    return finish_index_folder(tmp, info)


def finish_index_folder(tmp: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Record the size and SHA-256 of ``tmp/index.faiss`` in ``info`` and write info.json (last)."""
    size = (tmp / INDEX_NAME).stat().st_size
    info = dict(info, index_bytes=size, index_sha256=sha256_file(tmp / INDEX_NAME))
    warnings = [w for w in info.get("warnings", []) if not w.startswith(f"{INDEX_NAME} is ")]
    if size > int(info["memory_budget"]):
        # The budget steers the choice of kind; an index over it is still written, with a note.
        warnings.append(f"{INDEX_NAME} is {size} bytes, above the memory budget of {info['memory_budget']} "
                        f"bytes: rebuild with --kind ivfpq or a larger --memory-budget")
    info["warnings"] = warnings
    write_json(info, tmp / INFO_NAME)
    return info


def read_info(path: Union[str, os.PathLike]) -> dict[str, Any]:
    """The parsed info.json of an index folder, with a clear error when it is missing or not an index.

    Example:
        >>> read_info("indexes/pairs")["kind"]
        'flat'
    """
    path = Path(path)
    if not path.is_dir():
        if (old_sibling(path) / INFO_NAME).is_file():
            raise FileNotFoundError(f"{path}: no such index folder, but {old_sibling(path)} holds the index an "
                                    f"interrupted write moved aside: rename it back to {path}")
        raise FileNotFoundError(f"{path}: no such index folder (make one with `vlp index build`)")
    info_path = path / INFO_NAME
    if not info_path.is_file() and (path / JOINT_NAME).is_file():
        raise FileNotFoundError(f"{path} is a joint index: open {path / 'image'} or {path / 'text'}, or load it with "
                                f"vlpretrain.retrieval.joint_index.JointIndex.load")
    if not info_path.is_file():
        raise FileNotFoundError(f"{path} has no {INFO_NAME}: not a finished index; rebuild it with `vlp index build`")
    return read_manifest(info_path, FORMAT, "rebuild it with `vlp index build`")


def read_faiss(path: Path, info: dict[str, Any]):
    """The faiss index of folder ``path``, checked against the size and SHA-256 that ``info`` records.

    The file is read once: hashed, then deserialized from memory.

    Example:
        >>> index = read_faiss(Path("indexes/pairs"), read_info("indexes/pairs"))
    """
    import faiss

    index_path = path / INDEX_NAME
    expected = int(info.get("index_bytes", -1))
    size = index_path.stat().st_size if index_path.is_file() else 0
    corrupt = (f"{index_path} is truncated or corrupt ({size} bytes, expected {expected}): "
               f"rebuild it with `vlp index build`")
    if size != expected:
        raise ValueError(corrupt)
    data = index_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != info.get("index_sha256"):
        raise ValueError(corrupt)
    if info.get("kind") == "ivf-ondisk":
        from .ondisk import read_ondisk

        return read_ondisk(path, info)
    try:
        return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except RuntimeError:
        raise ValueError(corrupt) from None


class MetaRows:
    """Rows of a meta.parquet by id, reading only the row groups that hold them from the memory-mapped
    file (an on-disk index's metadata can be larger than memory; its writer makes a row group per shard).
    Thread-safe: one read at a time.

    Example:
        >>> MetaRows(Path("indexes/big/meta.parquet"))([17, 3])["caption"].tolist()
        ['red heart', 'a cat']
    """

    def __init__(self, path: Path):
        import threading

        self.path, self._lock, self._file, self._starts = path, threading.Lock(), None, None

    def __call__(self, ids) -> Any:
        import pyarrow.parquet as pq

        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        with self._lock:
            if self._file is None:
                self._file = pq.ParquetFile(str(self.path), memory_map=True)
                sizes = [self._file.metadata.row_group(g).num_rows for g in range(self._file.num_row_groups)]
                self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
            groups = np.searchsorted(self._starts, ids, side="right") - 1
            wanted = np.unique(groups)
            table = self._file.read_row_groups(wanted.tolist())
        # Where each wanted group starts in the table read, then each id's place in it.
        sizes = self._starts[wanted + 1] - self._starts[wanted]
        base = dict(zip(wanted.tolist(), np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()))
        places = np.array([base[g] for g in groups.tolist()], dtype=np.int64) + ids - self._starts[groups]
        return table.take(places).to_pandas()
