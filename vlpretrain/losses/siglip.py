"""The sigmoid loss of SigLIP: every image-text pair is its own binary classification."""

from __future__ import annotations

from typing import Optional

import torch
from open_clip.loss import SigLipLoss as _OpenClipSigLipLoss
from torch import nn

from ..distributed import get_rank, get_world_size


class SigLipLoss(nn.Module):
    """open_clip's ``SigLipLoss`` (negatives from other ranks passed around the ring) in this toolkit's
    loss interface: keyword features in, ``{"contrastive_loss": ...}`` out.

    It needs the model's learnable ``logit_bias`` (SigLIP models have one; ``DualEncoder.forward``
    returns it), since without the bias the sigmoid loss starts far off balance.

    Example:
        >>> loss_fn = SigLipLoss()
        >>> out = model(images, tokens)   # image_features, text_features, logit_scale, logit_bias
        >>> loss_fn(**out)["contrastive_loss"].backward()
    """

    def __init__(self):
        super().__init__()
        self._loss: Optional[_OpenClipSigLipLoss] = None

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: Optional[torch.Tensor] = None, **_: torch.Tensor) -> dict[str, torch.Tensor]:
        if logit_bias is None:
            raise ValueError("loss.name=siglip needs a model with a learnable logit_bias: a SigLIP model "
                             "(model.hf_model=google/siglip-base-patch16-224, or an open_clip *-SigLIP arch)")
        rank, world = get_rank(), get_world_size()
        # Built on first use: the process group exists only once Accelerate has started.
        if self._loss is None or (self._loss.rank, self._loss.world_size) != (rank, world):
            self._loss = _OpenClipSigLipLoss(rank=rank, world_size=world)
        return {"contrastive_loss": self._loss(image_features, text_features, logit_scale, logit_bias)}
