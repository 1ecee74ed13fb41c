"""The captions of a training corpus, checked once when training starts, so nothing passes silently.

- Placeholder captions ("nan", "None", "null" in any case; empty ones are already dropped by the
  readers) are dropped; a row left without captions is skipped. Counted and named in one warning.
- Duplicate rows (the same image with the same captions) are kept, counted in one warning.
- Captions longer than the text tower's context length are counted (the tokenizer truncates them).

The readers keep such captions as text ("None" may be a real caption elsewhere); training is where a
placeholder would be learned as a caption, so it is dropped here.

Example:
    >>> corpus, counts = audit_training_corpus(open_corpus("pairs.csv"), model.tokenizer, context_length=77)
    >>> counts
    {'rows': 1000, 'captions': 1000, 'placeholder_captions': 3, 'placeholder_rows': 3, 'duplicate_rows': 2,
     'truncated_captions': 41, 'truncated_estimated': False, 'context_length': 77}
"""
from __future__ import annotations

import logging
import random
from typing import Any, Callable, Optional

import numpy as np

from .corpus import CorpusRow, ImageCaptionCorpus

logger = logging.getLogger(__name__)

__all__ = ["PLACEHOLDER_CAPTIONS", "is_placeholder_caption", "CleanCorpus", "audit_training_corpus",
           "truncated_captions", "may_be_truncated"]

#: Captions that stand for a missing value (compared lower-cased, stripped): pandas' "nan", Python's
#: "None", JSON's "null".
PLACEHOLDER_CAPTIONS = frozenset({"nan", "none", "null"})
_EXAMPLES = 3
_CHUNK = 1024
#: Captions tokenized at most to count truncation; more are estimated from a seeded sample of this size.
MAX_TOKENIZED = 100_000


def is_placeholder_caption(caption: str) -> bool:
    """True for an empty caption or one that stands for a missing value.

    Example:
        >>> [is_placeholder_caption(c) for c in ("NaN", " null ", "", "None of the above")]
        [True, True, True, False]
    """
    text = str(caption).strip()
    return not text or text.lower() in PLACEHOLDER_CAPTIONS


class CleanCorpus(ImageCaptionCorpus):
    """``base`` seen through the rows ``keep`` (base indices), with the captions ``captions`` gives for
    some of them (placeholders removed); ``skipped`` adds the rows left out to the base's.

    Example:
        >>> clean = CleanCorpus(corpus, keep=np.array([0, 2]), captions={2: ["a dog"]}, dropped=[])
        >>> len(clean), clean[1].captions
        (2, ['a dog'])
    """

    def __init__(self, base: ImageCaptionCorpus, keep: np.ndarray, captions: dict[int, list[str]],
                 dropped: list[tuple[str, str]]) -> None:
        super().__init__()
        self.base, self._keep, self._captions = base, keep, captions
        self.name = base.name
        self.skipped = list(getattr(base, "skipped", [])) + dropped

    def __len__(self) -> int:
        return len(self._keep)

    def __getitem__(self, i: int) -> CorpusRow:
        j = int(self._keep[self._check_index(i)])
        row = self.base[j]
        if j in self._captions:
            row.captions = list(self._captions[j])
        return row


def _row_key(image: Any, captions: list[str]) -> Optional[int]:
    """A 64-bit hash of (image, captions): the path or the encoded bytes; None for in-memory images."""
    if isinstance(image, str):
        return hash((image, tuple(captions)))
    if isinstance(image, (bytes, bytearray)):
        return hash((bytes(image), tuple(captions)))
    return None


def _duplicates(keys: np.ndarray, known: np.ndarray) -> tuple[int, list[tuple[int, int]]]:
    """How many rows repeat an earlier row's key, and up to three (row, earlier row) pairs.

    Sorted hashes, not a dict of rows: a corpus of ten million rows costs 160 MB here, not gigabytes."""
    rows = np.flatnonzero(known)
    order = rows[np.argsort(keys[rows], kind="stable")]  # stable: equal keys stay in row order
    repeats = np.flatnonzero(keys[order[1:]] == keys[order[:-1]]) + 1  # positions repeating the one before
    examples: list[tuple[int, int]] = []
    for pos in repeats[np.argsort(order[repeats])[:_EXAMPLES]]:
        first = pos
        while first > 0 and keys[order[first - 1]] == keys[order[pos]]:
            first -= 1
        examples.append((int(order[pos]), int(order[first])))
    return len(repeats), examples


def truncated_captions(captions: list[str], tokenizer: Callable[..., Any], context_length: int) -> list[int]:
    """Indices of the captions the tokenizer cuts at ``context_length`` tokens.

    Each caption is tokenized at ``context_length + 1``: it was cut when that extra position holds a
    token rather than padding. See :func:`may_be_truncated` for the captions not worth tokenizing.

    Example:
        >>> truncated_captions(["a dog", "word " * 100], model.tokenizer, 77)
        [1]
    """
    pad = int(tokenizer([""], context_length=context_length + 1)[0, -1])
    found: list[int] = []
    for start in range(0, len(captions), _CHUNK):
        tokens = tokenizer(captions[start:start + _CHUNK], context_length=context_length + 1)
        found.extend(start + k for k, last in enumerate(tokens[:, context_length].tolist()) if int(last) != pad)
    return found


def may_be_truncated(caption: str, context_length: int) -> bool:
    """False for a caption too short to be cut: BPE, WordPiece and SentencePiece give at most one token
    per UTF-8 byte, plus the special tokens and SentencePiece's word-start mark (a margin of 4 covers them).

    Example:
        >>> may_be_truncated("a dog", 77), may_be_truncated("word " * 20, 77)
        (False, True)
    """
    return len(caption.encode("utf-8")) + 4 > context_length


