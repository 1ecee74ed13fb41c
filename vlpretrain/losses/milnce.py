"""MIL-NCE (Miech et al. 2020): every caption of an image is a positive.

For image i with captions P(i), over the global batch (every process's images and captions)::

    loss_i = -log( sum_{t in P(i)} e^{s(i, t)} / ( sum_{all t} e^{s(i, t)} + sum_{j != i, t in P(i)} e^{s(j, t)} ) )

where ``s`` is the logit scale times the cosine similarity: the negatives are image i against every
other caption and every other image against i's captions, as in the paper's sampling of negative pairs
around each positive bag. The loss is the mean over images. Processes may hold different numbers of
captions: they are padded to the longest before the (differentiable) all-gather and dropped after it.

Example:
    >>> loss_fn = create_loss("milnce")
    >>> out = model(images, tokens)                  # B images, T >= B captions
    >>> loss_fn(**out, text_image_index=batch["text_image_index"])["contrastive_loss"].backward()
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..distributed import all_gather_no_grad, all_gather_with_grad, get_rank, get_world_size


def gather_captions(text_features: torch.Tensor, text_image_index: torch.Tensor, batch: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every process's caption features (with gradient) and, for each, its image's global row
    (``rank * batch + local row``); processes may hold different numbers of captions.

    Example: ``all_text, owner = gather_captions(text_features, text_image_index, images.shape[0])``
    """
    owner = text_image_index.to(text_features.device).long() + get_rank() * batch
    if get_world_size() == 1:
        return text_features, owner
    counts = all_gather_no_grad(torch.tensor([text_features.shape[0]], device=text_features.device))
    longest = int(counts.max())
    pad = longest - text_features.shape[0]
    padded = torch.cat([text_features, text_features.new_zeros(pad, text_features.shape[1])])
    padded_owner = torch.cat([owner, owner.new_full((pad,), -1)])
    all_text, all_owner = all_gather_with_grad(padded), all_gather_no_grad(padded_owner)
    keep = all_owner >= 0
    return all_text[keep], all_owner[keep]


class MilNceLoss(nn.Module):
    """MIL-NCE over the global batch as ``contrastive_loss``; ``text_image_index`` (T,) gives each local
    caption's local image row (the collate's ``text_image_index``; without it, caption i belongs to image i).

    Example:
        >>> MilNceLoss()(image_features=img, text_features=txt, logit_scale=s, text_image_index=owner)
    """

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                text_image_index: Optional[torch.Tensor] = None, **_: torch.Tensor) -> dict[str, torch.Tensor]:
        batch = image_features.shape[0]
        if text_image_index is None:
            text_image_index = torch.arange(text_features.shape[0], device=text_features.device)
        local_owner = text_image_index.to(image_features.device).long()
        all_text, all_owner = gather_captions(text_features, local_owner, batch)
        all_image = all_gather_with_grad(image_features)
        rows = torch.arange(batch, device=image_features.device) + get_rank() * batch

        image_to_text = logit_scale * image_features @ all_text.T  # (B, T_all)
        positive = all_owner[None, :] == rows[:, None]
        numerator = image_to_text.masked_fill(~positive, float("-inf")).logsumexp(dim=1)
        if all_image.shape[0] == 1:
            # One image in the global batch: no other images, so no such term (a logsumexp over nothing but
            # -inf would give NaN gradients). Every process sees the same global size.
            return {"contrastive_loss": (image_to_text.logsumexp(dim=1) - numerator).mean()}
        # Other images against each local caption (its own image's column masked out), pooled per image.
        text_to_image = logit_scale * text_features @ all_image.T  # (T, W*B)
        own = torch.nn.functional.one_hot(local_owner + get_rank() * batch, all_image.shape[0]).bool()
        per_caption = text_to_image.masked_fill(own, float("-inf")).logsumexp(dim=1)  # (T,)
        other_images = _logsumexp_by_group(per_caption, local_owner, batch)
        denominator = torch.logaddexp(image_to_text.logsumexp(dim=1), other_images)
        return {"contrastive_loss": (denominator - numerator).mean()}


def _logsumexp_by_group(values: torch.Tensor, group: torch.Tensor, groups: int) -> torch.Tensor:
    """``out[g] = logsumexp(values[group == g])`` (-inf for an empty group), without a (groups, T) matrix."""
    peak = torch.full((groups,), float("-inf"), device=values.device, dtype=values.dtype)
    peak = peak.scatter_reduce(0, group, values.detach(), reduce="amax")
    safe_peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = torch.zeros(groups, device=values.device, dtype=values.dtype).index_add(
        0, group, torch.exp(values - safe_peak[group]))
    return safe_peak + torch.log(total)
