"""Training objectives; every loss returns a dict whose keys end in ``_loss``."""

from __future__ import annotations

import difflib

from torch import nn

from .albef import AlbefLoss
from .contrastive import ContrastiveLoss
from .siglip import SigLipLoss

LOSSES = {"contrastive": ContrastiveLoss, "siglip": SigLipLoss, "albef": AlbefLoss}


def create_loss(name: str, **kwargs) -> nn.Module:
    """Build a loss by name: ``contrastive`` (CLIP's softmax), ``siglip`` (sigmoid, needs a logit bias) or
    ``albef`` (contrastive + image-text matching + masked language modelling, for models with fusion heads).

    Example:
        >>> loss_fn = create_loss("siglip")
    """
    if name not in LOSSES:
        close = difflib.get_close_matches(name, list(LOSSES), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"unknown loss '{name}'{hint}; available: {sorted(LOSSES)}")
    return LOSSES[name](**kwargs)


__all__ = ["AlbefLoss", "ContrastiveLoss", "SigLipLoss", "create_loss", "LOSSES"]
