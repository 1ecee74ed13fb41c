"""Fuzzing the readers of user input (hypothesis): table files of random bytes and random shapes, and random
recipes and ``key=value`` overrides give a result or a one-line error the CLI prints, never a traceback.

The errors allowed are the ones ``vlp`` turns into one line (cli/main.py: ValueError, which ConfigError,
pandas' and json's parse errors are; OSError; BadImageError); their message is one line and, for a table,
names the file. Examples are derandomized, so CI sees the same ones on every run.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402

from vlpretrain.config import ConfigError, all_keys, load_recipe, recipe_from_dict  # noqa: E402
from vlpretrain.data.images import BadImageError  # noqa: E402
from vlpretrain.data.named import open_named_corpus  # noqa: E402

ALLOWED = (ValueError, OSError, BadImageError)  # what cli/main.py prints as one line
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TABLE_SUFFIXES = [".csv", ".tsv", ".tab", ".jsonl", ".json"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A folder with one real image, ``img.png``, that table cells may name."""
    path = tmp_path_factory.mktemp("fuzz")
    Image.new("RGB", (4, 4), (200, 10, 10)).save(path / "img.png")
    return path


def one_line(error: BaseException, *names: str) -> str:
    message = str(error)
    assert message.strip() and "\n" not in message and "\r" not in message, repr(message)
    for name in names:
        assert name in message, f"{message!r} does not name {name}"
    return message


def open_table(path: Path) -> None:
    """Open ``path`` as `vlp` does and read every row; a refusal must be one line naming the file."""
    try:
        corpus = open_named_corpus(str(path))
    except ALLOWED as e:
        one_line(e, str(path))
        return
    for i in range(len(corpus)):
        row = corpus[i]
        assert row.captions and all(isinstance(c, str) and c.strip() == c and c for c in row.captions), row
        assert isinstance(row.image, (str, bytes)) and row.source.startswith(f"{path}:row ")


# ----------------------------------------------------------------------------- tables

@FUZZ
@given(data=st.binary(max_size=400), suffix=st.sampled_from(TABLE_SUFFIXES))
def test_random_bytes_as_a_table(folder, data, suffix):
    path = folder / f"random{suffix}"
    path.write_bytes(data)
    open_table(path)


COLUMN = st.one_of(st.sampled_from(["image", "caption", "caption_2", "label", "Image", "captions", ""]),
                   st.text(max_size=8))
CELL = st.one_of(
    st.sampled_from(["", "img.png", "missing.png", "nan", "NA", "None", "null", "0042", '["a", "b"]', '["", " "]',
                     "[sic] a dog", "[", ' "quoted" ', "a,b", "a\tb", "line\nbreak", " ", "\u00e9t\u00e9 \U0001F600",
                     "\x00", "=1+1", "\\", "1e400"]),
    st.text(max_size=20),
)


def _csv_bytes(header: list[str], rows: list[list[str]], delimiter: str, encoding: str) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter)
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode(encoding, errors="replace")


@FUZZ
@given(header=st.lists(COLUMN, min_size=1, max_size=5),
       rows=st.lists(st.lists(CELL, max_size=6), max_size=6),
       ragged=st.booleans(), kind=st.sampled_from([(".csv", ","), (".tsv", "\t")]),
       encoding=st.sampled_from(["utf-8", "utf-8", "latin-1", "utf-16"]))
def test_random_csv_shapes(folder, header, rows, ragged, kind, encoding):
    """Random column names (empty, duplicated, unicode), empty and odd cells, rows of the wrong length."""
    if not ragged:
        rows = [(r + [""] * len(header))[:len(header)] for r in rows]
    path = folder / f"shape{kind[0]}"
    path.write_bytes(_csv_bytes(header, rows, kind[1], encoding))
    open_table(path)