class _Sample:
    """A seeded reservoir of at most ``size`` (row, caption) pairs out of all offered (Algorithm R)."""

    def __init__(self, size: int) -> None:
        self.size, self.offered, self.items = size, 0, []
        self._rng = random.Random(0)

    def offer(self, item: tuple[int, str]) -> None:
        self.offered += 1
        if len(self.items) < self.size:
            self.items.append(item)
        else:
            j = self._rng.randrange(self.offered)
            if j < self.size:
                self.items[j] = item


def audit_training_corpus(corpus: ImageCaptionCorpus, tokenizer: Optional[Callable[..., Any]] = None,
                          context_length: Optional[int] = None,
                          log: bool = True) -> tuple[ImageCaptionCorpus, dict[str, Any]]:
    """The corpus without placeholder captions (``corpus`` itself when it has none), and the counts.

    ``tokenizer`` and ``context_length`` (the model's): count the captions longer than the context
    (left out when either is None). Exact up to 100,000 captions long enough to be cut; beyond that
    estimated from a seeded sample of 100,000 of them (``truncated_estimated``), so that a corpus of
    millions does not hold the start of training for minutes. ``log``: one line per finding.

    Example:
        >>> corpus, counts = audit_training_corpus(open_corpus("pairs.csv"), model.tokenizer, 77)
        >>> counts["truncated_captions"], counts["duplicate_rows"]
        (41, 2)
    """
    n = len(corpus)
    kept = np.ones(n, dtype=bool)
    keys, known = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool)
    cleaned: dict[int, list[str]] = {}
    dropped: list[tuple[str, str]] = []
    placeholder_examples: list[str] = []
    placeholders = captions_total = 0
    count_truncated = tokenizer is not None and context_length is not None
    sample = _Sample(MAX_TOKENIZED)
    for i in range(n):
        row = corpus[i]
        captions = [c for c in row.captions if not is_placeholder_caption(c)]
        if len(captions) != len(row.captions):
            placeholders += len(row.captions) - len(captions)
            if len(placeholder_examples) < _EXAMPLES:
                bad = next(c for c in row.captions if is_placeholder_caption(c))
                placeholder_examples.append(f"{row.source} ({bad!r})")
            if not captions:
                kept[i] = False
                dropped.append((row.source, "no caption but placeholders ('nan', 'None', 'null')"))
                continue
            cleaned[i] = captions
        key = _row_key(row.image, captions)
        if key is not None:
            keys[i], known[i] = key, True
        captions_total += len(captions)
        if count_truncated:
            for caption in captions:
                if may_be_truncated(caption, int(context_length)):
                    sample.offer((i, caption))
    duplicates, duplicate_pairs = _duplicates(keys, known & kept)
    truncated, truncated_rows = None, []
    if count_truncated:
        try:
            found = truncated_captions([c for _, c in sample.items], tokenizer, int(context_length))
        except TypeError:  # a tokenizer without a context_length argument: not counted
            found = None
        if found is not None:
            truncated = round(len(found) * sample.offered / len(sample.items)) if sample.items else 0
            truncated_rows = sorted(sample.items[k][0] for k in found)[:_EXAMPLES]
    counts = {"rows": n, "captions": captions_total, "placeholder_captions": placeholders,
              "placeholder_rows": len(dropped), "duplicate_rows": duplicates, "truncated_captions": truncated,
              "truncated_estimated": sample.offered > len(sample.items), "context_length": context_length}
    if log:
        def source(i: int) -> str:  # only the few rows named in the log are read again
            return corpus[i].source

        _log_findings(corpus.name, counts, placeholder_examples, [s for s, _ in dropped],
                      [f"{source(a)} = {source(b)}" for a, b in duplicate_pairs], [source(i) for i in truncated_rows])
    if not dropped and not cleaned:
        return corpus, counts
    return CleanCorpus(corpus, np.flatnonzero(kept), cleaned, dropped), counts


def _log_findings(name: str, counts: dict[str, Any], placeholders: list[str], dropped: list[str],
                  duplicates: list[str], truncated: list[str]) -> None:
    """One line per kind of finding, with up to three examples, and a summary line."""
    if counts["placeholder_captions"]:
        logger.warning("%s: dropped %d placeholder captions ('nan', 'None', 'null'), e.g. %s; %d rows had no "
                       "other caption and are skipped%s", name, counts["placeholder_captions"],
                       ", ".join(placeholders), counts["placeholder_rows"],
                       f" (e.g. {', '.join(dropped[:_EXAMPLES])})" if dropped else "")
    if counts["duplicate_rows"]:
        logger.warning("%s: %d duplicate rows (same image and captions as an earlier row), kept, e.g. %s",
                       name, counts["duplicate_rows"], ", ".join(duplicates))
    about = "about " if counts["truncated_estimated"] else ""
    if counts["truncated_captions"]:
        logger.warning("%s: %s%d of %d captions are longer than the context length (%d tokens) and are truncated, "
                       "e.g. %s", name, about, counts["truncated_captions"], counts["captions"],
                       counts["context_length"], ", ".join(truncated))
    truncated_text = ("not counted" if counts["truncated_captions"] is None
                      else f"{about}{counts['truncated_captions']}")
    logger.info("%s: %d rows, %d captions; placeholder captions dropped: %d (rows skipped: %d); duplicate rows: "
                "%d; captions truncated: %s", name, counts["rows"] - counts["placeholder_rows"], counts["captions"],
                counts["placeholder_captions"], counts["placeholder_rows"], counts["duplicate_rows"], truncated_text)
