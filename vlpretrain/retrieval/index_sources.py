"""The embedding folders an index is built from: opened, checked to share one model, gathered with their rows.

Example:
    >>> sets = open_sets(["emb/part1", "emb/part2"])
    >>> vectors, meta, skipped = collect(sets, "image", first_id=0, first_source=0)
"""

from __future__ import annotations

import os
from typing import Any, Sequence, Union

import numpy as np

__all__ = ["open_sets", "check_same_signature", "meta_frame", "collect", "EmbeddingsLike", "META_COLUMNS"]

# Columns of meta.parquet; corpus extra columns with these names get an "extra_" prefix.
META_COLUMNS = ("id", "modality", "row", "image", "caption", "source")

EmbeddingsLike = Union[str, os.PathLike, Any, Sequence[Union[str, os.PathLike, Any]]]


def open_sets(embeddings: EmbeddingsLike) -> list:
    from .embedding_set import EmbeddingSet

    items = list(embeddings) if isinstance(embeddings, (list, tuple)) else [embeddings]
    if not items:
        raise ValueError("no embedding folders given: pass at least one folder written by `vlp embed`")
    return [item if isinstance(item, EmbeddingSet) else EmbeddingSet.open(item) for item in items]


def check_same_signature(stored: dict[str, Any], given: dict[str, Any], where: str, what: str) -> None:
    """One-line error unless signature ``given`` (of ``what``) is the model ``stored`` (of ``where``)."""
    from .signature import PROBE_MIN_COSINE, signature_cosine

    made = f"{where} was built with model {stored.get('model') or '(unnamed)'} (dim {stored.get('dim')})"
    other = f"{what} holds embeddings of model {given.get('model') or '(unnamed)'}"
    advice = "use embeddings made with the same model, or rebuild the index from all of them"
    if int(given.get("dim", -1)) != int(stored.get("dim", -2)):
        raise ValueError(f"{made}; {other} with dim {given.get('dim')}: {advice}")
    cosine = signature_cosine(stored, given)
    if cosine is not None and cosine < PROBE_MIN_COSINE:
        raise ValueError(f"{made}; {other}, which embeds text differently (probe cosine {cosine:.3f} < "
                         f"{PROBE_MIN_COSINE}): {advice}")


def meta_frame(emb, modality: str):
    """meta.parquet rows for the vectors this set contributes to a ``modality`` index, and their keep-mask."""
    import pandas as pd

    meta = emb.metadata()
    extras = [c for c in meta.columns if c not in ("row", "image", "captions", "ok")]
    renamed = {c: f"extra_{c}" if c in META_COLUMNS else c for c in extras}
    if modality == "image":
        keep = meta["ok"].to_numpy(dtype=bool)  # undecodable images are zero vectors: not searchable
        first = [list(c)[0] if c is not None and len(c) else "" for c in meta["captions"]]
        frame = pd.DataFrame({"modality": "image", "row": meta["row"].to_numpy(np.int64),
                              "image": meta["image"].astype(str).to_numpy(), "caption": first})
        for c in extras:
            frame[renamed[c]] = meta[c].to_numpy()
        return frame[keep].reset_index(drop=True), keep
    text = emb.text_metadata()
    by_row = meta.set_index("row")
    frame = pd.DataFrame({"modality": "text", "row": text["row"].to_numpy(np.int64),
                          "image": by_row["image"].reindex(text["row"]).astype(str).to_numpy(),
                          "caption": text["caption"].astype(str).to_numpy()})
    for c in extras:
        frame[renamed[c]] = by_row[c].reindex(text["row"]).to_numpy()
    return frame, np.ones(len(frame), dtype=bool)


def collect(sets: list, modality: str, first_id: int, first_source: int):
    """Base vectors (float32) and their meta rows, ids numbered from ``first_id``."""
    import pandas as pd

    vectors, frames, skipped = [], [], 0
    for i, emb in enumerate(sets):
        x = emb.image_embeddings() if modality == "image" else emb.text_embeddings()
        frame, keep = meta_frame(emb, modality)
        if len(keep) != len(x):
            raise ValueError(f"{emb.path}: {len(x)} {modality} embeddings but {len(keep)} metadata rows: "
                             f"delete {emb.path} and export again")
        frame.insert(4, "source", first_source + i)
        vectors.append(x[keep])
        frames.append(frame)
        skipped += int((~keep).sum())
    meta = pd.concat(frames, ignore_index=True)
    meta.insert(0, "id", np.arange(first_id, first_id + len(meta), dtype=np.int64))
    return np.ascontiguousarray(np.concatenate(vectors), dtype=np.float32), meta, skipped
