"""Image-caption pairs from one table file: CSV, TSV, JSONL / JSON or parquet.

Example:
    >>> from vlpretrain.data import TableCorpus
    >>> corpus = TableCorpus("pairs.csv", image_column="filepath", caption_column="title")
    >>> corpus[0].image, corpus[0].source
    ('/data/images/0001.jpg', 'pairs.csv:row 1')
"""
from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from .corpus import CorpusRow, ImageCaptionCorpus
from .corpus_columns import (
    ColumnSpec,
    captions_from_cells,
    check_columns,
    column_list,
    image_from_dict,
    is_missing,
    plain,
)

logger = logging.getLogger(__name__)

__all__ = ["TABLE_EXTENSIONS", "TableCorpus"]

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
        df = _read_table(self.path, TABLE_EXTENSIONS[ext], [image_column] + column_list(caption_column))
        columns = [str(c) for c in df.columns]
        caption_columns, self.extra_columns = check_columns(
            where, columns, image_column, caption_column, extra_columns)
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
            caps = captions_from_cells(col[r] for col in caption_values)
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
        self._extras = {c: [plain(v) for v in keep[c].tolist()] for c in self.extra_columns}
        self._record_dropped(where, len(df), (("image file missing", missing_image),
                                              ("empty caption", empty_caption)))
        if not images:
            logger.warning("%s: no usable rows", where)

    @staticmethod
    def _resolve_image(cell: Any, base: Path) -> Any:
        if is_missing(cell):
            return None
        if isinstance(cell, dict):  # parquet written by `datasets`: {"bytes": ..., "path": ...}
            cell = image_from_dict(cell)
            if is_missing(cell):
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
