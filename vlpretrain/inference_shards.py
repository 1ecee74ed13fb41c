"""Streamed encoding of WebDataset shards (a :class:`~vlpretrain.data.shard_corpus.ShardCorpus`): the same
batches, eval mode and normalisation as :mod:`vlpretrain.inference`, read in order without listing the corpus.

Example:
    >>> feats = encode_shard_corpus(model, ShardCorpus("shards/emoji-test"), batch_size=256, num_workers=2,
    ...                             progress=False)
    >>> feats["image_features"].shape, feats["skipped"][:1]
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence

import torch

from .inference import DeviceLike, ImageItems, encode_texts, image_feature_batches

if TYPE_CHECKING:
    from .data.shard_corpus import ShardCorpus

__all__ = ["shard_feature_batches", "shard_features", "encode_shard_corpus"]

logger = logging.getLogger(__name__)

MAX_SKIPPED_REPORTED = 20


def shard_feature_batches(model, corpus: Any, shards: Optional[Sequence[int]] = None, batch_size: int = 256,
                          device: DeviceLike = None, num_workers: int = 0, progress: bool = False, decode: bool = True,
                          describe: Optional[Callable[[int, Any], dict[str, Any]]] = None,
                          desc: str = "encode images") -> Iterator[dict[str, Any]]:
    """:func:`image_feature_batches` over a :class:`~vlpretrain.data.shard_corpus.ShardCorpus`, streamed: the
    ``j``-th of ``shards`` (default: all) is read and decoded by DataLoader worker ``j % num_workers``, and
    nothing of the corpus is listed. Items also carry ``shard``, ``position``, ``worker``, ``source`` and
    ``skip`` (a bad sample's reason: no row, zero features); ``(shard, position)`` restores corpus order.

    Example:
        >>> for batch in shard_feature_batches(model, ShardCorpus("shards/"), num_workers=2):
        ...     rows = [i for i, why in enumerate(batch["skip"]) if why is None]
    """
    items = ImageItems([], model.preprocess, on_bad_image="zero", decode=decode, describe=describe)
    yield from image_feature_batches(model, corpus.stream(items.load, shards), batch_size, device, num_workers,
                                     progress, on_bad_image="zero", decode=decode, desc=desc)


def shard_features(model, corpus: "ShardCorpus", batch_size: int, num_workers: int, progress: bool,
                    describe: Optional[Callable] = None, on_rows: Optional[Callable] = None) -> dict:
    """Image features of every usable sample of ``corpus``, streamed (decoded in ``num_workers`` workers)
    and put back in corpus order (shard, then position), without keeping the samples' metadata.

    ``on_rows(batch, rows, first)`` sees each batch's sample rows (indices into the batch) as they
    arrive; ``first`` is the arrival number of the first. Returns ``features`` (N, D) and ``ok`` (N,) in
    corpus order, ``rank`` (arrival number -> corpus-order index) and ``skipped`` [(source, reason)].
    """
    keys, chunks, oks, skipped = [], [], [], []
    for batch in shard_feature_batches(model, corpus, batch_size=batch_size, num_workers=num_workers,
                                       progress=progress, describe=describe, desc=f"encode {corpus.name}"):
        rows = [i for i, why in enumerate(batch["skip"]) if why is None]
        skipped.extend((batch["source"][i], why) for i, why in enumerate(batch["skip"]) if why is not None)
        if not rows:
            continue
        if on_rows is not None:
            on_rows(batch, rows, len(keys))
        keys.extend((batch["shard"][i] << 32) + batch["position"][i] for i in rows)
        chunks.append(batch["features"][rows])
        oks.append(batch["ok"][rows])
    for source, why in skipped[:MAX_SKIPPED_REPORTED]:
        logger.warning("skipped bad shard sample %s: %s", source, why)
    order = torch.argsort(torch.tensor(keys, dtype=torch.long), stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    features = torch.cat(chunks)[order] if chunks else torch.zeros(0, model.embed_dim)
    ok = torch.cat(oks)[order] if oks else torch.zeros(0, dtype=torch.bool)
    return {"features": features, "ok": ok, "rank": rank, "skipped": skipped}


def encode_shard_corpus(model, corpus: "ShardCorpus", batch_size: int, num_workers: int, progress: bool) -> dict:
    """:func:`~vlpretrain.inference.encode_corpus` for shards, streamed: captions are encoded as they arrive,
    ``batch_size`` at a time (the same batches as encode_corpus when read in one process, so the features
    match the table's), and only features and ``text_to_image`` are kept (``captions`` is None)."""
    pending: list[str] = []
    owners: list[int] = []
    text_chunks: list[torch.Tensor] = []

    def encode(count: int) -> None:
        text_chunks.append(encode_texts(model, pending[:count], batch_size))
        del pending[:count]

    def on_rows(batch: dict, rows: list[int], first: int) -> None:
        for n, i in enumerate(rows):
            pending.extend(batch["captions"][i])
            owners.extend([first + n] * len(batch["captions"][i]))
        while len(pending) >= batch_size:
            encode(batch_size)

    images = shard_features(model, corpus, batch_size, num_workers, progress,
                             describe=lambda index, row: {"captions": list(row.captions)}, on_rows=on_rows)
    if pending:
        encode(len(pending))
    text_to_image = images["rank"][torch.tensor(owners, dtype=torch.long)]
    order = torch.argsort(text_to_image, stable=True)  # captions of an image stay in their order
    text_features = torch.cat(text_chunks)[order] if text_chunks else torch.zeros(0, model.embed_dim)
    return {"image_features": images["features"], "text_features": text_features,
            "text_to_image": text_to_image[order], "captions": None,
            "bad_images": torch.nonzero(~images["ok"]).flatten().tolist(), "skipped": images["skipped"]}
