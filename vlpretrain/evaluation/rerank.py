"""Re-ranking retrieval candidates with a fusion model's image-text matching (ITM) head (ALBEF's k_test).

Embedding similarity picks the top K candidates cheaply; the ITM head, which sees the image and the
caption together, then re-scores just those K. :func:`itm_rerank` re-sorts candidate lists;
:func:`reranked_retrieval_metrics` gives the recalls of the re-ranked lists for
``evaluate_retrieval(..., rerank_itm=K)``.

Example:
    >>> order, scores = itm_rerank(model, images, ["a red heart"], torch.tensor([[4, 0, 9]]))
    >>> order          # the three image indices, best ITM match first
    tensor([[0, 4, 9]])
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

# Score of a pair whose image could not be loaded: below every probability, so it sinks.
BAD_IMAGE_SCORE = -1.0

ImagesLike = Union[torch.Tensor, Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]]]
TextsLike = Union[torch.Tensor, Sequence[str]]


def _image_batch(model, images: ImagesLike, indices: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Image tokens of ``indices`` and a bool mask of the images that loaded."""
    if callable(images) and not isinstance(images, torch.Tensor):
        batch, ok = images(indices)
    else:
        batch, ok = images[indices], torch.ones(len(indices), dtype=torch.bool)
    batch = batch.to(device)
    if batch.ndim == 4:  # preprocessed images: encoded here, once per image
        batch = model.encode_image_tokens(batch)
    return batch, ok.bool()


@torch.no_grad()
def itm_pair_scores(model, images: ImagesLike, texts: TextsLike, pairs: torch.Tensor, batch_size: int = 64,
                    progress: bool = False) -> torch.Tensor:
    """ITM match probability of each ``(image index, text index)`` row of ``pairs`` (P, 2) -> (P,).

    ``images``: image tokens (N, L, D), preprocessed images (N, 3, H, W), or a function mapping a list
    of image indices to ``(images (n, 3, H, W), ok (n,) bool)`` (loads lazily; pairs with a failed image
    score ``BAD_IMAGE_SCORE``). ``texts``: token ids (M, T) or M strings. Each image is encoded once.

    Example:
        >>> itm_pair_scores(model, images, ["a red heart", "a frog"], torch.tensor([[0, 0], [0, 1]]))
    """
    device = next(model.parameters()).device
    pairs = torch.as_tensor(pairs, dtype=torch.long).reshape(-1, 2)
    scores = torch.full((len(pairs),), BAD_IMAGE_SCORE)
    if len(pairs) == 0:
        return scores
    was_training = model.training
    model.eval()
    try:
        order = torch.argsort(pairs[:, 0], stable=True)
        unique_images = torch.unique(pairs[:, 0]).tolist()
        chunks = [unique_images[i:i + batch_size] for i in range(0, len(unique_images), batch_size)]
        for chunk in tqdm(chunks, desc="ITM re-ranking", disable=not progress, leave=False):
            tokens, ok = _image_batch(model, images, chunk, device)
            where = {image: row for row, image in enumerate(chunk)}
            in_chunk = order[torch.isin(pairs[order, 0], torch.tensor(chunk))]
            for start in range(0, len(in_chunk), batch_size):
                ids = in_chunk[start:start + batch_size]
                rows = torch.tensor([where[int(i)] for i in pairs[ids, 0]])
                text_ids = pairs[ids, 1]
                if isinstance(texts, torch.Tensor):
                    text_tokens = texts[text_ids]
                else:
                    text_tokens = model.tokenizer([texts[int(j)] for j in text_ids])
                value = model.itm_scores(tokens[rows.to(device)], text_tokens.to(device)).float().cpu()
                scores[ids] = torch.where(ok[rows], value, torch.full_like(value, BAD_IMAGE_SCORE))
    finally:
        model.train(was_training)
    return scores


