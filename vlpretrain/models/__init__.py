"""Dual encoders built on open_clip towers (open_clip ViT / ResNet, timm, Hugging Face text)."""

from .dual_encoder import DualEncoder
from .factory import build_model, load_checkpoint_dir, load_model

__all__ = ["DualEncoder", "build_model", "load_model", "load_checkpoint_dir"]
