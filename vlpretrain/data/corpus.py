"""Corpus readers: random-access sequences of (image, captions, extras) rows.

A corpus only says *where* each image is and which captions go with it; decoding, transforms and
tokenization happen later in :class:`vlpretrain.data.dataset.ImageTextDataset`.

Example:
    >>> from vlpretrain.data import open_corpus
    >>> corpus = open_corpus("data/pairs.csv")          # or .tsv / .jsonl / .parquet
    >>> row = corpus[0]; row.captions, row.source
    (['a dog on a beach'], 'data/pairs.csv:row 1')
    >>> open_corpus("hf:nlphuji/flickr30k", split="test")  # hub, needs internet
"""
from __future__ import annotations

import csv
import difflib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence, Union

import pandas as pd

logger = logging.getLogger(__name__)

__all__ = [
    "CorpusRow",
    "ImageCaptionCorpus",
    "TableCorpus",
    "HFDatasetCorpus",
    "open_corpus",
    "TABLE_EXTENSIONS",
]

#: Table extensions read by :class:`TableCorpus`, mapped to a reader kind.
TABLE_EXTENSIONS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}

ColumnSpec = Union[str, Sequence[str]]


@dataclass
class CorpusRow:
    """One image with its caption(s).

    ``image`` is an absolute path, raw encoded bytes or a decoded PIL image; ``source`` says where
    the row came from, for messages ("pairs.csv:row 17" with 1-based data rows, or
    "hf:name[split]#17" with the dataset's 0-based index).
    """

    image: Any  # str | bytes | PIL.Image.Image
    captions: list[str]
    extras: dict = field(default_factory=dict)
    source: str = ""


class ImageCaptionCorpus:
    """Base of all corpora: ``len(corpus)``, ``corpus[i] -> CorpusRow``, ``corpus.name``.

    ``skipped`` lists ``(source, reason)`` for rows dropped while loading (missing image file,
    empty caption), so callers can report them.
    """

    name: str = "corpus"

    def __init__(self) -> None:
        self.skipped: list[tuple[str, str]] = []

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, i: int) -> CorpusRow:  # pragma: no cover - abstract
        raise NotImplementedError

    def __iter__(self) -> Iterator[CorpusRow]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, rows={len(self)}, skipped={len(self.skipped)})"

    def _check_index(self, i: int) -> int:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"{self.name}: index {i} out of range for {n} rows")
        return i


# ----------------------------------------------------------------------------- helpers


def _missing_column_error(where: str, column: str, columns: list[str], param: str) -> ValueError:
    """The one message for a wrong column name, with a difflib suggestion when there is one."""
    lowered = {c.lower(): c for c in columns}
    close = difflib.get_close_matches(column.lower(), list(lowered), n=1)
    hint = f"did you mean {lowered[close[0]]!r}? " if close else ""
    return ValueError(f"{where}: no column {column!r}; columns are {columns!r} ({hint}set {param}=...)")


def _as_list(spec: ColumnSpec) -> list[str]:
    return [spec] if isinstance(spec, str) else list(spec)


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _captions_from_cell(value: Any) -> list[str]:
    """Normalize one caption cell to a list of non-empty, stripped strings.

    Accepts a string, a JSON list written into a string (CSV cells cannot hold lists), or any
    list / tuple / numpy array (JSONL and parquet list columns).
    """
    if _is_missing(value):
        return []
    if isinstance(value, str):
        s = value.strip()
        if s.startswith("[") and s.endswith("]"):
            try:
                parsed = json.loads(s)
            except ValueError:
                parsed = None  # a caption that merely looks like a list, e.g. "[sic]"
            if isinstance(parsed, list):
                return [str(c).strip() for c in parsed if not _is_missing(c) and str(c).strip()]
        return [s] if s else []
    if isinstance(value, (list, tuple)) or hasattr(value, "tolist"):
        items = value.tolist() if hasattr(value, "tolist") else value
        if not isinstance(items, list):  # a numpy scalar
            items = [items]
        return [str(c).strip() for c in items if not _is_missing(c) and str(c).strip()]
    s = str(value).strip()
    return [s] if s else []


def _select_extras(columns: list[str], used: list[str], extra_columns: Sequence[str] | None,
                   where: str) -> list[str]:
    if extra_columns is None:
        return [c for c in columns if c not in used]
    for c in extra_columns:
        if c not in columns:
            raise _missing_column_error(where, c, columns, "extra_columns")
    return list(extra_columns)


