"""Build models by name: from a recipe, an open_clip architecture, or a saved checkpoint folder."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional, Union

import open_clip
import torch
from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

from ..config import ConfigError, ModelConfig, load_recipe
from .dual_encoder import CONFIG_NAME, WEIGHTS_NAME, DualEncoder
from .towers import build_open_clip_config, uses_custom_text

logger = logging.getLogger(__name__)


def build_tokenizer(open_clip_cfg: dict):
    text_cfg = open_clip_cfg["text_cfg"]
    context_length = text_cfg.get("context_length", 77)
    if "hf_tokenizer_name" in text_cfg:
        return HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=context_length)
    return SimpleTokenizer(context_length=context_length)


def build_transforms(open_clip_cfg: dict, cfg: ModelConfig, augmentation: Optional[dict] = None):
    """(train, eval) image transforms from open_clip, sized by the image tower."""
    image_size = open_clip_cfg["vision_cfg"].get("image_size", 224)
    mean = tuple(cfg.image_mean) if cfg.image_mean else None
    std = tuple(cfg.image_std) if cfg.image_std else None
    aug = dict(augmentation or {})
    for key in ("scale", "ratio"):
        if key in aug and aug[key] is not None:
            aug[key] = tuple(aug[key])
    # Shading and Gaussian blur are not among open_clip's augmentations: applied after the crop, on
    # the PIL image, shading first.
    blur_prob, blur_sigma = float(aug.pop("blur_prob", 0.0) or 0.0), aug.pop("blur_sigma", (0.1, 1.0))
    shade_prob, shade_strength = float(aug.pop("shade_prob", 0.0) or 0.0), aug.pop("shade_strength", (0.2, 0.5))
    train = open_clip.image_transform(image_size, is_train=True, mean=mean, std=std, aug_cfg=aug or None)
    if blur_prob > 0:
        from torchvision import transforms

        blur = transforms.GaussianBlur(kernel_size=5, sigma=tuple(blur_sigma))
        train.transforms.insert(1, transforms.RandomApply([blur], p=blur_prob))
    if shade_prob > 0:
        from ..data.augment import RandomShading

        train.transforms.insert(1, RandomShading(shade_prob, tuple(shade_strength)))
    evaluation = open_clip.image_transform(image_size, is_train=False, mean=mean, std=std)
    return train, evaluation


def build_model(cfg: ModelConfig, augmentation: Optional[dict] = None, load_pretrained: bool = True) -> DualEncoder:
    """Create a :class:`DualEncoder` from a recipe's ``model`` section.

    Example:
        >>> from vlpretrain.config import ModelConfig
        >>> model = build_model(ModelConfig(arch="ViT-B-32", image_tower="timm:resnet18", text_tower="hf:minilm-l6"))
    """
    open_clip_cfg = build_open_clip_config(cfg)
    vision_cfg, text_cfg = dict(open_clip_cfg["vision_cfg"]), dict(open_clip_cfg["text_cfg"])
    if "timm_model_name" in vision_cfg:
        vision_cfg["timm_model_pretrained"] = bool(load_pretrained and cfg.pretrained_image and not cfg.pretrained)
    if "hf_model_name" in text_cfg:
        text_cfg["hf_model_pretrained"] = bool(load_pretrained and cfg.pretrained_text and not cfg.pretrained)
    kwargs = {k: v for k, v in open_clip_cfg.items() if k not in ("vision_cfg", "text_cfg", "custom_text")}
    model_class = open_clip.CustomTextCLIP if uses_custom_text(open_clip_cfg) else open_clip.CLIP
    clip = model_class(vision_cfg=vision_cfg, text_cfg=text_cfg, init_logit_scale=cfg.init_logit_scale, **kwargs)

    if cfg.pretrained and load_pretrained:
        _load_open_clip_weights(clip, cfg)

    train_tf, eval_tf = build_transforms(open_clip_cfg, cfg, augmentation)
    model = DualEncoder(clip, build_tokenizer(open_clip_cfg), eval_tf, train_tf, cfg, open_clip_cfg,
                        max_logit_scale=cfg.max_logit_scale)
    if cfg.lock_image:
        model.lock_image_tower(cfg.lock_image_unlocked_groups, cfg.lock_image_freeze_bn_stats)
    if cfg.lock_text:
        model.lock_text_tower(cfg.lock_text_unlocked_layers, cfg.lock_text_freeze_layer_norm)
        if cfg.cache_locked_text and model.text_transformer_frozen():
            model.enable_text_cache(dropout=cfg.cached_text_dropout)
    return model


def _load_open_clip_weights(clip: torch.nn.Module, cfg: ModelConfig) -> None:
    """Full CLIP weights from an open_clip pretrained tag (downloads when online) or a file."""
    source = cfg.pretrained
    if not Path(source).is_file():
        if not cfg.arch:
            raise ConfigError(f"model.pretrained: '{source}' is not a file, and a pretrained tag needs model.arch")
        tag_cfg = open_clip.get_pretrained_cfg(cfg.arch, source)
        if not tag_cfg:
            tags = open_clip.list_pretrained_tags_by_model(cfg.arch)
            raise ConfigError(f"model.pretrained: '{source}' is neither a file nor a pretrained tag of "
                              f"{cfg.arch} (tags: {tags})")
        source = open_clip.download_pretrained(tag_cfg)
    open_clip.load_checkpoint(clip, source)


def _model_config_from_dict(values: dict) -> ModelConfig:
    from ..config import recipe_from_dict

    return recipe_from_dict({"model": values}).model


def load_checkpoint_dir(directory: Union[str, Path], map_location: str = "cpu") -> DualEncoder:
    """Load a folder written by ``DualEncoder.save_pretrained`` or by the trainer."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    weights_path = directory / WEIGHTS_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory}: not a vlpretrain checkpoint (no {CONFIG_NAME})")
    if not weights_path.is_file():
        raise FileNotFoundError(f"{directory}: checkpoint has no {WEIGHTS_NAME}")
    try:
        values = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}: not valid JSON ({e})") from None
    cfg = _model_config_from_dict(values["model"])
    model = build_model(cfg, load_pretrained=False)
    try:
        state = load_file(str(weights_path), device=map_location)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights_path}: unreadable or truncated weights file ({e})") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights_path}: weights do not match the model in {CONFIG_NAME} "
                         f"(missing {missing[:3]}..., unexpected {unexpected[:3]}...)")
    return model


