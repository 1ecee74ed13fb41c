"""Build models by name: from a recipe, an open_clip architecture, or a saved checkpoint folder."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Union

import open_clip
import torch
from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

from ..config import ConfigError, ModelConfig, load_recipe
from ..data.transforms import ImageSettings, build_transforms, check_augmentation_keys
from ..io import read_json
from .dual_encoder import CONFIG_NAME, HF_SUPPORT_DIR, MASK_TOKEN, WEIGHTS_NAME, DualEncoder
from .fusion import fusion_settings
from .hf_towers import quiet_unused_pooler
from .towers import build_open_clip_config, uses_custom_text

logger = logging.getLogger(__name__)


def build_tokenizer(open_clip_cfg: dict, mask_token: bool = False):
    """The text tower's tokenizer; ``mask_token`` adds ``<mask>`` to open_clip's SimpleTokenizer (for
    MLM; Hugging Face tokenizers have their own [MASK])."""
    text_cfg = open_clip_cfg["text_cfg"]
    context_length = text_cfg.get("context_length", 77)
    if "hf_tokenizer_name" in text_cfg:
        return HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=context_length)
    if mask_token:
        return SimpleTokenizer(context_length=context_length, additional_special_tokens=[MASK_TOKEN])
    return SimpleTokenizer(context_length=context_length)


def image_settings(open_clip_cfg: dict, cfg: ModelConfig) -> ImageSettings:
    """What the image tower expects, for :func:`vlpretrain.data.transforms.build_transforms`.

    A transformers CLIP / SigLIP model's config carries its processor's settings (``hf_preprocess``:
    mean, std, resize mode and interpolation), used unless the recipe sets image_mean / image_std.

    Example:
        >>> train, evaluation = build_transforms(image_settings(model.open_clip_config, model.model_config))
    """
    image_size = open_clip_cfg["vision_cfg"].get("image_size", 224)
    hf = open_clip_cfg.get("hf_preprocess") or {}
    mean = tuple(cfg.image_mean) if cfg.image_mean else (tuple(hf["mean"]) if hf.get("mean") else None)
    std = tuple(cfg.image_std) if cfg.image_std else (tuple(hf["std"]) if hf.get("std") else None)
    return ImageSettings(size=image_size, mean=mean, std=std, resize_mode=hf.get("resize_mode"),
                         interpolation=hf.get("interpolation"), resize_size=hf.get("resize_size", image_size))


def build_model(cfg: ModelConfig, augmentation: Optional[dict] = None, load_pretrained: bool = True) -> DualEncoder:
    """Create a :class:`DualEncoder` from a recipe's ``model`` section.

    Example:
        >>> from vlpretrain.config import ModelConfig
        >>> model = build_model(ModelConfig(arch="ViT-B-32", image_tower="timm:resnet18", text_tower="hf:minilm-l6"))
        >>> clip = build_model(ModelConfig(hf_model="openai/clip-vit-base-patch32"))
    """
    fusion = fusion_settings(cfg.fusion)  # checked before anything is built
    check_augmentation_keys(augmentation)
    if cfg.hf_model:
        if fusion is not None:
            raise ValueError("model.fusion is not available with model.hf_model (transformers CLIP / SigLIP "
                             "towers); build the towers with arch / image_tower / text_tower instead")
        return _build_hf_model(cfg, augmentation, load_pretrained)
    open_clip_cfg = build_open_clip_config(cfg)
    vision_cfg, text_cfg = dict(open_clip_cfg["vision_cfg"]), dict(open_clip_cfg["text_cfg"])
    if "timm_model_name" in vision_cfg:
        vision_cfg["timm_model_pretrained"] = bool(load_pretrained and cfg.pretrained_image and not cfg.pretrained)
    if "hf_model_name" in text_cfg:
        text_cfg["hf_model_pretrained"] = bool(load_pretrained and cfg.pretrained_text and not cfg.pretrained)
    kwargs = {k: v for k, v in open_clip_cfg.items() if k not in ("vision_cfg", "text_cfg", "custom_text")}
    model_class = open_clip.CustomTextCLIP if uses_custom_text(open_clip_cfg) else open_clip.CLIP
    with quiet_unused_pooler():  # a BERT / MiniLM text tower loads without its pooler, as intended
        clip = model_class(vision_cfg=vision_cfg, text_cfg=text_cfg, init_logit_scale=cfg.init_logit_scale, **kwargs)

    if cfg.pretrained and load_pretrained:
        _load_open_clip_weights(clip, cfg)

    train_tf, eval_tf = build_transforms(image_settings(open_clip_cfg, cfg), augmentation)
    tokenizer = build_tokenizer(open_clip_cfg, mask_token=fusion is not None and fusion.mlm)
    model = DualEncoder(clip, tokenizer, eval_tf, train_tf, cfg, open_clip_cfg, max_logit_scale=cfg.max_logit_scale)
    if fusion is not None:
        model.add_fusion(fusion)
    apply_locks(model, cfg)
    return model


def apply_locks(model: DualEncoder, cfg: ModelConfig) -> None:
    """Freeze the towers ``cfg.lock_image`` / ``cfg.lock_text`` name; cache a fully locked text tower."""
    if cfg.lock_image:
        model.lock_image_tower(cfg.lock_image_unlocked_groups, cfg.lock_image_freeze_bn_stats)
    if cfg.lock_text:
        model.lock_text_tower(cfg.lock_text_unlocked_layers, cfg.lock_text_freeze_layer_norm)
        # Fusion heads read the text tower's tokens, which the cache (pooled features only) cannot give.
        if cfg.cache_locked_text and model.text_transformer_frozen() and model.fusion is None:
            model.enable_text_cache(dropout=cfg.cached_text_dropout)


def _build_hf_model(cfg: ModelConfig, augmentation: Optional[dict] = None, load_pretrained: bool = True,
                    config_dict: Optional[dict] = None, support: Optional[str] = None) -> DualEncoder:
    """A DualEncoder over a transformers CLIPModel / SiglipModel (see ``hf_towers``).

    ``config_dict`` / ``support`` rebuild a checkpoint of ours without the original folder or hub.
    """
    import pickle

    from .hf_towers import WEIGHT_FILES, load_hf_towers

    try:
        towers, tokenizer = load_hf_towers(cfg.hf_model, load_pretrained, config_dict=config_dict, support=support)
    except pickle.UnpicklingError:
        # torch.load(weights_only=True) refused a pickled .bin (code or objects, not only tensors); its
        # message spans many lines and names no file.
        folder = Path(str(cfg.hf_model)).expanduser()
        named = next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), cfg.hf_model)
        raise ValueError(f"{named}: refused: not a plain weights file (a pickle holding code or objects "
                         f"that a weights-only load does not run); use model.safetensors") from None
    settings = towers.image_settings
    # Stands in for open_clip's model config: the keys the rest of the toolkit reads (sizes, embed_dim).
    open_clip_cfg = {
        "embed_dim": towers.embed_dim,
        "vision_cfg": {"image_size": settings["image_size"]},
        "text_cfg": {"context_length": tokenizer.context_length},
        "hf_model": cfg.hf_model,
        "hf_model_type": towers.model_type,
        "hf_preprocess": settings,
    }
    train_tf, eval_tf = build_transforms(image_settings(open_clip_cfg, cfg), augmentation)
    # A pretrained SigLIP's temperature can sit above CLIP's cap of 100; clamping would cut it.
    max_logit_scale = max(cfg.max_logit_scale, float(towers.logit_scale.detach().max()))
    model = DualEncoder(towers, tokenizer, eval_tf, train_tf, cfg, open_clip_cfg, max_logit_scale=max_logit_scale)
    apply_locks(model, cfg)
    return model


# Suffixes of weight files, so that a missing file is not mistaken for a pretrained tag.
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz", ".npy")


def _load_open_clip_weights(clip: torch.nn.Module, cfg: ModelConfig) -> None:
    """Full CLIP weights from an open_clip pretrained tag (downloads when online) or a file.

    A file that is missing, unreadable or made for another architecture is a one-line error naming it.
    """
    source = cfg.pretrained
    label = f"open_clip:{cfg.arch}@{source}" if cfg.arch else f"model.pretrained={source}"
    if not Path(source).is_file():
        # Pretrained tags (laion2b_s34b_b79k, openai) are bare names; anything path-like is a file.
        if "/" in source or "\\" in source or Path(source).suffix.lower() in _WEIGHT_SUFFIXES:
            raise FileNotFoundError(f"{label}: weights file not found (give the path of an open_clip "
                                    f".pt / .bin / .safetensors file, or a pretrained tag)")
        if not cfg.arch:
            raise ConfigError(f"model.pretrained: '{source}' is not a file, and a pretrained tag needs model.arch")
        tag_cfg = open_clip.get_pretrained_cfg(cfg.arch, source)
        if not tag_cfg:
            tags = open_clip.list_pretrained_tags_by_model(cfg.arch)
            raise ConfigError(f"model.pretrained: '{source}' is neither a file nor a pretrained tag of "
                              f"{cfg.arch} (tags: {tags})")
        source = open_clip.download_pretrained(tag_cfg)
    try:
        open_clip.load_checkpoint(clip, source)
    except Exception as error:  # noqa: BLE001 - torch.load, safetensors and load_state_dict raise many types
        # open_clip's loader stays the one path to success; only a failure is looked into, to say why.
        raise _weights_error(clip, cfg, label, source, error) from error


def _weights_error(clip: torch.nn.Module, cfg: ModelConfig, label: str, source: str, error: Exception) -> ValueError:
    """Why ``source`` did not load into ``clip``: unreadable, or the first key / shape that differs."""
    from open_clip.factory import load_state_dict
    from open_clip.model import convert_to_custom_text_state_dict

    fix, arch = "check the architecture name", cfg.arch or "the model"
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if Path(source).suffix in (".npz", ".npy"):  # big_vision weights: open_clip converts them on its own
        return ValueError(f"{label}: weights do not fit {arch} ({first_line}); {fix}")
    try:
        state = load_state_dict(str(source))
        if not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise TypeError("not a mapping of tensors")
    except Exception:  # noqa: BLE001
        return ValueError(f"{label}: cannot read weights from the file (corrupt, truncated, or not a PyTorch / "
                          f"safetensors state dict)")
    if "positional_embedding" in state and not hasattr(clip, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    model_state = clip.state_dict()
    # open_clip interpolates positional embeddings to the model's size, so they never cause the failure.
    resized = ("positional_embedding", "text.positional_embedding", "visual.positional_embedding")
    for key, value in model_state.items():
        if key in state and key not in resized and tuple(state[key].shape) != tuple(value.shape):
            return ValueError(f"{label}: weights do not fit {arch} (size mismatch at {key}: file "
                              f"{tuple(state[key].shape)}, model {tuple(value.shape)}); {fix}")
    missing = [k for k in model_state if k not in state and k != "logit_bias"]
    unexpected = [k for k in state if k not in model_state and not k.endswith("position_ids")]
    details = []
    for what, keys in (("missing from the file", missing), ("not in the model", unexpected)):
        if keys:
            details.append(f"{what}: {keys[0]}" + (f" and {len(keys) - 1} more" if len(keys) > 1 else ""))
    detail = "; ".join(details) or first_line
    return ValueError(f"{label}: weights do not fit {arch} ({detail}); {fix}")


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
    values = read_json(config_path)
    cfg = _model_config_from_dict(values["model"])
    if cfg.hf_model:
        # The transformers config saved with the weights, and the tokenizer / processor files in hf/:
        # the checkpoint reloads without the original folder or the hub.
        support = directory / HF_SUPPORT_DIR
        model = _build_hf_model(cfg, load_pretrained=False, config_dict=values.get("hf_config"),
                                support=str(support) if support.is_dir() else None)
    else:
        model = build_model(cfg, load_pretrained=False)
    try:
        state = load_file(str(weights_path), device=map_location)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights_path}: unreadable or truncated weights file ({e})") from None
    expected = model.state_dict()
    wrong_shape = [k for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if wrong_shape:
        raise ValueError(f"{weights_path}: weights do not match the model in {CONFIG_NAME} "
                         f"({len(wrong_shape)} of another shape, e.g. {wrong_shape[0]})")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights_path}: weights do not match the model in {CONFIG_NAME} "
                         f"(missing {missing[:3]}..., unexpected {unexpected[:3]}...)")
    if cfg.hf_model:
        model.max_logit_scale = max(model.max_logit_scale, float(model.logit_scale.detach().max()))
    return model


def load_model(spec: Union[str, Path, ModelConfig]) -> DualEncoder:
    """One entry point for every model source.

    - a checkpoint folder of ours (``runs/demo/final``),
    - a recipe YAML (its ``model`` section, freshly initialised),
    - ``open_clip:ARCH`` (random init) or ``open_clip:ARCH/TAG`` (open_clip pretrained weights,
      downloaded when online), ``open_clip:ARCH@path/to/weights.pt``,
    - ``hf:ORG/NAME`` or ``hf:/path/to/folder``: a transformers CLIPModel or SiglipModel,
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
    if text.startswith("hf:"):
        name = text[len("hf:"):]
        if not name:
            raise ValueError("cannot load model 'hf:': give a hub id or folder, e.g. hf:openai/clip-vit-base-patch32")
        return build_model(ModelConfig(hf_model=name))
    path = Path(text)
    if path.is_dir():
        return load_checkpoint_dir(path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return build_model(load_recipe(path).model)
    raise ValueError(f"cannot load model '{text}': expected a checkpoint folder (with {CONFIG_NAME}), "
                     f"a recipe .yaml, open_clip:ARCH[/TAG] or hf:ORG/NAME")
