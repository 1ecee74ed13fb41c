"""What an objective needs from a batch beyond one image and one caption per pair, and the forward pass
that feeds it: SLIP a second augmented view of each image (``image_view``), MIL-NCE every caption of
each image (``text_image_index`` names each caption's image).

Example:
    >>> dataset_options("milnce")
    {'caption_choice': 'all', 'image_view': False}
    >>> out = forward_batch(model, batch)      # + image_view_features / text_image_index when present
"""

from __future__ import annotations

import torch

# loss.name -> what its batches carry
NEEDS_IMAGE_VIEW = ("slip",)
NEEDS_ALL_CAPTIONS = ("milnce",)


def dataset_options(loss_name: str) -> dict:
    """The training dataset's ``caption_choice`` and ``image_view`` settings for ``loss.name``.

    Example:
        >>> dataset_options("contrastive")
        {'caption_choice': 'random', 'image_view': False}
    """
    return {"caption_choice": "all" if loss_name in NEEDS_ALL_CAPTIONS else "random",
            "image_view": loss_name in NEEDS_IMAGE_VIEW}


def forward_batch(model: torch.nn.Module, batch: dict) -> dict:
    """The model's output on ``batch``. A batch with ``image_view`` (B more images) encodes both views in one
    forward (one pass through a DDP / FSDP wrapper) and splits them into ``image_features`` and
    ``image_view_features``; a batch with ``text_image_index`` passes it on to the loss.

    Example: ``losses = loss_fn(**forward_batch(run.model, batch))``
    """
    images, view = batch["image"], batch.get("image_view")
    if view is not None:
        images = torch.cat([images, view])
    out = model(images, batch["tokens"], image_ids=batch["index"])
    if view is not None:
        count = batch["image"].shape[0]
        out["image_view_features"] = out["image_features"][count:]
        out["image_features"] = out["image_features"][:count]
    if "text_image_index" in batch:
        out["text_image_index"] = batch["text_image_index"]
    return out