def load_model(spec: Union[str, Path, ModelConfig]) -> DualEncoder:
    """One entry point for every model source.

    - a checkpoint folder of ours (``runs/demo/final``),
    - a recipe YAML (its ``model`` section, freshly initialised),
    - ``open_clip:ARCH`` (random init) or ``open_clip:ARCH/TAG`` (open_clip pretrained weights,
      downloaded when online), ``open_clip:ARCH@path/to/weights.pt``,
    - a :class:`ModelConfig`.

    Example:
        >>> model = load_model("runs/demo-emoji/final")
        >>> model.encode_text(model.tokenizer(["a cat"])).shape
        torch.Size([1, 256])
    """
    if isinstance(spec, ModelConfig):
        return build_model(spec)
    text = str(spec)
    if text.startswith("open_clip:"):
        name = text[len("open_clip:"):]
        arch, pretrained = name, None
        if "@" in name:
            arch, pretrained = name.split("@", 1)
        elif "/" in name:
            arch, pretrained = name.split("/", 1)
        return build_model(ModelConfig(arch=arch, pretrained=pretrained))
    path = Path(text)
    if path.is_dir():
        return load_checkpoint_dir(path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return build_model(load_recipe(path).model)
    raise ValueError(f"cannot load model '{text}': expected a checkpoint folder (with {CONFIG_NAME}), "
                     f"a recipe .yaml, or open_clip:ARCH[/TAG]")