JSON_VALUE = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.sampled_from(["img.png", ""]),
              st.text(max_size=10)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=8,
)
RECORD = st.one_of(st.dictionaries(COLUMN, JSON_VALUE, max_size=5),
                   st.fixed_dictionaries({"image": st.sampled_from(["img.png", "missing.png", "", None]),
                                          "caption": JSON_VALUE}),
                   JSON_VALUE)  # sometimes a line that is not an object at all


@FUZZ
@given(records=st.lists(RECORD, max_size=6), as_array=st.booleans(), blank_lines=st.booleans())
def test_random_jsonl_shapes(folder, records, as_array, blank_lines):
    """JSON Lines (or one JSON array in a .json) of random records: nested values, missing keys, non-objects."""
    if as_array:
        path, text = folder / "shape.json", json.dumps(records)
    else:
        path = folder / "shape.jsonl"
        text = ("\n\n" if blank_lines else "\n").join(json.dumps(r) for r in records)
    path.write_text(text, encoding="utf-8")
    open_table(path)


# ----------------------------------------------------------------------------- recipes

KEYS = all_keys()
KEY = st.one_of(
    st.sampled_from(KEYS),
    st.sampled_from(KEYS).map(lambda k: k[:-1]),  # a typo
    st.sampled_from(["model.vision.width", "model.vision.widht", "data.augmentation.scale", "model.text.x.y",
                     "train", "train.", ".lr", "train..lr", "", " train.lr ", "train.lr.x"]),
    st.text(max_size=12),
)
VALUE = st.one_of(
    st.sampled_from(["", "null", "~", "[1, 2]", "{a: 1}", "1e309", "-1", "0", "-0.5", "0.5", "2", "nan", ".nan",
                     "inf", "-.inf", "true", "no", "''", "[", "{", "- a", "!!python/object/apply:os.system [ls]",
                     "1_000", "0x10", "a: b: c", "'unclosed", "\t", "2024-01-01", "[[1]]", "10000000000000000000000"]),
    st.integers().map(str),
    st.floats().map(str),
    st.text(max_size=15),
)


def build(overrides: list[str], values: dict | None = None) -> None:
    try:
        recipe_from_dict(values or {}, overrides)
    except ALLOWED as e:
        assert isinstance(e, ConfigError), f"{type(e).__name__}: {e}"  # the recipe's own error type
        one_line(e)


@FUZZ
@given(pairs=st.lists(st.tuples(KEY, VALUE), min_size=1, max_size=3))
def test_random_overrides(pairs):
    build([f"{key}={value}" for key, value in pairs])


@FUZZ
@given(text=st.text(max_size=20))
def test_override_without_equals_sign(text):
    build([text.replace("=", "")])


SECTIONS = st.dictionaries(st.sampled_from(["model", "data", "train", "loss", "modle", "vision"]),
                           st.one_of(st.dictionaries(st.sampled_from([k.split(".", 1)[1] for k in KEYS] + ["lr2"]),
                                                     JSON_VALUE, max_size=4),
                                     JSON_VALUE),
                           max_size=3)


@FUZZ
@given(values=SECTIONS)
def test_random_recipe_mappings(values):
    build([], values)


LINE = st.tuples(st.sampled_from(["model:", "train:", "  lr:", "  epochs:", "data:", "- x", "{", "  vision: {width: 2}",
                                  "\t", "key: [1, 2"]), VALUE).map(lambda pair: f"{pair[0]} {pair[1]}")
RECIPE_BYTES = st.one_of(st.binary(max_size=60), st.text(max_size=60).map(str.encode),
                         st.lists(LINE, max_size=5).map(lambda lines: "\n".join(lines).encode()))


@FUZZ
@given(data=RECIPE_BYTES)
def test_random_recipe_files(folder, data):
    path = folder / "recipe.yaml"
    path.write_bytes(data)
    try:
        load_recipe(path)
    except ALLOWED as e:
        assert isinstance(e, ConfigError), f"{type(e).__name__}: {e}"
        one_line(e, str(path))
