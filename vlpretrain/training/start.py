"""The model a run starts from: a fresh one built from the recipe, or, with ``model.init_from``, an
existing model (a checkpoint folder of ours, ``hf:...``, ``open_clip:ARCH@file``) to fine-tune."""

from __future__ import annotations

import logging

from ..config import ModelConfig
from ..models import DualEncoder, build_model, load_model
from ..data.transforms import build_transforms
from ..models.factory import apply_locks, image_settings

logger = logging.getLogger(__name__)


def build_start_model(cfg: ModelConfig, augmentation: dict | None = None) -> DualEncoder:
    """The recipe's model. With ``cfg.init_from`` the architecture and weights come from that model;
    this recipe's lock settings and ``data.augmentation`` apply on top.

    Example:
        >>> from vlpretrain.config import ModelConfig
        >>> model = build_start_model(ModelConfig(init_from="runs/lit-minilm-emoji/final", lock_text=True))
    """
    if not cfg.init_from:
        return build_model(cfg, augmentation=augmentation)
    model = load_model(cfg.init_from)
    if cfg.fusion and getattr(model, "fusion", None) is None:
        raise ValueError(f"model.fusion: model.init_from={cfg.init_from} has no fusion heads, and they cannot be "
                         f"added to a trained model; remove model.fusion or start from a model trained with them")
    if augmentation and "vision_cfg" in model.open_clip_config:
        settings = image_settings(model.open_clip_config, model.model_config)
        model.preprocess_train, _ = build_transforms(settings, augmentation)
    # The source's own locks were for its own training; this recipe decides what trains now.
    for param in model.parameters():
        param.requires_grad_(True)
    model.text_cache = None
    apply_locks(model, cfg)
    logger.info("starting from %s", cfg.init_from)
    return model