def _plain(value: Any) -> Any:
    """numpy scalars / arrays -> Python values, so extras pickle small and compare simply."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


# ----------------------------------------------------------------------------- tables


def _read_table(path: Path, kind: str, text_columns: list[str]) -> pd.DataFrame:
    if kind in ("csv", "tsv"):
        return pd.read_csv(
            path,
            sep="," if kind == "csv" else "\t",
            # Standard quoting for TSV too, so files written by pandas / the csv module round-trip
            # (they quote cells holding '"', e.g. a JSON list of captions). Unquoted TSVs whose
            # captions *start* with a quote are the price; strip such quotes before converting.
            quoting=csv.QUOTE_MINIMAL,
            # Paths and captions stay strings ("NA", "None", "0042" are valid captions / names);
            # only empty cells count as missing.
            dtype={c: str for c in text_columns},
            keep_default_na=False,
            na_values=[""],
        )
    if kind == "jsonl":
        # dtype=False: no guessing (numeric-looking file names stay strings).
        with open(path, encoding="utf-8") as f:
            head = f.read(4096).lstrip()
        if head.startswith("["):  # a ".json" holding one array of records, not one record a line
            return pd.read_json(path, dtype=False)
        return pd.read_json(path, lines=True, dtype=False)
    return pd.read_parquet(path)


class TableCorpus(ImageCaptionCorpus):
    """Image-caption pairs from a CSV, TSV (.tsv/.tab), JSONL (.jsonl/.json) or parquet file.

    Image paths are relative to the table's folder (or ``root``); absolute paths are kept; a cell
    may also hold encoded bytes (parquet) or a ``{"bytes", "path"}`` dict (parquet written by
    ``datasets``). Several captions per image: a list cell (JSONL, parquet), a JSON list in a CSV
    cell (``["a","b"]``), or ``caption_column=["caption_1", "caption_2"]``.

    Rows whose image file does not exist or that have no non-empty caption are dropped and listed
    in ``skipped`` (one warning in the log, never a crash).

    Example:
        >>> corpus = TableCorpus("pairs.csv", image_column="filepath", caption_column="title")
        >>> corpus[0].image        # absolute path
        '/data/images/0001.jpg'
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        image_column: str = "image",
        caption_column: ColumnSpec = "caption",
        extra_columns: Sequence[str] | None = None,
        root: str | os.PathLike[str] | None = None,
        check_files: bool = True,
    ) -> None:
        super().__init__()
        self.path = Path(path)
        self.name = str(path)
        where = self.name
        ext = self.path.suffix.lower()
        if ext not in TABLE_EXTENSIONS:
            raise ValueError(
                f"{where}: unsupported table format {ext or '(no extension)'!r}; use one of "
                f"{sorted(TABLE_EXTENSIONS)} (or a `datasets` folder, an imagefolder, or hf:NAME)"
            )
        if not self.path.is_file():
            raise FileNotFoundError(f"{where}: no such file")
        caption_columns = _as_list(caption_column)
        df = _read_table(self.path, TABLE_EXTENSIONS[ext], [image_column] + caption_columns)
        columns = [str(c) for c in df.columns]
        if image_column not in columns:
            raise _missing_column_error(where, image_column, columns, "image_column")
        for c in caption_columns:
            if c not in columns:
                raise _missing_column_error(where, c, columns, "caption_column")
        self.extra_columns = _select_extras(columns, [image_column] + caption_columns, extra_columns, where)
        base = Path(root) if root is not None else self.path.parent
        base = base.resolve()

        # Plain Python lists: row access by position is ~100x faster than DataFrame.iloc.
        images: list[Any] = []
        captions: list[list[str]] = []
        rows: list[int] = []
        missing_image: list[str] = []
        empty_caption: list[str] = []
        image_values = df[image_column].tolist()
        caption_values = [df[c].tolist() for c in caption_columns]
        for r, cell in enumerate(image_values):
            source = f"{where}:row {r + 1}"
            caps = [c for col in caption_values for c in _captions_from_cell(col[r])]
            if not caps:
                empty_caption.append(source)
                continue
            image = self._resolve_image(cell, base)
            if image is None:
                missing_image.append(source)
                continue
            if check_files and isinstance(image, str) and not os.path.exists(image):
                missing_image.append(source)
                continue
            images.append(image)
            captions.append(caps)
            rows.append(r)
        self._images = images
        self._captions = captions
        self._rows = rows
        keep = df.iloc[rows] if len(rows) != len(df) else df
        self._extras = {c: [_plain(v) for v in keep[c].tolist()] for c in self.extra_columns}
        self.skipped = [(s, "image file missing") for s in missing_image] + [
            (s, "empty caption") for s in empty_caption
        ]
        for reason, sources in (("image file missing", missing_image), ("empty caption", empty_caption)):
            if sources:
                logger.warning(
                    "%s: dropped %d of %d rows (%s), e.g. %s",
                    where, len(sources), len(df), reason, ", ".join(sources[:3]),
                )
        if not images:
            logger.warning("%s: no usable rows", where)

    @staticmethod
    def _resolve_image(cell: Any, base: Path) -> Any:
        if _is_missing(cell):
            return None
        if isinstance(cell, dict):  # parquet written by `datasets`: {"bytes": ..., "path": ...}
            if cell.get("bytes") is not None:
                return bytes(cell["bytes"])
            cell = cell.get("path")
            if _is_missing(cell):
                return None
        if isinstance(cell, (bytes, bytearray)):
            return bytes(cell)
        s = str(cell).strip()
        if not s:
            return None
        p = Path(os.path.expanduser(s))
        return str(p if p.is_absolute() else base / p)

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, i: int) -> CorpusRow:
        i = self._check_index(i)
        return CorpusRow(
            image=self._images[i],
            captions=list(self._captions[i]),
            extras={c: v[i] for c, v in self._extras.items()},
            source=f"{self.name}:row {self._rows[i] + 1}",
        )


