"""Exact image-text retrieval metrics, computed in chunks so memory stays linear in the corpus.

Metric names follow CLIP_benchmark: ``image_retrieval_recall@k`` (a text query finds its image) and
``text_retrieval_recall@k`` (an image query finds any of its captions).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


@torch.no_grad()
def retrieval_ranks(image_features: torch.Tensor, text_features: torch.Tensor,
                    text_to_image: torch.Tensor, chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based rank of the positive for every text query and every image query.

    ``text_to_image[j]`` is the image index of caption j. A tie with a negative counts against the
    positive, so a collapsed model scores chance, not perfect recall. For an image with several
    captions, the rank is that of its best-placed caption.
    """
    num_images, num_texts = image_features.shape[0], text_features.shape[0]
    if text_to_image.shape[0] != num_texts:
        raise ValueError(f"text_to_image has {text_to_image.shape[0]} entries for {num_texts} texts")
    text_to_image = text_to_image.to(image_features.device).long()
    text_ranks = torch.empty(num_texts, dtype=torch.long)
    for start in range(0, num_texts, chunk_size):
        scores = text_features[start:start + chunk_size] @ image_features.T
        rows = torch.arange(scores.shape[0], device=scores.device)
        positive = scores[rows, text_to_image[start:start + chunk_size]]
        ahead = (scores >= positive[:, None]).sum(1) - 1  # minus the positive itself
        text_ranks[start:start + chunk_size] = ahead.cpu()

    image_ranks = torch.empty(num_images, dtype=torch.long)
    for start in range(0, num_images, chunk_size):
        scores = image_features[start:start + chunk_size] @ text_features.T
        image_ids = torch.arange(start, start + scores.shape[0], device=scores.device)
        is_positive = text_to_image[None, :] == image_ids[:, None]
        has_positive = is_positive.any(1)
        best_positive = scores.masked_fill(~is_positive, float("-inf")).max(1).values
        ahead = ((scores >= best_positive[:, None]) & ~is_positive).sum(1)
        ahead[~has_positive] = num_texts  # an image without captions is never found
        image_ranks[start:start + chunk_size] = ahead.cpu()
    return text_ranks, image_ranks


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor,
                      text_to_image: Optional[torch.Tensor] = None, ks: Sequence[int] = (1, 5, 10),
                      chunk_size: int = 1024) -> dict[str, float]:
    """Recall@k both ways, mean and median rank (1-based), and the chance level of each recall.

    Example:
        >>> m = retrieval_metrics(img, txt, text_to_image=torch.arange(len(img)))
        >>> m["image_retrieval_recall@1"], m["text_retrieval_recall@5"]
    """
    if text_to_image is None:
        if image_features.shape[0] != text_features.shape[0]:
            raise ValueError("without text_to_image, image and text features must pair up row by row")
        text_to_image = torch.arange(image_features.shape[0])
    text_ranks, image_ranks = retrieval_ranks(image_features.float(), text_features.float(), text_to_image, chunk_size)
    num_images, num_texts = image_features.shape[0], text_features.shape[0]
    captions_per_image = num_texts / max(num_images, 1)
    metrics: dict[str, float] = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = (text_ranks < k).float().mean().item()
        metrics[f"text_retrieval_recall@{k}"] = (image_ranks < k).float().mean().item()
    for k in ks:
        metrics[f"chance_image_retrieval_recall@{k}"] = min(1.0, k / num_images)
        metrics[f"chance_text_retrieval_recall@{k}"] = min(1.0, k * captions_per_image / max(num_texts, 1))
    metrics["image_retrieval_mean_rank"] = (text_ranks + 1).float().mean().item()
    metrics["image_retrieval_median_rank"] = (text_ranks + 1).float().median().item()
    metrics["text_retrieval_mean_rank"] = (image_ranks + 1).float().mean().item()
    metrics["text_retrieval_median_rank"] = (image_ranks + 1).float().median().item()
    metrics["num_images"], metrics["num_texts"] = num_images, num_texts
    return metrics
