"""Accelerate-based training: optimizer groups, schedules, checkpoints and the loop."""

from .trainer import TrainResult, train
from .validation import validate

__all__ = ["train", "validate", "TrainResult"]
