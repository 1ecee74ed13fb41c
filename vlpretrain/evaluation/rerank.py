"""Retrieval recall after re-ranking with a fusion model's image-text matching (ITM) head (ALBEF's k_test).

Embedding similarity picks the top K candidates cheaply; the ITM head, which sees the image and the
caption together, then re-scores just those K (the scoring itself lives in :mod:`vlpretrain.inference`).
:func:`reranked_retrieval_metrics` gives the recalls of the re-ranked lists for
``evaluate_retrieval(..., rerank_itm=K)``.

Example:
    >>> feats = encode_corpus(model, corpus)
    >>> reranked_retrieval_metrics(model, corpus_image_loader(corpus, model.preprocess), feats["captions"],
    ...                            feats["image_features"], feats["text_features"], feats["text_to_image"], k=16)
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..inference import RERANK_SCORES, ImageSource, TextsLike, combined_scores, itm_pair_scores, model_logit_scale


def _top_k(queries: torch.Tensor, keys: torch.Tensor, k: int, chunk_size: int = 1024) -> torch.Tensor:
    return torch.cat([(queries[i:i + chunk_size] @ keys.T).topk(k, dim=1).indices
                      for i in range(0, len(queries), chunk_size)]) if len(queries) else \
        torch.zeros(0, k, dtype=torch.long)


@torch.no_grad()
def reranked_retrieval_metrics(model, images: ImageSource, texts: TextsLike, image_features: torch.Tensor,
                               text_features: torch.Tensor, text_to_image: torch.Tensor, k: int,
                               ks: Sequence[int] = (1, 5, 10), batch_size: int = 64, progress: bool = False,
                               chunk_size: int = 1024, logit_scale: Optional[float] = None) -> dict[str, float]:
    """Recalls of the top ``k`` candidates of every query (by embedding similarity) re-sorted two ways:

    - ``itm_reranked_image_retrieval_recall@k`` / ``itm_reranked_text_retrieval_recall@k``: by the ITM
      match probability alone (ALBEF's evaluation);
    - ``itm_itc_reranked_*``: by :func:`~vlpretrain.inference.combined_scores`, the ITM probability times the contrastive
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


__all__ = ["reranked_retrieval_metrics"]
