"""Symmetric InfoNCE (the CLIP loss) over the global batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import all_gather_with_grad, get_rank


class ContrastiveLoss(nn.Module):
    """CLIP's symmetric cross-entropy over image-text similarities, with negatives from every rank.

    Each rank scores its own B images against all W*B gathered texts (and its B texts against all
    images); the positive of local row i is global column ``rank * B + i``. The gather keeps
    gradients, so with the data-parallel mean over ranks the gradient equals one process computing
    the loss on the concatenated batch.

    Example:
        >>> loss_fn = ContrastiveLoss()
        >>> out = model(images, tokens)          # image_features, text_features, logit_scale
        >>> loss_fn(**out)["contrastive_loss"].backward()
    """

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits_per_image, logits_per_text, labels)``: local rows against the gathered global batch,
        and the global column of each local row's positive (ALBEF's loss appends queue columns to these)."""
        batch = image_features.shape[0]
        all_image = all_gather_with_grad(image_features)
        all_text = all_gather_with_grad(text_features)
        logits_per_image = logit_scale * image_features @ all_text.T
        logits_per_text = logit_scale * text_features @ all_image.T
        labels = torch.arange(batch, device=image_features.device) + get_rank() * batch
        return logits_per_image, logits_per_text, labels

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor, **_: torch.Tensor) -> dict[str, torch.Tensor]:
        logits_per_image, logits_per_text, labels = self.logits(image_features, text_features, logit_scale)
        loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
        return {"contrastive_loss": loss}


