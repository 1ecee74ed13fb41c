"""Classification metrics against a naive Python reference and scikit-learn."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, confusion_matrix

from vlpretrain.evaluation.classification_metrics import classification_metrics


def _naive(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    rows, y = logits.tolist(), labels.tolist()
    num_classes = len(rows[0])
    top1 = [max(range(num_classes), key=lambda c: (row[c], -c)) for row in rows]
    top5 = [sorted(range(num_classes), key=lambda c: -row[c])[:5] for row in rows]
    recalls = []
    for c in range(num_classes):
        members = [i for i, t in enumerate(y) if t == c]
        if members:
            recalls.append(sum(top1[i] == c for i in members) / len(members))
    return {
        "acc1": sum(p == t for p, t in zip(top1, y)) / len(y),
        "acc5": sum(t in p for p, t in zip(top5, y)) / len(y),
        "mean_per_class_recall": sum(recalls) / len(recalls),
        "top1": top1,
    }


@pytest.mark.parametrize("seed, num_samples, num_classes", [(0, 50, 10), (1, 200, 7), (2, 13, 30)])
def test_matches_naive_reference_and_sklearn(seed, num_samples, num_classes):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (num_samples,), generator=g)
    # Noisy logits that favour the true class, so accuracies are neither 0 nor 1.
    logits = torch.randn(num_samples, num_classes, generator=g)
    logits[torch.arange(num_samples), labels] += 1.0
    names = [f"class{c}" for c in range(num_classes)]
    m = classification_metrics(logits, labels, names)
    ref = _naive(logits, labels)
    assert m["acc1"] == pytest.approx(ref["acc1"])
    assert m["acc5"] == pytest.approx(ref["acc5"])
    assert m["mean_per_class_recall"] == pytest.approx(ref["mean_per_class_recall"])
    assert 0 < m["acc1"] < 1

    predictions = logits.argmax(1).numpy()
    assert predictions.tolist() == ref["top1"]
    with warnings.catch_warnings():
        # With 30 classes and 13 samples some predicted classes are absent from the labels; sklearn
        # warns, then averages over the classes present, as we do.
        warnings.simplefilter("ignore", UserWarning)
        balanced = balanced_accuracy_score(labels.numpy(), predictions)
    assert m["mean_per_class_recall"] == pytest.approx(balanced)
    assert m["confusion_matrix"] == confusion_matrix(labels.numpy(), predictions, labels=list(range(num_classes))).tolist()
    assert m["num_samples"] == num_samples and m["num_classes"] == num_classes
    assert set(m["per_class_recall"]) == set(names)


def test_absent_classes_and_small_label_sets():
    # 4 classes: acc5 is undefined (NaN), and class "d" has no samples -> recall None, left out of the mean.
    logits = torch.tensor([[3.0, 1.0, 0.0, 0.0],
                           [0.0, 2.0, 1.0, 0.0],
                           [0.0, 2.0, 1.0, 5.0],
                           [1.0, 0.0, 4.0, 0.0],
                           [0.0, 0.0, 0.0, 1.0]])
    labels = torch.tensor([0, 1, 1, 2, 2])
    m = classification_metrics(logits, labels, ["a", "b", "c", "d"])
    assert math.isnan(m["acc5"])
    assert m["acc1"] == pytest.approx(3 / 5)
    assert m["per_class_recall"] == {"a": 1.0, "b": 0.5, "c": 0.5, "d": None}
    assert m["mean_per_class_recall"] == pytest.approx(2 / 3)
    assert m["confusion_matrix"] == [[1, 0, 0, 0], [0, 1, 0, 1], [0, 0, 1, 1], [0, 0, 0, 0]]
    predictions = logits.argmax(1).numpy()
    with pytest.warns(UserWarning):  # sklearn warns that "d" is predicted but absent from y_true
        expected = balanced_accuracy_score(labels.numpy(), predictions)
    assert m["mean_per_class_recall"] == pytest.approx(expected)
    assert "confusion_matrix" not in classification_metrics(logits, labels, list("abcd"), confusion_matrix=False)


@pytest.mark.parametrize("logits, labels, names, match", [
    (torch.zeros(3), torch.zeros(3, dtype=torch.long), ["a"], "logits must be"),
    (torch.zeros(3, 2), torch.zeros(2, dtype=torch.long), ["a", "b"], "labels must be"),
    (torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), ["a"], "1 classnames for 2"),
    (torch.zeros(2, 2), torch.tensor([0, 2]), ["a", "b"], r"labels must be in \[0, 2\)"),
    (torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), ["a", "b"], "no samples"),
])
def test_errors(logits, labels, names, match):
    with pytest.raises(ValueError, match=match):
        classification_metrics(logits, labels, names)
