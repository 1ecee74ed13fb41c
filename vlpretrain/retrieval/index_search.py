"""Answering queries against an index: embedding the query, turning faiss ids into hits, ITM re-ranking.

Example:
    >>> queries = encode_queries(model, texts=["a red heart"], images=None)
    >>> scores, ids = index.search(queries, 5)
    >>> hits = make_hits(meta, scores[0], ids[0])
    >>> rerank_hits(model, "a red heart", hits, rerank=5, k=5)[0]["itm_score"]
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np

from ..inference import RERANK_SCORES, combined_scores, encode_images, encode_texts, itm_pair_scores, model_logit_scale

__all__ = ["RERANK_MESSAGE", "plain", "check_query_texts", "encode_queries", "make_hits", "check_rerank",
           "rerank_hits"]

RERANK_MESSAGE = ("ITM re-ranking needs a model with an ITM fusion head (trained with model.fusion and "
                  "loss.name albef); this index's model has none")


def plain(value: Any) -> Any:
    """numpy / pandas values as JSON-friendly Python values (NaN -> None)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, np.ndarray):
        return [plain(v) for v in value.tolist()]
    return value


def check_query_texts(texts: Sequence[Any], where: str = "search") -> None:
    """Refuse an empty or blank text query: it would embed to some vector and answer with arbitrary hits.

    Example:
        >>> check_query_texts(["a red heart", "  "])
        ValueError: search: text query 2 of 2 is empty; give some words to search for
    """
    empty = [i for i, text in enumerate(texts) if not isinstance(text, str) or not text.strip()]
    if empty:
        which = "the text query" if len(texts) == 1 else f"text query {empty[0] + 1} of {len(texts)}"
        raise ValueError(f"{where}: {which} is empty; give some words to search for")


def encode_queries(model, texts: Optional[Sequence[str]], images: Optional[Sequence[Any]]) -> np.ndarray:
    """(n, D) float32 unit-norm query vectors of ``texts`` or of ``images`` (paths, bytes, PIL images).

    Example:
        >>> encode_queries(model, ["a red heart"], None).shape
        (1, 256)
    """
    if texts is not None:
        check_query_texts(list(texts))
        return encode_texts(model, list(texts)).numpy()
    return encode_images(model, list(images), batch_size=64, progress=False).numpy()


def make_hits(meta, scores: np.ndarray, ids: np.ndarray) -> list[dict[str, Any]]:
    """One query's hits, best first: ``{"rank", "score", "id", "image", "caption", "row", ...meta columns}``.

    Ids of -1 (fewer reachable vectors than asked for, e.g. IVF with a small nprobe) are dropped.

    Example:
        >>> make_hits(index.meta, np.array([0.31]), np.array([17]))[0]["caption"]
        'red heart'
    """
    found = ids >= 0
    hits = []
    # One frame lookup per query, not per hit: row-wise iloc on a mixed-type frame is slow. ``meta`` may
    # also be a function of the ids giving their rows (an on-disk index reads only those).
    rows = meta(ids[found]) if callable(meta) else meta.iloc[ids[found]]
    for score, i, values in zip(scores[found], ids[found], rows.to_dict("records")):
        values = {c: plain(v) for c, v in values.items()}
        hit = {"rank": len(hits) + 1, "score": float(score), "id": int(i), "image": values.pop("image"),
               "caption": values.pop("caption"), "row": int(values.pop("row"))}
        values.pop("id", None)
        hit.update(values)
        hits.append(hit)
    return hits


def check_rerank(model_getter, modality: str, texts: Any, images: Any) -> None:
    """One-line errors for re-ranking requests that cannot work, before any search.

    ``model_getter`` loads the index's model only when the request itself is well formed.
    """
    if texts is None and images is None:
        raise ValueError("search: rerank needs the queries themselves (texts or images), not vectors: "
                         "the ITM head scores the query with each hit")
    if (texts is not None) == (modality == "text"):
        raise ValueError(f"search: rerank scores image-text pairs: give texts for an index of images or images "
                         f"for an index of captions (this index holds {modality} embeddings)")
    if not getattr(model_getter(), "has_itm", False):
        raise NotImplementedError(RERANK_MESSAGE)


def _pair_inputs(model, query: Any, head: list[dict]) -> tuple[Any, list[str]]:
    """Images (a loader of the hit images, or the query image) and texts of the ITM pairs."""
    from ..data.images import BadImageError
    from ..inference import load_image

    if isinstance(query, str):  # a caption against the hit images
        pictures = []
        for hit in head:
            if not hit["image"]:
                raise ValueError(f"search: cannot re-rank hit {hit['id']}: the index stores no image path "
                                 f"for it (images held inside the data set); rerank needs image files")
            try:
                pictures.append(load_image(model.preprocess, hit["image"]))
            except BadImageError as e:
                raise ValueError(f"search: cannot re-rank hit {hit['id']}: {e}; rerank reads the indexed "
                                 f"images from their paths") from None
        return pictures, [query] * len(head)
    try:
        picture = load_image(model.preprocess, query)
    except BadImageError as e:
        raise ValueError(f"search: cannot read the query image: {e}") from None
    return [picture], [hit["caption"] for hit in head]


def rerank_hits(model, query: Any, hits: list[dict], rerank: int, k: int, rerank_score: str = "itm") -> list[dict]:
    """Re-sort the first ``rerank`` hits of one query by ITM score (``rerank_score``); keep the rest; cut to ``k``.

    Each of the first ``rerank`` hits gets ``itm_score`` (the match probability; None beyond them) and,
    for ``"itm+itc"``, ``rerank_score`` (see :func:`vlpretrain.inference.combined_scores`, with the
    index's own, possibly quantized, inner product as the similarity).

    Example:
        >>> rerank_hits(model, "a red heart", hits, rerank=10, k=5, rerank_score="itm+itc")[0]["rerank_score"]
    """
    import torch

    head, tail = hits[:rerank], hits[rerank:]
    if not head:
        return hits[:k]
    if rerank_score not in RERANK_SCORES:
        raise ValueError(f"search: rerank_score must be one of {list(RERANK_SCORES)}, got {rerank_score!r}")
    pictures, texts = _pair_inputs(model, query, head)
    images = torch.stack(pictures)
    image_index = list(range(len(head))) if len(pictures) == len(head) else [0] * len(head)
    pairs = torch.tensor([[i, j] for j, i in enumerate(image_index)], dtype=torch.long)
    scores = itm_pair_scores(model, images, texts, pairs, batch_size=max(len(head), 1)).tolist()
    if rerank_score == "itm":
        ranking = scores
    else:
        ranking = combined_scores(torch.tensor(scores), torch.tensor([hit["score"] for hit in head]),
                                  model_logit_scale(model)).tolist()
    for hit, score, value in zip(head, scores, ranking):
        hit["itm_score"] = float(score)
        if rerank_score != "itm":
            hit["rerank_score"] = float(value)
    for hit in tail:
        hit["itm_score"] = None
        if rerank_score != "itm":
            hit["rerank_score"] = None
    # A stable sort: equal scores keep the embedding order.
    order = sorted(range(len(head)), key=lambda i: -ranking[i])
    ranked = [head[i] for i in order] + tail
    for rank, hit in enumerate(ranked, 1):
        hit["rank"] = rank
    return ranked[:k]
