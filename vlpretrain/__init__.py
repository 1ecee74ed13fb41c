"""vlpretrain: CLIP-style vision-language pretraining on open_clip, timm and Hugging Face towers.

Example:
    >>> import vlpretrain
    >>> model = vlpretrain.load_model("runs/demo-emoji/final")
    >>> text = model.encode_text(model.tokenizer(["grinning face", "red heart"]))
"""

from .config import ConfigError, RecipeConfig, load_recipe
from .evaluation.zeroshot import ZeroShotClassifier
from .losses import ContrastiveLoss, create_loss
from .models import DualEncoder, build_model, load_model
from .retrieval import EmbeddingSet, RetrievalIndex, export_embeddings

__version__ = "0.1.0"

__all__ = ["ZeroShotClassifier", "RetrievalIndex", "EmbeddingSet", "export_embeddings", "load_model", "build_model", "DualEncoder", "ContrastiveLoss", "create_loss", "load_recipe",
           "RecipeConfig", "ConfigError", "__version__"]
