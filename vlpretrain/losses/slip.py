"""SLIP (Mu et al. 2022): the CLIP loss plus a SimCLR term, NT-Xent between two augmented views of each
image, both through the image tower.

SLIP's own code (``SIMCLRLoss``) is followed for the NT-Xent term: each view's row scores against every
gathered row of the other view (its positive: the same image) and of its own view (the row itself masked
out), at a fixed temperature. Two choices differ from the paper, said here so they are not a surprise:
the term is taken on the model's normalized image embedding (SLIP adds a 3-layer MLP head for it), so
the model gains no parameters and a SLIP checkpoint loads like any other; and the first view is the CLIP
input itself (drawn from the same training transform), so each step encodes 2 x B images, not 3 x B.

Example:
    >>> loss_fn = create_loss("slip", ssl_weight=1.0, ssl_temperature=0.1)
    >>> out = model(torch.cat([images, views]), tokens)     # 2B image rows, B text rows
    >>> terms = loss_fn(image_features=out["image_features"][:B], text_features=out["text_features"],
    ...                 logit_scale=out["logit_scale"], image_view_features=out["image_features"][B:])
    >>> sorted(terms)
    ['contrastive_loss', 'ssl_loss']
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import all_gather_with_grad, get_rank
from .contrastive import ContrastiveLoss


def nt_xent(view_a: torch.Tensor, view_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent over the global batch: local rows of ``view_a`` / ``view_b`` (B, D), normalized,
    against the rows of both views gathered from every process (with gradient). Mean over local rows.

    Example:
        >>> nt_xent(F.normalize(torch.randn(4, 8), dim=1), F.normalize(torch.randn(4, 8), dim=1), 0.1)
    """
    batch = view_a.shape[0]
    all_a, all_b = all_gather_with_grad(view_a), all_gather_with_grad(view_b)
    labels = torch.arange(batch, device=view_a.device) + get_rank() * batch
    # A row never counts itself as a negative: its own column in its own view is masked out.
    self_mask = F.one_hot(labels, all_a.shape[0]).to(view_a.dtype) * 1e9
    logits_aa = view_a @ all_a.T / temperature - self_mask
    logits_bb = view_b @ all_b.T / temperature - self_mask
    logits_ab = view_a @ all_b.T / temperature
    logits_ba = view_b @ all_a.T / temperature
    loss_a = F.cross_entropy(torch.cat([logits_ab, logits_aa], dim=1), labels)
    loss_b = F.cross_entropy(torch.cat([logits_ba, logits_bb], dim=1), labels)
    return (loss_a + loss_b) / 2


class SlipLoss(nn.Module):
    """``contrastive_loss`` (CLIP's, :class:`ContrastiveLoss`) + ``ssl_loss`` (``ssl_weight`` x NT-Xent between
    ``image_features`` and ``image_view_features``, a second augmented view of the same images, at
    ``ssl_temperature``).

    Example:
        >>> SlipLoss(ssl_weight=1.0)(image_features=a, text_features=t, logit_scale=s, image_view_features=b)
    """

    def __init__(self, ssl_weight: float = 1.0, ssl_temperature: float = 0.1):
        super().__init__()
        if ssl_temperature <= 0:
            raise ValueError(f"loss.ssl_temperature must be > 0 (SLIP uses 0.1), got {ssl_temperature}")
        self.ssl_weight, self.ssl_temperature = ssl_weight, ssl_temperature
        self.clip = ContrastiveLoss()

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                image_view_features: Optional[torch.Tensor] = None, **_: torch.Tensor) -> dict[str, torch.Tensor]:
        if image_view_features is None:
            raise ValueError("loss.name=slip needs a second augmented view of each image (image_view_features); "
                             "train with vlp train, whose data path adds it for this loss")
        terms = self.clip(image_features, text_features, logit_scale)
        terms["ssl_loss"] = self.ssl_weight * nt_xent(image_features, image_view_features, self.ssl_temperature)
        return terms
