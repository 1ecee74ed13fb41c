"""Column checks and cell normalisation shared by the corpus readers (tables and ``datasets``).

Both readers take the same ``image_column`` / ``caption_column`` / ``extra_columns`` arguments and
meet the same cell shapes (strings, JSON lists in strings, lists, numpy values, ``{"bytes","path"}``
image dicts), so these are written once here.

Example:
    >>> check_columns("pairs.csv", ["image", "caption", "id"], "image", "caption", None)
    (['caption'], ['id'])
    >>> captions_from_cells(['["a dog", "a puppy"]', "  a pet "])
    ['a dog', 'a puppy', 'a pet']
"""
from __future__ import annotations

import difflib
import json
import math
from typing import Any, Iterable, Sequence, Union

__all__ = [
    "ColumnSpec",
    "column_list",
    "check_columns",
    "missing_column_error",
    "is_missing",
    "captions_from_cell",
    "captions_from_cells",
    "image_from_dict",
    "plain",
]

#: One column name, or several (e.g. ``["caption_1", "caption_2"]``: their captions are joined).
ColumnSpec = Union[str, Sequence[str]]


def column_list(spec: ColumnSpec) -> list[str]:
    """A column spec as a list of names.

    Example:
        >>> column_list("caption"), column_list(("caption_1", "caption_2"))
        (['caption'], ['caption_1', 'caption_2'])
    """
    return [spec] if isinstance(spec, str) else list(spec)


def missing_column_error(where: str, column: str, columns: list[str], param: str) -> ValueError:
    """The one message for a wrong column name, with a difflib suggestion when there is one.

    Example:
        >>> missing_column_error("pairs.csv", "captoin", ["image", "caption"], "caption_column")
        ValueError("pairs.csv: no column 'captoin'; columns are ['image', 'caption'] (did you mean 'caption'? set caption_column=...)")
    """
    lowered = {c.lower(): c for c in columns}
    close = difflib.get_close_matches(column.lower(), list(lowered), n=1)
    hint = f"did you mean {lowered[close[0]]!r}? " if close else ""
    return ValueError(f"{where}: no column {column!r}; columns are {columns!r} ({hint}set {param}=...)")


def check_columns(where: str, columns: list[str], image_column: str, caption_column: ColumnSpec,
                  extra_columns: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """Check that the image, caption and extra columns exist; return ``(caption_columns, extras)``.

    ``extra_columns=None`` means every column that is neither the image nor a caption column.

    Example:
        >>> check_columns("pairs.csv", ["image", "c1", "c2", "id"], "image", ["c1", "c2"], None)
        (['c1', 'c2'], ['id'])
    """
    caption_columns = column_list(caption_column)
    if image_column not in columns:
        raise missing_column_error(where, image_column, columns, "image_column")
    for c in caption_columns:
        if c not in columns:
            raise missing_column_error(where, c, columns, "caption_column")
    if extra_columns is None:
        used = [image_column] + caption_columns
        return caption_columns, [c for c in columns if c not in used]
    for c in extra_columns:
        if c not in columns:
            raise missing_column_error(where, c, columns, "extra_columns")
    return caption_columns, list(extra_columns)


def is_missing(value: Any) -> bool:
    """``None`` or a float NaN (how pandas marks an empty cell).

    Example:
        >>> is_missing(float("nan")), is_missing("")
        (True, False)
    """
    return value is None or (isinstance(value, float) and math.isnan(value))


def captions_from_cell(value: Any) -> list[str]:
    """Normalize one caption cell to a list of non-empty, stripped strings.

    Accepts a string, a JSON list written into a string (CSV cells cannot hold lists), or any
    list / tuple / numpy array (JSONL and parquet list columns).

    Example:
        >>> captions_from_cell('["a", " b ", ""]'), captions_from_cell("[sic] a dog")
        (['a', 'b'], ['[sic] a dog'])
    """
    if is_missing(value):
        return []
    if isinstance(value, str):
        s = value.strip()
        if s.startswith("[") and s.endswith("]"):
            try:
                parsed = json.loads(s)
            except ValueError:
                parsed = None  # a caption that merely looks like a list, e.g. "[sic]"
            if isinstance(parsed, list):
                return [str(c).strip() for c in parsed if not is_missing(c) and str(c).strip()]
        return [s] if s else []
    if isinstance(value, (list, tuple)) or hasattr(value, "tolist"):
        items = value.tolist() if hasattr(value, "tolist") else value
        if not isinstance(items, list):  # a numpy scalar
            items = [items]
        return [str(c).strip() for c in items if not is_missing(c) and str(c).strip()]
    s = str(value).strip()
    return [s] if s else []


def captions_from_cells(cells: Iterable[Any]) -> list[str]:
    """All captions of one row: its caption-column cells normalized and joined, in column order.

    Example:
        >>> captions_from_cells(["a dog", None, ["a pet", ""]])
        ['a dog', 'a pet']
    """
    return [c for cell in cells for c in captions_from_cell(cell)]


def image_from_dict(cell: dict) -> Any:
    """A ``datasets`` image cell ``{"bytes": ..., "path": ...}``: the bytes when present, else the path.

    Example:
        >>> image_from_dict({"bytes": None, "path": "/data/1.jpg"})
        '/data/1.jpg'
    """
    if cell.get("bytes") is not None:
        return bytes(cell["bytes"])
    return cell.get("path")


def plain(value: Any) -> Any:
    """numpy scalars / arrays -> Python values, so extras pickle small and compare simply.

    Example:
        >>> plain(np.int64(3)), plain("a")
        (3, 'a')
    """
    if hasattr(value, "tolist"):
        return value.tolist()
    return value
