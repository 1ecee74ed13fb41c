"""Evaluation: zero-shot classification, linear probe, k-NN, retrieval metrics, suites."""

from .classification_metrics import classification_metrics
from .retrieval import retrieval_metrics
from .templates import TEMPLATE_SETS, load_templates
from .zeroshot import ZeroShotClassifier

__all__ = ["ZeroShotClassifier", "TEMPLATE_SETS", "load_templates", "classification_metrics", "retrieval_metrics"]
