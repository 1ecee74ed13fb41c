"""Accelerate-based training: optimizer groups, schedules, checkpoints and the loop."""

from .trainer import TrainResult, train, validate

__all__ = ["train", "validate", "TrainResult"]
