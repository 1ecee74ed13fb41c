"""WebDataset shards read as a corpus for evaluation and embedding: in order, sample by sample, never
listed in memory.

:class:`ShardCorpus` reads the tars a shard spec names (see :mod:`vlpretrain.data.shard_format`) one
after the other; each usable sample comes out as a :class:`~vlpretrain.data.corpus.CorpusRow` (image:
the encoded bytes; extras: its ``.json`` member without ``captions``). Bad samples (no image, no caption,
unreadable tar data) are skipped, counted and named in ``skipped``, as the other corpora do. Unlike those
it has no ``corpus[i]``: :meth:`ShardCorpus.iter_shard` and :meth:`ShardCorpus.stream` (a torch
``IterableDataset`` that splits the shards over ``DataLoader`` workers) are the ways in.

Example:
    >>> corpus = ShardCorpus("shards/emoji")
    >>> corpus.num_shards, corpus.num_samples          # num_samples: None without a manifest
    (4, 3764)
    >>> row = next(corpus.iter_shard(0)); row.captions, row.source
    (['grinning face'], 'shards/emoji/00000.tar:000000000')
"""

from __future__ import annotations

import logging
import os
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

from torch.utils.data import IterableDataset, get_worker_info

from .corpus import CorpusRow
from .shard_format import IMAGE_EXTENSIONS, MANIFEST_NAME, ShardInfo, read_shard_samples, resolve_shards

__all__ = ["ShardCorpus", "ShardItemStream", "original_path", "shard_set_name", "ORIGINAL_PATH_FIELDS"]

logger = logging.getLogger(__name__)

# Fields of a sample's .json that name where its image came from (ours first, then img2dataset's "url").
# "source_path": what `vlp data shard` writes; the others: img2dataset and common hand-made shards.
ORIGINAL_PATH_FIELDS = ("source_path", "original_path", "path", "image", "url")
MAX_SKIPPED_LOGGED = 20


def shard_set_name(spec: Union[str, os.PathLike]) -> str:
    """How reports name a shard set: its folder (``shards/emoji``, ``shards/emoji/manifest.json`` and
    ``shards/emoji/{00000..00003}.tar`` are all ``emoji``).

    Example:
        >>> shard_set_name("data/cc3m/{00000..00331}.tar")
        'cc3m'
    """
    path = Path(os.fspath(spec).rstrip("/"))
    if path.name == MANIFEST_NAME or path.suffix == ".tar" or "{" in path.name:
        path = path.parent
    return path.name or os.fspath(spec)


def original_path(row: CorpusRow) -> str:
    """Where a shard sample's image came from: the first of ORIGINAL_PATH_FIELDS in its ``.json``, else
    its place in the shards (``shards/00003.tar:000003017``).

    Example:
        >>> original_path(CorpusRow(b"...", ["a frog"], {"path": "img/frog.png"}, "s/00000.tar:000000001"))
        'img/frog.png'
    """
    for field in ORIGINAL_PATH_FIELDS:
        value = row.extras.get(field)
        if isinstance(value, str) and value:
            return value
    return row.source


