"""The dual image/text encoder: an open_clip model plus its tokenizer and transforms.

Its interface is the one CLIP_benchmark expects (``encode_image``, ``encode_text``, ``tokenizer``,
``preprocess``), so any checkpoint of ours can be evaluated there too.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

CONFIG_NAME = "vlp_config.json"
WEIGHTS_NAME = "model.safetensors"
# Beside the weights of a transformers CLIP / SigLIP model: its config, tokenizer and processor files.
HF_SUPPORT_DIR = "hf"


class DualEncoder(nn.Module):
    """Image and text towers projecting into one embedding space, with a learnable logit scale.

    Example:
        >>> model = vlpretrain.load_model("recipes/demo-emoji.yaml")
        >>> tokens = model.tokenizer(["a smiling face", "a red heart"])
        >>> text = model.encode_text(tokens)                       # (2, embed_dim), unit norm
        >>> image = model.encode_image(model.preprocess(pil_image)[None])
        >>> (100 * image @ text.T).softmax(-1)
    """

    def __init__(
        self,
        clip: nn.Module,
        tokenizer: Callable[[list[str]], torch.Tensor],
        preprocess: Callable,
        preprocess_train: Callable,
        model_config: Any,
        open_clip_config: dict,
        max_logit_scale: float = math.log(100),
    ):
        super().__init__()
        self.clip = clip
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.preprocess_train = preprocess_train
        self.model_config = model_config
        self.open_clip_config = open_clip_config
        self.max_logit_scale = max_logit_scale
        self.text_cache = None
        self.cached_text_dropout = 0.0

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    @property
    def embed_dim(self) -> int:
        return int(self.open_clip_config["embed_dim"])

    @property
    def context_length(self) -> int:
        return int(getattr(self.tokenizer, "context_length", None) or self.open_clip_config["text_cfg"].get("context_length", 77))

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, 3, H, W) preprocessed images -> (B, embed_dim) features, unit norm by default."""
        return self.clip.encode_image(images, normalize=normalize)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, context_length) token ids from ``self.tokenizer`` -> (B, embed_dim) features."""
        if self.text_cache is not None and self.text_transformer_frozen():
            features = self._encode_text_cached(tokens)
            return nn.functional.normalize(features, dim=-1) if normalize else features
        return self.clip.encode_text(tokens, normalize=normalize)

    def text_transformer_frozen(self) -> bool:
        """True when the text tower's transformer is fully locked (its output is a constant)."""
        text = getattr(self.clip, "text", None)
        if text is None or not hasattr(text, "transformer") or not hasattr(text, "proj"):
            return False
        return not any(p.requires_grad for p in text.transformer.parameters())

    def _encode_text_cached(self, tokens: torch.Tensor) -> torch.Tensor:
        from .text_cache import hf_frozen_output

        text = self.clip.text
        pooled = self.text_cache.lookup(tokens, hf_frozen_output(text))
        if self.training and self.cached_text_dropout > 0:
            # The cached features come from the tower in eval mode; dropout on them stands in for the
            # tower's own dropout, which regularises the trainable head (better zero-shot transfer).
            pooled = nn.functional.dropout(pooled, self.cached_text_dropout, training=True)
        return text.proj(pooled)

    def enable_text_cache(self, max_entries: int = 1_000_000, dropout: float = 0.0) -> None:
        """Cache the locked text transformer's output per caption (see ``text_cache.py``); in
        training, ``dropout`` is applied to the cached features."""
        from .text_cache import LockedTextCache

        self.text_cache = LockedTextCache(max_entries)
        self.cached_text_dropout = dropout

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalized features of both towers, the (exponentiated) logit scale and, for sigmoid-loss
        models (SigLIP), the logit bias: ready for a loss."""
        out = {
            "image_features": self.encode_image(images, normalize=True),
            "text_features": self.encode_text(tokens, normalize=True),
            "logit_scale": self.clip.logit_scale.exp(),
        }
        logit_bias = getattr(self.clip, "logit_bias", None)
        if logit_bias is not None:
            out["logit_bias"] = logit_bias
        return out

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Keep the temperature in [1/100, 1] as CLIP does, after every optimizer step."""
        self.clip.logit_scale.clamp_(0, self.max_logit_scale)

    def lock_image_tower(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        """LiT: freeze the image tower, leaving its last ``unlocked_groups`` layer groups trainable."""
        self.clip.lock_image_tower(unlocked_groups=unlocked_groups, freeze_bn_stats=freeze_bn_stats)

    def lock_text_tower(self, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> None:
        """LiT: freeze the text tower, leaving its last ``unlocked_layers`` layers trainable."""
        text = getattr(self.clip, "text", None)
        if unlocked_layers and text is not None and hasattr(text, "transformer") and hasattr(text, "proj"):
            # open_clip's partial unlock of Hugging Face towers looks up a layer attribute its own
            # table lacks for BERT; the layer list is found here from the module tree instead.
            _lock_hf_transformer(text.transformer, unlocked_layers, freeze_layer_norm)
            return
        self.clip.lock_text_tower(unlocked_layers=unlocked_layers, freeze_layer_norm=freeze_layer_norm)

    def config_dict(self) -> dict:
        cfg = self.model_config
        values = {
            "model": dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg),
            "open_clip_model_cfg": self.open_clip_config,
            "format": "vlpretrain-dual-encoder-v1",
        }
        hf_model = getattr(self.clip, "hf_model", None)
        if hf_model is not None:
            # A transformers model rebuilds from its own config, so any checkpoint (trainer steps too) loads.
            values["hf_config"] = hf_model.config.to_dict()
        return values

    def save_pretrained(self, directory: Union[str, Path]) -> Path:
        """Write ``vlp_config.json`` + ``model.safetensors`` atomically: a crash leaves the old folder."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            write_model_files(self, tmp)
            replace_directory(tmp, directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return directory


def _lock_hf_transformer(transformer: nn.Module, unlocked_layers: int, freeze_layer_norm: bool) -> None:
    """Freeze a Hugging Face encoder except its last ``unlocked_layers`` blocks."""
    layers = max((m for m in transformer.modules() if isinstance(m, nn.ModuleList)), key=len, default=None)
    if layers is None or not len(layers):
        raise ValueError(f"cannot find the layer list of {type(transformer).__name__} to unlock its last layers")
    if unlocked_layers > len(layers):
        raise ValueError(f"model.lock_text_unlocked_layers={unlocked_layers}, but the text tower has {len(layers)} layers")
    trainable = {id(p) for layer in list(layers)[len(layers) - unlocked_layers:] for p in layer.parameters()}
    for name, param in transformer.named_parameters():
        is_norm = "LayerNorm" in name.split(".") or "layer_norm" in name or "layernorm" in name
        param.requires_grad = id(param) in trainable or (is_norm and not freeze_layer_norm)


def write_model_files(model: DualEncoder, directory: Path, state_dict: Optional[dict] = None) -> None:
    from safetensors.torch import save_file

    state = state_dict if state_dict is not None else model.state_dict()
    # safetensors refuses shared storage; clone makes every tensor its own.
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(model.config_dict(), indent=2))
    save_support_files = getattr(model.clip, "save_support_files", None)
    if save_support_files is not None:
        save_support_files(directory / HF_SUPPORT_DIR)


def replace_directory(src: Path, dst: Path) -> None:
    """Move ``src`` into place as ``dst``; an existing ``dst`` is swapped out, then removed."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
