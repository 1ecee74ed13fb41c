"""Classification metrics from logits, with CLIP_benchmark's names (``acc1``, ``acc5``,
``mean_per_class_recall``), in pure torch.

Example:
    >>> m = classification_metrics(clf.logits(features), labels, clf.classnames)
    >>> m["acc1"], m["mean_per_class_recall"]
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

__all__ = ["classification_metrics"]


@torch.no_grad()
def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, classnames: Sequence[str],
                           confusion_matrix: bool = True) -> dict[str, Any]:
    """Top-1 / top-5 accuracy, per-class and mean per-class recall, and the confusion matrix.

    Args:
        logits: (N, C) scores, higher is more likely (logits or probabilities).
        labels: (N,) true class indices in ``[0, C)``.
        classnames: the C class names, in index order (keys of ``per_class_recall``).
        confusion_matrix: set False to skip the C x C matrix (it is large for, e.g., 21k classes).

    Returns:
        ``acc1``, ``acc5`` (``nan`` when C < 5: top-5 would be trivially 1), ``mean_per_class_recall``
        (the mean of the recall of each class present in ``labels``, i.e. balanced accuracy),
        ``per_class_recall`` ({name: recall, or None for a class with no samples}),
        ``confusion_matrix`` (list of lists; row = true class, column = top-1 prediction),
        ``num_samples``, ``num_classes``.

    Example:
        >>> logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [4.0, 0.0]])
        >>> m = classification_metrics(logits, torch.tensor([0, 1, 1]), ["cat", "dog"])
        >>> m["acc1"], m["per_class_recall"], m["confusion_matrix"]
        (0.6666666666666666, {'cat': 1.0, 'dog': 0.5}, [[1, 0], [1, 1]])
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, C), got shape {tuple(logits.shape)}")
    num_samples, num_classes = logits.shape
    if labels.dim() != 1 or labels.shape[0] != num_samples:
        raise ValueError(f"labels must be (N,) = ({num_samples},), got shape {tuple(labels.shape)}")
    if len(classnames) != num_classes:
        raise ValueError(f"{len(classnames)} classnames for {num_classes} logit columns")
    if num_samples == 0:
        raise ValueError("no samples: logits and labels are empty")
    if labels.is_floating_point():
        raise ValueError(f"labels must be integer class indices, got {labels.dtype}")
    logits = logits.detach().float().cpu()
    labels = labels.detach().long().cpu()
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes}), got values from {labels.min().item()} to {labels.max().item()}")

    # Top-1 is the argmax, as CLIP_benchmark uses for its balanced accuracy; top-5 via topk.
    predictions = logits.argmax(dim=1)
    correct = predictions == labels
    acc1 = correct.double().mean().item()
    acc5 = float("nan")
    if num_classes >= 5:
        top5 = logits.topk(5, dim=1).indices
        acc5 = (top5 == labels[:, None]).any(dim=1).double().mean().item()

    support = torch.bincount(labels, minlength=num_classes)
    hits = torch.bincount(labels[correct], minlength=num_classes)
    present = support > 0
    recall = hits.double() / support.clamp(min=1).double()
    per_class_recall: dict[str, Optional[float]] = {
        name: (recall[i].item() if present[i] else None) for i, name in enumerate(classnames)
    }
    result: dict[str, Any] = {
        "acc1": acc1,
        "acc5": acc5,
        # Absent classes have no defined recall; averaging only present ones matches
        # sklearn's balanced_accuracy_score (what CLIP_benchmark reports).
        "mean_per_class_recall": recall[present].mean().item(),
        "per_class_recall": per_class_recall,
        "num_samples": int(num_samples),
        "num_classes": int(num_classes),
    }
    if confusion_matrix:
        flat = torch.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes)
        result["confusion_matrix"] = flat.reshape(num_classes, num_classes).tolist()
    return result
