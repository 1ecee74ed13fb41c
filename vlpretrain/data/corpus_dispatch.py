"""``open_corpus``: choose the corpus reader from what a path or hub name is.

Example:
    >>> from vlpretrain.data import open_corpus
    >>> open_corpus("pairs.csv"), open_corpus("saved_dataset/", split="test"), open_corpus("hf:nlphuji/flickr30k")
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from .corpus import ImageCaptionCorpus
from .corpus_columns import ColumnSpec
from .hf_corpus import HFDatasetCorpus
from .table_corpus import TABLE_EXTENSIONS, TableCorpus

__all__ = ["open_corpus", "is_dataset_folder"]

_SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")


def is_dataset_folder(path: Path) -> bool:
    """True for a folder Hugging Face ``datasets`` reads: ``save_to_disk`` output or an imagefolder with
    a metadata file (as opposed to a folder of class subfolders or of split tables).

    Example:
        >>> is_dataset_folder(Path("saved_dataset")), is_dataset_folder(Path("photos_by_class"))
        (True, False)
    """
    return path.is_dir() and any((path / m).is_file() for m in _SAVED_MARKERS + _METADATA_FILES)


def open_corpus(
    spec: str | os.PathLike[str],
    split: str | None = None,
    image_column: str = "image",
    caption_column: ColumnSpec = "caption",
    extra_columns: Sequence[str] | None = None,
    root: str | os.PathLike[str] | None = None,
    encoding: str = "utf-8",
    on_bad_lines: str = "error",
) -> ImageCaptionCorpus:
    """Open a corpus from a path or hub name, choosing the reader from what ``spec`` is.

    - a table file (.csv .tsv .tab .jsonl .json .parquet): :class:`TableCorpus` (``split`` unused);
    - a folder written by ``save_to_disk``: :meth:`HFDatasetCorpus.from_disk`;
    - a folder with ``metadata.jsonl`` / ``metadata.csv``: :meth:`HFDatasetCorpus.from_imagefolder`;
    - a folder holding ``<split>.csv`` (or another table extension), e.g. the emoji demo corpus:
      that split's table (default "train");
    - ``hf:NAME``: :meth:`HFDatasetCorpus.from_hub` (default split "train").

    ``encoding`` and ``on_bad_lines`` (``data.encoding`` / ``data.on_bad_lines``) say how text tables
    are read (see :class:`TableCorpus`).

    Example:
        >>> open_corpus("~/.cache/vlpretrain/emoji-v1", split="val")
        TableCorpus('/home/me/.cache/vlpretrain/emoji-v1/val.csv', rows=..., skipped=0)
    """
    columns = dict(image_column=image_column, caption_column=caption_column, extra_columns=extra_columns)
    reading = dict(encoding=encoding, on_bad_lines=on_bad_lines)
    text = os.fspath(spec)
    if text.startswith("hf:"):
        return HFDatasetCorpus.from_hub(text[3:], split=split or "train", **columns)
    path = Path(os.path.expanduser(text))
    if path.is_file():
        return TableCorpus(path, root=root, **columns, **reading)
    if path.is_dir():
        if any((path / m).is_file() for m in _SAVED_MARKERS):
            return HFDatasetCorpus.from_disk(path, split=split, **columns)
        if any((path / m).is_file() for m in _METADATA_FILES):
            return HFDatasetCorpus.from_imagefolder(path, split=split, **columns)
        wanted = split or "train"
        for ext in TABLE_EXTENSIONS:
            if (path / f"{wanted}{ext}").is_file():
                return TableCorpus(path / f"{wanted}{ext}", root=root, **columns, **reading)
        tables = sorted(p.name for p in path.iterdir() if p.suffix.lower() in TABLE_EXTENSIONS)
        raise ValueError(
            f"{text}: not a corpus folder: expected a `save_to_disk` folder (dataset_info.json / "
            f"state.json), an imagefolder with metadata.jsonl or metadata.csv, or a {wanted}.csv "
            f"(or .tsv/.jsonl/.parquet); tables here: {tables}"
        )
    if path.suffix.lower() in TABLE_EXTENSIONS or path.suffix:
        raise FileNotFoundError(f"{text}: no such file")
    raise FileNotFoundError(f"{text}: no such file or folder (for a hub dataset write hf:{text})")