# ----------------------------------------------------------------------------- HF datasets


def _pick_split(dd: Any, split: str | None, where: str) -> tuple[Any, str]:
    """Choose one split of a DatasetDict; default "train", or the only split there is."""
    names = list(dd.keys())
    if split is None:
        if "train" in names:
            split = "train"
        elif len(names) == 1:
            split = names[0]
        else:
            raise ValueError(f"{where}: several splits {names}; choose one with split=...")
    if split not in names:
        raise ValueError(f"{where}: no split {split!r}; available splits are {names}")
    return dd[split], split


class HFDatasetCorpus(ImageCaptionCorpus):
    """A corpus over a ``datasets.Dataset`` whose image column holds images, ``{"bytes","path"}``
    dicts, or path strings.

    An ``Image`` feature is read undecoded (bytes / path) so that decoding, and the skipping of
    corrupt files, happens in one place: :func:`vlpretrain.data.images.load_rgb`.

    Example:
        >>> corpus = HFDatasetCorpus.from_imagefolder("my_images/")   # has metadata.jsonl
        >>> corpus = HFDatasetCorpus.from_disk("saved_dataset/", split="validation")
        >>> corpus = HFDatasetCorpus.from_hub("nlphuji/flickr30k", split="test")  # online only
    """

    def __init__(
        self,
        dataset: Any,
        image_column: str = "image",
        caption_column: ColumnSpec = "caption",
        extra_columns: Sequence[str] | None = None,
        name: str = "dataset",
        split: str | None = None,
    ) -> None:
        super().__init__()
        import datasets

        self.split = split if split is not None else (str(dataset.split) if dataset.split else "")
        self.name = name
        self._where = f"hf:{name}[{self.split}]" if self.split else f"hf:{name}"
        columns = list(dataset.column_names)
        if image_column not in columns:
            raise _missing_column_error(self._where, image_column, columns, "image_column")
        caption_columns = _as_list(caption_column)
        for c in caption_columns:
            if c not in columns:
                raise _missing_column_error(self._where, c, columns, "caption_column")
        self.extra_columns = _select_extras(columns, [image_column] + caption_columns, extra_columns, self._where)
        if isinstance(dataset.features.get(image_column), datasets.Image):
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.image_column = image_column
        self.caption_columns = caption_columns
        self.dataset = dataset
        # Captions are text only: reading them once is cheap and lets us drop empty ones up front,
        # so len() is exact and no worker ever meets an uncaptioned row.
        cols = [list(dataset[c]) for c in caption_columns]
        self._index: list[int] = []
        empty: list[str] = []
        for i in range(len(dataset)):
            if any(_captions_from_cell(col[i]) for col in cols):
                self._index.append(i)
            else:
                empty.append(f"{self._where}#{i}")
        self.skipped = [(s, "empty caption") for s in empty]
        if empty:
            logger.warning("%s: dropped %d of %d rows (empty caption), e.g. %s",
                           self._where, len(empty), len(dataset), ", ".join(empty[:3]))

    # -- constructors ------------------------------------------------------------------------
    @classmethod
    def from_imagefolder(cls, data_dir: str | os.PathLike[str], split: str | None = None,
                         **kwargs: Any) -> "HFDatasetCorpus":
        """A local folder of images with ``metadata.jsonl`` / ``metadata.csv`` (``file_name`` column).

        Note: ``datasets`` reads file and folder names containing "train", "test", "val" as
        split markers.

        Example:
            >>> HFDatasetCorpus.from_imagefolder("pets/", caption_column="text")
        """
        import datasets

        dd = datasets.load_dataset("imagefolder", data_dir=str(data_dir))
        ds, split = _pick_split(dd, split, str(data_dir))
        kwargs.setdefault("name", str(data_dir))
        return cls(ds, split=split, **kwargs)

    @classmethod
    def from_disk(cls, path: str | os.PathLike[str], split: str | None = None,
                  **kwargs: Any) -> "HFDatasetCorpus":
        """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``.

        Example:
            >>> HFDatasetCorpus.from_disk("coco_saved/", split="validation")
        """
        import datasets

        obj = datasets.load_from_disk(str(path))
        kwargs.setdefault("name", str(path))
        if isinstance(obj, datasets.DatasetDict):
            obj, split = _pick_split(obj, split, str(path))
        return cls(obj, split=split, **kwargs)

    @classmethod
    def from_hub(cls, name: str, split: str | None = "train", **kwargs: Any) -> "HFDatasetCorpus":
        """A dataset on the Hugging Face hub (downloads, so it needs internet once; cached after).

        Example:
            >>> HFDatasetCorpus.from_hub("nlphuji/flickr30k", split="test", caption_column="caption")
        """
        import datasets

        obj = datasets.load_dataset(name) if split is None else datasets.load_dataset(name, split=split)
        if isinstance(obj, datasets.DatasetDict):
            obj, split = _pick_split(obj, split, f"hf:{name}")
        kwargs.setdefault("name", name)
        return cls(obj, split=split, **kwargs)

    # -- access --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> CorpusRow:
        j = self._index[self._check_index(i)]
        record = self.dataset[j]
        image = record[self.image_column]
        if isinstance(image, dict):
            image = image.get("bytes") if image.get("bytes") is not None else image.get("path")
        captions = [c for col in self.caption_columns for c in _captions_from_cell(record[col])]
        return CorpusRow(
            image=image,
            captions=captions,
            extras={c: _plain(record[c]) for c in self.extra_columns},
            source=f"{self._where}#{j}",
        )


