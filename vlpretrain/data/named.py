"""Data by name: the spec strings every command takes (``emoji:test``, ``tuxpaint:heldout``, a table, a
dataset folder, ``hf:NAME``), the caption-column option, and the record of what an export was made from.

Named corpora are built once on first use and cached:

- ``emoji:SPLIT``: the offline demo corpus (twemoji PNGs with their Unicode names; train, val, test, all);
- ``noto-emoji:SPLIT``: the same emoji drawn in Google's Noto style (a cross-style test set);
- ``tuxpaint:SPLIT``: Tux Paint's stamps with their captions (all, train, val, heldout).

A shard spec (a folder of ``.tar`` shards, a shard ``manifest.json``, a ``{00000..00099}.tar`` pattern)
opens as a :class:`~vlpretrain.data.shard_corpus.ShardCorpus`, read in order without being listed.

Example:
    >>> corpus = open_named_corpus("emoji:test")
    >>> len(corpus), corpus[0].captions
    (380, ['grinning face'])
    >>> parse_caption_columns("caption_1, caption_2")
    ['caption_1', 'caption_2']
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

from ..config import DataConfig
from .shard_format import is_shard_spec

__all__ = ["NAMED_PREFIXES", "named_table", "open_named_corpus", "parse_caption_columns", "data_spec"]

NAMED_PREFIXES = ("emoji:", "noto-emoji:", "tuxpaint:")
EMOJI_SPLITS_HINT = "use train, val, test or all"


def named_table(spec: str, default_split: str) -> Optional[tuple[Path, str]]:
    """The CSV behind a named corpus spec and its display name (``emoji-test``), or None for other specs.

    ``default_split`` stands in for an empty split (``emoji:``); Tux Paint's default is ``all``.

    Example:
        >>> named_table("emoji:val", "train")
        (PosixPath('/root/.cache/vlpretrain/emoji-v3/val.csv'), 'emoji-val')
        >>> named_table("pairs.csv", "train") is None
        True
    """
    if spec.startswith("emoji:"):
        from .emoji import build_emoji_corpus

        split = spec.split(":", 1)[1] or default_split
        table = build_emoji_corpus() / f"{split}.csv"
        if not table.is_file():
            raise ValueError(f"emoji split '{split}' does not exist ({EMOJI_SPLITS_HINT})")
        return table, f"emoji-{split}"
    if spec.startswith("noto-emoji:"):
        from .rendered import build_noto_emoji_split

        split = spec.split(":", 1)[1] or "test"
        return build_noto_emoji_split(split), f"emoji-noto-{split}"
    if spec.startswith("tuxpaint:"):
        from .rendered import build_tuxpaint_table

        split = spec.split(":", 1)[1] or "all"
        return build_tuxpaint_table(split=split), "tuxpaint-stamps" if split == "all" else f"tuxpaint-{split}"
    return None


def open_named_corpus(spec: str, data: Optional[DataConfig] = None, split: Optional[str] = None) -> Any:
    """A corpus from a spec: a named corpus (see the module docstring; ``emoji:`` alone is the train
    split) or anything :func:`vlpretrain.data.open_corpus` reads (table file, saved / imagefolder dataset,
    ``hf:NAME``), with the image and caption columns of ``data``; WebDataset shards as a
    :class:`~vlpretrain.data.shard_corpus.ShardCorpus` (streamed; no ``corpus[i]``, columns unused).

    Example:
        >>> open_named_corpus("pairs.csv", DataConfig(caption_column=["caption_1", "caption_2"]))
    """
    from .corpus_dispatch import open_corpus

    named = named_table(spec, default_split="train")
    if named is not None:
        return open_corpus(str(named[0]))
    if is_shard_spec(spec):
        from .shard_corpus import ShardCorpus

        return ShardCorpus(spec)
    data = data or DataConfig()
    return open_corpus(spec, split=split, image_column=data.image_column, caption_column=data.caption_column,
                       encoding=data.encoding, on_bad_lines=data.on_bad_lines)


def parse_caption_columns(value: str) -> Union[str, list[str]]:
    """``--caption-column`` as given: one column name, or several comma-separated (a list).

    Example:
        >>> parse_caption_columns("caption"), parse_caption_columns("caption_1,caption_2")
        ('caption', ['caption_1', 'caption_2'])
    """
    columns = [c.strip() for c in value.split(",") if c.strip()]
    if not columns:
        raise ValueError("--caption-column is empty: name the caption column(s), e.g. --caption-column caption "
                         "(several comma-separated)")
    return columns[0] if len(columns) == 1 else columns


def data_spec(data: str, split: Optional[str], config: DataConfig) -> str:
    """What an export was made from, for the resume check: the data and how it was read (another split
    or caption column with the same row count must not reuse old shards).

    Example:
        >>> data_spec("pairs.csv", None, DataConfig())
        'pairs.csv|split=None|image_column=image|caption_column=caption'
    """
    return (f"{data}|split={split}|image_column={config.image_column}"
            f"|caption_column={config.caption_column}")