class ShardCorpus:
    """The samples of a shard set, read in order without listing them (see the module docstring).

    ``skipped`` gathers ``(source, reason)`` of the bad samples met by :meth:`iter_shard` in this
    process (the first 20 are logged).

    Example:
        >>> corpus = ShardCorpus("shards/{00000..00003}.tar")
        >>> sum(1 for _ in corpus), len(corpus.skipped)
        (3764, 0)
    """

    def __init__(self, spec: Union[str, os.PathLike], verify: bool = False):
        self.spec = os.fspath(spec)
        self.shards: list[ShardInfo] = resolve_shards(spec, verify)
        self.name = shard_set_name(spec)
        self.skipped: list[tuple[str, str]] = []

    def __repr__(self) -> str:
        return f"ShardCorpus({self.spec!r}, shards={self.num_shards}, samples={self.num_samples})"

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def num_samples(self) -> Optional[int]:
        """Samples the manifest lists (bad ones, skipped when read, included); None without a manifest."""
        counts = [s.samples for s in self.shards]
        return None if any(c is None for c in counts) else int(sum(counts))

    def __len__(self) -> int:
        n = self.num_samples
        if n is None:
            raise TypeError(f"{self.spec}: the number of samples is unknown (no {MANIFEST_NAME} lists them); "
                            f"read the shards with iter_shard() / stream()")
        return n

    def _record_bad(self, source: str, reason: str) -> None:
        self.skipped.append((source, reason))
        if len(self.skipped) <= MAX_SKIPPED_LOGGED:
            logger.warning("skipped bad shard sample %s: %s", source, reason)

    def iter_shard(self, index: int, on_bad: Optional[Callable[[str, str], None]] = None) -> Iterator[CorpusRow]:
        """The usable samples of shard ``index`` as rows, in tar order; bad ones go to ``on_bad(source,
        reason)`` (default: :attr:`skipped`).

        Example:
            >>> [row.source for row in corpus.iter_shard(1)][:1]
            ['shards/00001.tar:000001000']
        """
        for sample in read_shard_samples(self.shards[index].path, on_bad or self._record_bad):
            extras = {k: v for k, v in sample.meta.items() if k != "captions"}
            yield CorpusRow(sample.image, list(sample.captions), extras, sample.source)

    def __iter__(self) -> Iterator[CorpusRow]:
        for index in range(self.num_shards):
            yield from self.iter_shard(index)

    def listed_samples(self, index: int) -> int:
        """Samples shard ``index`` holds at most: the manifest's count, else the keys with an image member
        in the tar (read from the member headers only, the images are skipped over). A shard yields at
        most this many rows, so ``offset + position`` numbers samples uniquely across shards.

        Example:
            >>> corpus.listed_samples(0)
            1000
        """
        shard = self.shards[index]
        if shard.samples is not None:
            return int(shard.samples)
        from webdataset.tariterators import base_plus_ext

        keys = set()
        try:
            with tarfile.open(shard.path, "r:") as tar:
                for member in tar:
                    key, ext = base_plus_ext(member.name)
                    if key is not None and ext is not None and ext.lower() in IMAGE_EXTENSIONS:
                        keys.add(key)
        except (tarfile.TarError, OSError):
            pass  # a truncated or unreadable tar: what was listed so far (reading it skips the rest too)
        return len(keys)

    def stream(self, load: Callable[[int, CorpusRow], dict[str, Any]],
               shards: Optional[Sequence[int]] = None) -> "ShardItemStream":
        """An ``IterableDataset`` of ``load(position, row)`` items over ``shards`` (default: all); see
        :class:`ShardItemStream`.

        Example:
            >>> stream = corpus.stream(lambda i, row: {"caption": row.captions[0]})
        """
        return ShardItemStream(self, list(range(self.num_shards)) if shards is None else list(shards), load)


class ShardItemStream(IterableDataset):
    """Items of a shard corpus for a ``DataLoader``: the ``j``-th of ``shards`` is read by worker
    ``j % num_workers``, its samples in order, so each worker's items come shard after shard.

    Each item is ``load(position, row)`` plus ``shard`` (its index in the corpus), ``position`` (in the
    shard, among usable samples), ``worker``, ``source`` and ``skip``: None, or for a bad sample the
    reason (such an item is ``load`` of an empty row with ``error`` set to the reason; it is no sample,
    and is passed on only so the main process can count and name it).

    Example:
        >>> loader = DataLoader(corpus.stream(items.load), batch_size=64, num_workers=2, collate_fn=collate_images)
    """

    # image_feature_batches takes this dataset as it is instead of wrapping it in ImageItems.
    yields_image_items = True

    def __init__(self, corpus: ShardCorpus, shards: list[int], load: Callable[[int, CorpusRow], dict[str, Any]]):
        self.corpus, self.shards, self.load = corpus, shards, load

    @staticmethod
    def split(shards: Sequence[int], worker: int, num_workers: int) -> list[int]:
        """The shards worker ``worker`` of ``num_workers`` reads, in order (0 workers reads like 1).

        Example:
            >>> ShardItemStream.split([0, 2, 4, 6, 8], worker=1, num_workers=2)
            [2, 6]
        """
        return list(shards)[worker::max(num_workers, 1)]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for k in self.split(self.shards, worker, num_workers):
            bad: list[tuple[str, str]] = []
            position = 0
            for row in self.corpus.iter_shard(k, on_bad=lambda source, why: bad.append((source, why))):
                yield from self._skipped(k, worker, bad)
                item = self.load(position, row)
                item.update(shard=k, position=position, worker=worker, source=row.source, skip=None)
                position += 1
                yield item
            yield from self._skipped(k, worker, bad)

    def _skipped(self, k: int, worker: int, bad: list[tuple[str, str]]) -> Iterator[dict[str, Any]]:
        for source, reason in bad:
            item = self.load(-1, CorpusRow(b"", [], {}, source))
            item.update(shard=k, position=-1, worker=worker, source=source, skip=reason, error=reason, image=None)
            yield item
        bad.clear()
