"""Weighted k-nearest-neighbour classification on precomputed features (DINO-style), in pure torch.

Each test point votes with its ``k`` most cosine-similar training points, each weighted by
``exp(sim / T)``; the votes are summed per class. Test points are processed in chunks, so memory is
``chunk_size x N_train`` rather than ``N_test x N_train``.

Example:
    >>> scores = knn_classify(train_feats, train_labels, test_feats, num_classes=10, k=20)
    >>> accuracy = (scores.argmax(1) == test_labels).float().mean().item()
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 num_classes: int, k: int = 20, temperature: float = 0.07,
                 chunk_size: int = 1024) -> torch.Tensor:
    """Class scores ``(N_test, num_classes)`` from weighted k-NN over cosine similarity.

    Features are L2-normalized here, so raw embeddings can be passed. ``k`` larger than the training
    set is clamped to its size. Scores are on ``test_features``' device, in float32, or float64 when
    the features are float64 (half-precision inputs are upcast: exp(sim / T) overflows float16).

    Example:
        >>> scores = knn_classify(tr_x, tr_y, te_x, num_classes=5, k=10, chunk_size=256)
        >>> preds = scores.argmax(1)
    """
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    num_train = train_features.shape[0]
    if num_train == 0:
        raise ValueError("knn_classify needs at least one training example")
    if train_labels.shape[0] != num_train:
        raise ValueError(f"{num_train} train features but {train_labels.shape[0]} train labels")
    device = test_features.device
    dtype = torch.promote_types(torch.promote_types(train_features.dtype, test_features.dtype), torch.float32)
    train = F.normalize(train_features.to(device, dtype), dim=-1)
    labels = train_labels.long().to(device)
    k = min(k, num_train)

    scores = torch.zeros(test_features.shape[0], num_classes, device=device, dtype=dtype)
    for start in range(0, test_features.shape[0], chunk_size):
        query = F.normalize(test_features[start:start + chunk_size].to(dtype), dim=-1)
        sims, idx = (query @ train.T).topk(k, dim=1)
        # exp(sim / T): sharper T trusts the closest neighbours more. sim <= 1, so with T >= ~0.012
        # this cannot overflow float32; no max-subtraction, so scores stay comparable across rows.
        weights = (sims / temperature).exp()
        scores[start:start + query.shape[0]].scatter_add_(1, labels[idx], weights)
    return scores
