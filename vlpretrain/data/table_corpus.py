"""Image-caption pairs from one table file: CSV, TSV, JSONL / JSON or parquet.

Example:
    >>> from vlpretrain.data import TableCorpus
    >>> corpus = TableCorpus("pairs.csv", image_column="filepath", caption_column="title")
    >>> corpus[0].image, corpus[0].source
    ('/data/images/0001.jpg', 'pairs.csv:row 1')
"""
from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

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

__all__ = ["TABLE_EXTENSIONS", "ON_BAD_LINES", "TableCorpus", "check_reader_options"]

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


ON_BAD_LINES = ("error", "skip")
_FIELDS = re.compile(r"Expected (\d+) fields in line (\d+), saw (\d+)")
_SKIPPED = re.compile(r"Skipping line (\d+): (.+)")
_ENCODING_ADVICE = "set data.encoding (e.g. latin-1) or data.on_bad_lines=skip"
_LINES_ADVICE = "set data.on_bad_lines=skip to drop such lines"

#: A line the reader dropped (``on_bad_lines="skip"``): its 1-based line number in the file, and why.
BadLine = tuple[int, str]


def check_reader_options(encoding: str, on_bad_lines: str) -> None:
    """One-line errors for ``data.encoding`` / ``data.on_bad_lines`` values that cannot work.

    Example:
        >>> check_reader_options("latin-1", "skip")      # fine
        >>> check_reader_options("utf9", "error")
        ValueError: data.encoding: unknown text encoding 'utf9' (e.g. utf-8, latin-1, cp1252)
    """
    try:
        codecs.lookup(str(encoding))
    except LookupError:
        raise ValueError(f"data.encoding: unknown text encoding {encoding!r} (e.g. utf-8, latin-1, cp1252)") from None
    if on_bad_lines not in ON_BAD_LINES:
        raise ValueError(f"data.on_bad_lines: expected one of {list(ON_BAD_LINES)}, got {on_bad_lines!r}")


def _encoding_label(encoding: str) -> str:
    name = codecs.lookup(encoding).name
    return "UTF-8" if name.startswith("utf-8") else name


def _bad_bytes(raw: bytes, start: int, encoding: str) -> tuple[int, str]:
    """The 1-based line of the undecodable byte at offset ``start`` of ``raw``, and what is wrong there
    (the byte and its 1-based character column)."""
    line_start = raw.rfind(b"\n", 0, start) + 1
    column = len(raw[line_start:start].decode(encoding, errors="replace")) + 1
    return (raw.count(b"\n", 0, start) + 1,
            f"bytes are not valid {_encoding_label(encoding)} (0x{raw[start]:02x} at column {column})")


def _decode_lines(raw: bytes, encoding: str, where: str, skip: bool) -> tuple[list[str], list[BadLine]]:
    """The file's lines as text; an undecodable one is an error naming it, or (``skip``) blanked and listed.

    Blanked, not removed, so later lines keep their numbers in the parser's messages.
    """
    if "\n".encode(encoding) != b"\n":  # UTF-16 / 32: bytes do not split into lines; decode it whole
        try:
            return raw.decode(encoding).split("\n"), []
        except UnicodeDecodeError as e:
            raise ValueError(f"{where}: bytes are not valid {_encoding_label(encoding)} (at byte {e.start}); "
                             f"set data.encoding") from None
    lines, bad = [], []
    for number, line in enumerate(raw.split(b"\n"), 1):
        try:
            lines.append(line.decode(encoding))
        except UnicodeDecodeError as e:
            reason = _bad_bytes(line, e.start, encoding)[1]
            if not skip:
                raise ValueError(f"{where} line {number}: {reason}; {_ENCODING_ADVICE}") from None
            bad.append((number, reason))
            lines.append("")
    return lines, bad


