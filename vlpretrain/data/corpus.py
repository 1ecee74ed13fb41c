"""The corpus protocol: random-access sequences of (image, captions, extras) rows.

A corpus only says *where* each image is and which captions go with it; decoding, transforms and
tokenization happen later in :class:`vlpretrain.data.dataset.ImageTextDataset`. The readers are
:class:`~vlpretrain.data.table_corpus.TableCorpus` (CSV / TSV / JSONL / parquet) and
:class:`~vlpretrain.data.hf_corpus.HFDatasetCorpus` (``datasets``); :func:`vlpretrain.data.open_corpus`
chooses one from a path or hub name.

Example:
    >>> from vlpretrain.data import open_corpus
    >>> corpus = open_corpus("data/pairs.csv")          # or .tsv / .jsonl / .parquet
    >>> row = corpus[0]; row.captions, row.source
    (['a dog on a beach'], 'data/pairs.csv:row 1')
    >>> open_corpus("hf:nlphuji/flickr30k", split="test")  # hub, needs internet
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

logger = logging.getLogger(__name__)

__all__ = ["CorpusRow", "ImageCaptionCorpus"]


@dataclass
class CorpusRow:
    """One image with its caption(s).

    ``image`` is an absolute path, raw encoded bytes or a decoded PIL image; ``source`` says where
    the row came from, for messages ("pairs.csv:row 17" with 1-based data rows, or
    "hf:name[split]#17" with the dataset's 0-based index).

    Example:
        >>> CorpusRow("/data/0001.jpg", ["a dog"], source="pairs.csv:row 1").captions
        ['a dog']
    """

    image: Any  # str | bytes | PIL.Image.Image
    captions: list[str]
    extras: dict = field(default_factory=dict)
    source: str = ""


class ImageCaptionCorpus:
    """Base of all corpora: ``len(corpus)``, ``corpus[i] -> CorpusRow``, ``corpus.name``.

    ``skipped`` lists ``(source, reason)`` for rows dropped while loading (missing image file,
    empty caption), so callers can report them.

    Example:
        >>> corpus = open_corpus("pairs.csv")
        >>> len(corpus), corpus[0].source, corpus.skipped[:1]
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

    def _record_dropped(self, where: str, total: int,
                        dropped: Sequence[tuple[str, list[str]]]) -> None:
        """Set ``skipped`` from ``(reason, sources)`` pairs, in that order, and log one warning per
        reason (never one per row: a big corpus with many missing files would flood the log)."""
        self.skipped = [(s, reason) for reason, sources in dropped for s in sources]
        for reason, sources in dropped:
            if sources:
                logger.warning(
                    "%s: dropped %d of %d rows (%s), e.g. %s",
                    where, len(sources), total, reason, ", ".join(sources[:3]),
                )