def itm_rerank(model, image_tokens_or_images: ImagesLike, texts: TextsLike, candidates: torch.Tensor,
               query: str = "text", batch_size: int = 64, progress: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-sort each query's candidates by ITM score, best first (ties keep the given order).

    ``query="text"``: row q of ``candidates`` (Q, K) holds image indices for caption ``texts[q]``;
    ``query="image"``: it holds text indices for image q. Returns ``(order, scores)``, both (Q, K):
    the candidates re-sorted and their ITM match probabilities.

    Example:
        >>> top = (text_features @ image_features.T).topk(16).indices      # (Q, 16) by embedding
        >>> reranked, scores = itm_rerank(model, images, captions, top)
    """
    if query not in ("text", "image"):
        raise ValueError(f"itm_rerank: query must be 'text' or 'image', got {query!r}")
    candidates = torch.as_tensor(candidates, dtype=torch.long)
    queries = torch.arange(candidates.shape[0])[:, None].expand_as(candidates)
    if query == "text":
        pairs = torch.stack([candidates.reshape(-1), queries.reshape(-1)], 1)
    else:
        pairs = torch.stack([queries.reshape(-1), candidates.reshape(-1)], 1)
    scores = itm_pair_scores(model, image_tokens_or_images, texts, pairs, batch_size, progress).view_as(candidates)
    scores, position = scores.sort(dim=1, descending=True, stable=True)
    return candidates.gather(1, position), scores


def _top_k(queries: torch.Tensor, keys: torch.Tensor, k: int, chunk_size: int = 1024) -> torch.Tensor:
    return torch.cat([(queries[i:i + chunk_size] @ keys.T).topk(k, dim=1).indices
                      for i in range(0, len(queries), chunk_size)]) if len(queries) else \
        torch.zeros(0, k, dtype=torch.long)


RERANK_SCORES = ("itm", "itm+itc")


def combined_scores(itm_probability: torch.Tensor, similarity: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """``log p_itm(match) + logit_scale * cosine``: the product of the ITM head's match probability and
    the contrastive softmax over the candidates (its normaliser is the same for every candidate of one
    query, so it drops out of the ranking). A confident ITM head overrides the embedding order; one
    near its prior leaves it almost unchanged. Pairs with an unreadable image (``BAD_IMAGE_SCORE``) sink.

    Example:
        >>> combined_scores(torch.tensor([0.9, 0.5]), torch.tensor([0.20, 0.25]), logit_scale=20.0)
        tensor([3.8946, 4.3069])
    """
    bad = itm_probability < 0
    value = torch.log(itm_probability.clamp_min(1e-12)) + float(logit_scale) * similarity
    return value.masked_fill(bad, float("-inf"))


def model_logit_scale(model) -> float:
    """The contrastive temperature's inverse (``exp(logit_scale)``) a model scores with."""
    scale = getattr(model, "logit_scale", None)
    if scale is None:
        raise ValueError("itm+itc re-ranking needs the model's contrastive logit_scale; this model has none")
    return float(torch.as_tensor(scale).detach().float().exp())


@torch.no_grad()
def reranked_retrieval_metrics(model, images: ImagesLike, texts: TextsLike, image_features: torch.Tensor,
                               text_features: torch.Tensor, text_to_image: torch.Tensor, k: int,
                               ks: Sequence[int] = (1, 5, 10), batch_size: int = 64, progress: bool = False,
                               chunk_size: int = 1024, logit_scale: Optional[float] = None) -> dict[str, float]:
    """Recalls of the top ``k`` candidates of every query (by embedding similarity) re-sorted two ways:

    - ``itm_reranked_image_retrieval_recall@k`` / ``itm_reranked_text_retrieval_recall@k``: by the ITM
      match probability alone (ALBEF's evaluation);
    - ``itm_itc_reranked_*``: by :func:`combined_scores`, the ITM probability times the contrastive
      softmax (``logit_scale`` defaults to the model's).

    Ranks follow :func:`~vlpretrain.evaluation.retrieval.retrieval_ranks` (ties count against the
    positive). A query whose positive is not among its top ``k`` keeps its rank, so only the other
    queries are scored, and re-ranking one candidate (``k=1``) changes nothing.

    Example:
        >>> reranked_retrieval_metrics(model, images, captions, img_f, txt_f, text_to_image, k=16)
    """
    from .retrieval import retrieval_ranks

    scale = model_logit_scale(model) if logit_scale is None else float(logit_scale)
    image_features, text_features = image_features.float(), text_features.float()
    text_to_image = text_to_image.long().cpu()
    text_ranks, image_ranks = retrieval_ranks(image_features, text_features, text_to_image, chunk_size)
    num_images, num_texts = image_features.shape[0], text_features.shape[0]
    reranked = {name: (text_ranks.clone(), image_ranks.clone()) for name in RERANK_SCORES}

    def rerank(ranks_of: int, queries: torch.Tensor, query_features: torch.Tensor, key_features: torch.Tensor,
               candidates: torch.Tensor, scores: torch.Tensor, is_positive: torch.Tensor) -> None:
        similarity = (query_features[:, None, :] * key_features[candidates]).sum(-1).cpu()
        for name, values in (("itm", scores), ("itm+itc", combined_scores(scores, similarity, scale))):
            best = values.masked_fill(~is_positive, float("-inf")).max(1).values
            _set_ranks(reranked[name][ranks_of], queries, ((values >= best[:, None]) & ~is_positive).sum(1),
                       is_positive)

    # Text queries (image retrieval): the positive is the caption's image.
    k_images = min(k, num_images)
    found = torch.nonzero(text_ranks < k_images).flatten()
    if len(found):
        candidates = _top_k(text_features[found], image_features, k_images, chunk_size).cpu()
        pairs = torch.stack([candidates.reshape(-1), found[:, None].expand_as(candidates).reshape(-1)], 1)
        scores = itm_pair_scores(model, images, texts, pairs, batch_size, progress).view_as(candidates)
        rerank(0, found, text_features[found].cpu(), image_features.cpu(), candidates, scores,
               candidates == text_to_image[found][:, None])

    # Image queries (text retrieval): positives are any of the image's captions.
    k_texts = min(k, num_texts)
    found = torch.nonzero(image_ranks < k_texts).flatten()
    if len(found):
        candidates = _top_k(image_features[found], text_features, k_texts, chunk_size).cpu()
        pairs = torch.stack([found[:, None].expand_as(candidates).reshape(-1), candidates.reshape(-1)], 1)
        scores = itm_pair_scores(model, images, texts, pairs, batch_size, progress).view_as(candidates)
        rerank(1, found, image_features[found].cpu(), text_features.cpu(), candidates, scores,
               text_to_image[candidates] == found[:, None])

    metrics: dict[str, float] = {}
    for name, prefix in (("itm", "itm_reranked_"), ("itm+itc", "itm_itc_reranked_")):
        text_query_ranks, image_query_ranks = reranked[name]
        for cutoff in ks:
            metrics[f"{prefix}image_retrieval_recall@{cutoff}"] = (text_query_ranks < cutoff).float().mean().item()
        for cutoff in ks:
            metrics[f"{prefix}text_retrieval_recall@{cutoff}"] = (image_query_ranks < cutoff).float().mean().item()
    return metrics


def _set_ranks(ranks: torch.Tensor, queries: torch.Tensor, reranked: torch.Tensor, is_positive: torch.Tensor) -> None:
    # A positive missing from the candidates (a near-tie rounded differently by the chunked top-k)
    # keeps its embedding rank.
    has = is_positive.any(1)
    ranks[queries[has]] = reranked[has]


def corpus_image_loader(corpus, transform) -> Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]]:
    """A loader for :func:`itm_pair_scores`: rows of ``corpus`` as preprocessed images (undecodable ones
    as zeros, flagged in ``ok``)."""
    from .features import _EvalImages, _collate

    dataset = _EvalImages(corpus, transform)

    def load(indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        images, ok = _collate([dataset[i] for i in indices])
        if images is None:  # nothing decodable: any image size will do, every pair scores BAD_IMAGE_SCORE
            size = _image_size(transform)
            images = torch.zeros(len(indices), 3, size, size)
        return images, ok

    return load


def _image_size(transform, default: int = 224) -> int:
    for step in getattr(transform, "transforms", []):
        size = getattr(step, "size", None)
        if isinstance(size, int):
            return size
        if isinstance(size, (tuple, list)) and size:
            return int(size[0])
    return default


__all__ = ["itm_rerank", "itm_pair_scores", "reranked_retrieval_metrics", "combined_scores", "model_logit_scale",
           "RERANK_SCORES", "corpus_image_loader", "BAD_IMAGE_SCORE"]