# ----------------------------------------------------------------------------- dispatch

_SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")


def open_corpus(
    spec: str | os.PathLike[str],
    split: str | None = None,
    image_column: str = "image",
    caption_column: ColumnSpec = "caption",
    extra_columns: Sequence[str] | None = None,
    root: str | os.PathLike[str] | None = None,
) -> ImageCaptionCorpus:
    """Open a corpus from a path or hub name, choosing the reader from what ``spec`` is.

    - a table file (.csv .tsv .tab .jsonl .json .parquet): :class:`TableCorpus` (``split`` unused);
    - a folder written by ``save_to_disk``: :meth:`HFDatasetCorpus.from_disk`;
    - a folder with ``metadata.jsonl`` / ``metadata.csv``: :meth:`HFDatasetCorpus.from_imagefolder`;
    - a folder holding ``<split>.csv`` (or another table extension), e.g. the emoji demo corpus:
      that split's table (default "train");
    - ``hf:NAME``: :meth:`HFDatasetCorpus.from_hub` (default split "train").

    Example:
        >>> open_corpus("~/.cache/vlpretrain/emoji-v1", split="val")
        TableCorpus('/home/me/.cache/vlpretrain/emoji-v1/val.csv', rows=..., skipped=0)
    """
    columns = dict(image_column=image_column, caption_column=caption_column, extra_columns=extra_columns)
    text = os.fspath(spec)
    if text.startswith("hf:"):
        return HFDatasetCorpus.from_hub(text[3:], split=split or "train", **columns)
    path = Path(os.path.expanduser(text))
    if path.is_file():
        return TableCorpus(path, root=root, **columns)
    if path.is_dir():
        if any((path / m).is_file() for m in _SAVED_MARKERS):
            return HFDatasetCorpus.from_disk(path, split=split, **columns)
        if any((path / m).is_file() for m in _METADATA_FILES):
            return HFDatasetCorpus.from_imagefolder(path, split=split, **columns)
        wanted = split or "train"
        for ext in TABLE_EXTENSIONS:
            if (path / f"{wanted}{ext}").is_file():
                return TableCorpus(path / f"{wanted}{ext}", root=root, **columns)
        tables = sorted(p.name for p in path.iterdir() if p.suffix.lower() in TABLE_EXTENSIONS)
        raise ValueError(
            f"{text}: not a corpus folder: expected a `save_to_disk` folder (dataset_info.json / "
            f"state.json), an imagefolder with metadata.jsonl or metadata.csv, or a {wanted}.csv "
            f"(or .tsv/.jsonl/.parquet); tables here: {tables}"
        )
    if path.suffix.lower() in TABLE_EXTENSIONS or path.suffix:
        raise FileNotFoundError(f"{text}: no such file")
    raise FileNotFoundError(f"{text}: no such file or folder (for a hub dataset write hf:{text})")
