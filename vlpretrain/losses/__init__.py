"""Training objectives; every loss returns a dict whose keys end in ``_loss``."""

from __future__ import annotations

import difflib

from torch import nn

from .albef import AlbefLoss
from .contrastive import ContrastiveLoss
from .milnce import MilNceLoss
from .siglip import SigLipLoss
from .slip import SlipLoss

LOSSES = {"contrastive": ContrastiveLoss, "siglip": SigLipLoss, "albef": AlbefLoss, "slip": SlipLoss,
          "milnce": MilNceLoss}


def create_loss(name: str, **kwargs) -> nn.Module:
    """Build a loss by name: ``contrastive`` (CLIP's softmax), ``siglip`` (sigmoid, needs a logit bias) or
    ``albef`` (contrastive + image-text matching + masked language modelling, for models with fusion heads),
    ``slip`` (contrastive + SimCLR's NT-Xent between two views of each image) or ``milnce`` (every caption
    of an image a positive).

    Example:
        >>> loss_fn = create_loss("siglip")
    """
    if name not in LOSSES:
        close = difflib.get_close_matches(name, list(LOSSES), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"unknown loss '{name}'{hint}; available: {sorted(LOSSES)}")
    return LOSSES[name](**kwargs)


__all__ = ["AlbefLoss", "ContrastiveLoss", "MilNceLoss", "SigLipLoss", "SlipLoss", "create_loss", "LOSSES"]
