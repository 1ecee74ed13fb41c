"""Option blocks shared by the commands, written once so every command spells and explains them alike.

Example:
    >>> p = argparse.ArgumentParser()
    >>> add_model_option(p)
    >>> add_corpus_options(p, data_help="the corpus to encode")
    >>> p.parse_args(["--model", "runs/demo/final", "--data", "emoji:test"]).caption_column
    'caption'
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from typing import TYPE_CHECKING, Iterator, Optional

if TYPE_CHECKING:
    from ..config import DataConfig

MODEL_HELP = "checkpoint folder, recipe .yaml, open_clip:ARCH[/TAG] or hf:NAME"
CORPUS_HELP = ("a CSV/TSV/JSONL/parquet table, a saved or imagefolder dataset, hf:NAME, or emoji:SPLIT "
               "(the offline demo corpus)")


def add_model_option(p: argparse.ArgumentParser, required: bool = True, help: Optional[str] = None) -> None:
    """``--model``: what ``vlpretrain.load_model`` takes."""
    p.add_argument("--model", required=required, default=None, help=help or MODEL_HELP)


def add_corpus_options(p: argparse.ArgumentParser, data_help: str = CORPUS_HELP, required: bool = True,
                       captions: bool = True, columns: bool = True) -> None:
    """``--data`` and how to read it: ``--image-column``, ``--caption-column`` (several comma-separated,
    read by :func:`vlpretrain.data.named.parse_caption_columns`), ``--split``, and ``--encoding`` /
    ``--on-bad-lines`` for text tables. :func:`corpus_config` turns them into a ``DataConfig``."""
    p.add_argument("--data", required=required, default=None, help=data_help)
    if columns:
        add_image_column_option(p)
    if captions and columns:
        p.add_argument("--caption-column", default="caption",
                       help="caption column of a table or dataset; a cell may hold a list of captions; several "
                            "columns comma-separated, e.g. caption_1,caption_2 (default: caption)")
    add_split_option(p)
    p.add_argument("--encoding", default="utf-8",
                   help="text encoding of a CSV / TSV / JSONL table, e.g. latin-1 or cp1252 (default: utf-8)")
    p.add_argument("--on-bad-lines", choices=("error", "skip"), default="error",
                   help="a table line that does not decode or parse: error (default: name it and stop) or skip "
                        "(drop it, counted and named in a warning)")


def corpus_config(args: argparse.Namespace) -> "DataConfig":
    """The ``DataConfig`` the options of :func:`add_corpus_options` describe (defaults for those absent).

    Example:
        >>> corpus_config(p.parse_args(["--data", "pairs.csv", "--encoding", "latin-1"])).encoding
        'latin-1'
    """
    from ..config import DataConfig
    from ..data.named import parse_caption_columns

    values: dict = {}
    if getattr(args, "image_column", None) is not None:
        values["image_column"] = args.image_column
    if getattr(args, "caption_column", None) is not None:
        values["caption_column"] = parse_caption_columns(args.caption_column)
    for key in ("encoding", "on_bad_lines"):
        if getattr(args, key, None) is not None:
            values[key] = getattr(args, key)
    return DataConfig(**values)


def add_image_column_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-column", default="image", help="image column of a table or dataset (default: image)")


def add_split_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", default=None, help="split of a dataset folder or hf:NAME (default: train)")


def add_batch_options(p: argparse.ArgumentParser, workers: Optional[int] = None, what: str = "") -> None:
    """``--batch-size`` and, when ``workers`` is a default, ``--num-workers``."""
    suffix = f" {what}" if what else ""
    p.add_argument("--batch-size", type=int, default=256,
                   help=f"images / captions per forward pass{suffix} (default: 256)")
    if workers is not None:
        p.add_argument("--num-workers", type=int, default=workers,
                       help=f"image decoding processes{suffix} (default: {workers}; 0 decodes in the main one)")


def add_progress_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


@contextlib.contextmanager
def console_logging(prefix: str, level: int = logging.INFO) -> Iterator[None]:
    """The library's log lines (``vlpretrain.*``) on stderr as ``PREFIX: message`` while a command runs;
    ``level`` filters them (e.g. warnings only on the non-main processes of a multi-process run).

    Example:
        >>> with console_logging("vlp embed"):
        ...     export_embeddings(...)
    """
    root = logging.getLogger("vlpretrain")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"{prefix}: %(message)s"))
    handler.setLevel(level)
    old_level = root.level
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