def _read_delimited(path: Path, kind: str, text_columns: list[str], encoding: str,
                    on_bad_lines: str) -> tuple[pd.DataFrame, list[BadLine]]:
    where = str(path)
    options = dict(
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
    try:  # the fast path: pandas reads the file itself
        return _parse_delimited(path, where, encoding, on_bad_lines, options)
    except UnicodeDecodeError:
        pass
    # A line does not decode: find it (an error naming it), or blank it and read the rest.
    lines, bad = _decode_lines(path.read_bytes(), encoding, where, skip=on_bad_lines == "skip")
    df, parse_bad = _parse_delimited(io.StringIO("\n".join(lines)), where, None, on_bad_lines, options)
    return df, sorted(bad + parse_bad)


def _parse_delimited(source: Any, where: str, encoding: Optional[str], on_bad_lines: str,
                     options: dict) -> tuple[pd.DataFrame, list[BadLine]]:
    """pandas' C parser; a line with too many fields is an error naming it, or (skip) dropped and listed."""
    if on_bad_lines == "error":
        try:
            return pd.read_csv(source, encoding=encoding, **options), []
        except pd.errors.EmptyDataError:
            raise ValueError(f"{where}: empty, no header row: a table starts with a row of column names") from None
        except pd.errors.ParserError as e:
            found = _FIELDS.search(str(e))
            if found:
                want, line, saw = found.groups()
                raise ValueError(f"{where} line {line}: expected {want} fields, saw {saw} (quote cells that hold "
                                 f"the separator); {_LINES_ADVICE}") from None
            raise ValueError(f"{where}: cannot parse the table ({_first_line(e)})") from None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", pd.errors.ParserWarning)
        try:
            df = pd.read_csv(source, encoding=encoding, on_bad_lines="warn", **options)
        except pd.errors.EmptyDataError:
            raise ValueError(f"{where}: empty, no header row: a table starts with a row of column names") from None
        except pd.errors.ParserError as e:
            raise ValueError(f"{where}: cannot parse the table ({_first_line(e)})") from None
    bad = [(int(m.group(1)), m.group(2).strip()) for w in caught if issubclass(w.category, pd.errors.ParserWarning)
           for m in _SKIPPED.finditer(str(w.message))]
    for w in caught:  # anything else pandas said is not ours to swallow
        if not issubclass(w.category, pd.errors.ParserWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return df, bad


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _json_line_problem(text: str) -> Optional[str]:
    try:
        value = json.loads(text)
    except ValueError as e:
        return f"not valid JSON ({getattr(e, 'msg', e)} at column {getattr(e, 'colno', '?')})"
    return None if isinstance(value, dict) else f"not a JSON object (a {type(value).__name__})"


_PANDAS_DEPRECATION = getattr(pd.errors, "Pandas4Warning", FutureWarning)


def _read_jsonl(path: Path, encoding: str, on_bad_lines: str) -> tuple[pd.DataFrame, list[BadLine]]:
    # dtype=False: no guessing (numeric-looking file names stay strings).
    where = str(path)
    with open(path, encoding=encoding, errors="replace") as f:
        head = f.read(4096).lstrip()
    if head.startswith("["):  # a ".json" holding one array of records, not one record a line
        try:
            with warnings.catch_warnings():
                # Items that are lists, not records (pandas pads ragged ones with NaN, with a FutureWarning).
                warnings.simplefilter("error", _PANDAS_DEPRECATION)
                return pd.read_json(path, dtype=False, encoding=encoding), []
        except (ValueError, TypeError, _PANDAS_DEPRECATION):  # TypeError: an item that is not an object, e.g. null
            raise ValueError(_json_array_problem(path, encoding)) from None
    try:
        return pd.read_json(path, lines=True, dtype=False, encoding=encoding), []
    except (ValueError, TypeError) as e:  # TypeError: a line holding null (pandas cannot make a row of it)
        failure = e
    # A line does not decode or parse: name the first (in file order), or drop them and read the rest.
    lines, undecodable = _decode_lines(path.read_bytes(), encoding, where, skip=True)
    blanked = {number for number, _ in undecodable}
    kept, bad = [], list(undecodable)
    for number, line in enumerate(lines, 1):
        problem = _json_line_problem(line) if line.strip() else None
        if problem is None:
            kept.append(line)
        elif number not in blanked:
            bad.append((number, problem))
    bad.sort()
    if not bad:  # every line is a JSON object, yet pandas refused: say what pandas said
        raise ValueError(f"{where}: cannot read as JSON lines ({_first_line(failure)})")
    if on_bad_lines != "skip":
        number, problem = bad[0]
        advice = _ENCODING_ADVICE if number in blanked else _LINES_ADVICE
        raise ValueError(f"{where} line {number}: {problem}; {advice}")
    text = "\n".join(line for line in kept if line.strip())
    df = pd.read_json(io.StringIO(text), lines=True, dtype=False) if text else pd.DataFrame()
    return df, bad


def _json_array_problem(path: Path, encoding: str) -> str:
    """The message for a JSON-array file that does not read: the bad byte, or where the JSON breaks."""
    raw = path.read_bytes()
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        line, reason = _bad_bytes(raw, e.start, encoding)
        return f"{path} line {line}: {reason}; set data.encoding (e.g. latin-1)"
    try:
        json.loads(text)
    except ValueError as e:
        return (f"{path} line {getattr(e, 'lineno', '?')}: not valid JSON ({getattr(e, 'msg', e)} at column "
                f"{getattr(e, 'colno', '?')}); fix the file (data.on_bad_lines=skip drops lines of CSV, TSV and JSONL)")
    return f"{path}: not a JSON list of records"


def _read_table(path: Path, kind: str, text_columns: list[str], encoding: str = "utf-8",
                on_bad_lines: str = "error") -> tuple[pd.DataFrame, list[BadLine]]:
    """The table as a frame, and the lines dropped as bad (only with ``on_bad_lines="skip"``)."""
    if kind in ("csv", "tsv"):
        return _read_delimited(path, kind, text_columns, encoding, on_bad_lines)
    if kind == "jsonl":
        return _read_jsonl(path, encoding, on_bad_lines)
    return pd.read_parquet(path), []


class TableCorpus(ImageCaptionCorpus):
    """Image-caption pairs from a CSV, TSV (.tsv/.tab), JSONL (.jsonl/.json) or parquet file.

    Image paths are relative to the table's folder (or ``root``); absolute paths are kept; a cell
    may also hold encoded bytes (parquet) or a ``{"bytes", "path"}`` dict (parquet written by
    ``datasets``). Several captions per image: a list cell (JSONL, parquet), a JSON list in a CSV
    cell (``["a","b"]``), or ``caption_column=["caption_1", "caption_2"]``.

    Rows whose image file does not exist or that have no non-empty caption are dropped and listed
    in ``skipped`` (one warning in the log, never a crash).

    Text tables are read as ``encoding`` (``data.encoding``). A line that does not decode, or a CSV /
    TSV line with too many fields, or a JSONL line that is not a JSON object, is a one-line error naming
    the file and line; with ``on_bad_lines="skip"`` (``data.on_bad_lines``) it is dropped instead,
    listed in ``skipped`` as ``("pairs.csv:line 7", why)`` and counted in one warning.

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
        encoding: str = "utf-8",
        on_bad_lines: str = "error",
    ) -> None:
        super().__init__()
        check_reader_options(encoding, on_bad_lines)
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
        df, bad_lines = _read_table(self.path, TABLE_EXTENSIONS[ext], [image_column] + column_list(caption_column),
                                    encoding, on_bad_lines)
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
        if bad_lines:
            self.skipped += [(f"{where}:line {line}", reason) for line, reason in bad_lines]
            logger.warning("%s: skipped %d bad lines (data.on_bad_lines=skip), e.g. %s", where, len(bad_lines),
                           "; ".join(f"line {line}: {reason}" for line, reason in bad_lines[:3]))
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
