"""AdamW with CLIP's parameter groups (optionally with layer-wise lr decay), and the warmup + cosine schedule."""

from __future__ import annotations

import re
from typing import Optional

from torch import nn
from torch.optim import AdamW
from torch.optim.lr_scheduler import LambdaLR

from ..config import TrainConfig

# Transformer blocks of each tower, by parameter name: open_clip's ViT and text transformer, timm
# ViTs, Hugging Face text encoders (BERT-like encoder.layer.N) and transformers' CLIP / SigLIP
# (vision_model / text_model.encoder.layers.N). The image patterns are tried first, since open_clip's
# text transformer (transformer.resblocks.N) is a suffix of its image one.
_BLOCK_PATTERNS = (
    ("image", re.compile(r"(?:^|\.)visual\.transformer\.resblocks\.(\d+)\.")),
    ("image", re.compile(r"(?:^|\.)visual\.trunk\.blocks\.(\d+)\.")),
    ("image", re.compile(r"(?:^|\.)vision_model\.encoder\.layers\.(\d+)\.")),
    ("text", re.compile(r"(?:^|\.)transformer\.resblocks\.(\d+)\.")),
    ("text", re.compile(r"(?:^|\.)text\.transformer\.(?:.+?\.)?layers?\.(\d+)\.")),
    ("text", re.compile(r"(?:^|\.)text_model\.encoder\.layers\.(\d+)\.")),
)
# What comes before the first block (layer id 0): patch / token embeddings, class and positional
# embeddings, the norm before the blocks.
_STEM_PATTERNS = (
    ("image", re.compile(r"(?:^|\.)visual\.(?:conv1|class_embedding|positional_embedding|ln_pre)\b")),
    ("image", re.compile(r"(?:^|\.)visual\.trunk\.(?:patch_embed|cls_token|reg_token|pos_embed|norm_pre)\b")),
    ("image", re.compile(r"(?:^|\.)vision_model\.(?:embeddings|pre_layrnorm)\.")),
    ("text", re.compile(r"(?:^|\.)(?:token_embedding|positional_embedding)\b")),
    ("text", re.compile(r"(?:^|\.)text\.transformer\.embeddings\.")),
    ("text", re.compile(r"(?:^|\.)text_model\.embeddings\.")),
)


def is_no_decay(name: str, param: nn.Parameter, embedding_names: set[str]) -> bool:
    """Gains, biases, the logit scale and embeddings are not decayed (as in CLIP / open_clip)."""
    return (param.ndim < 2 or "logit_scale" in name or "logit_bias" in name
            or name in embedding_names or "positional_embedding" in name
            or "class_embedding" in name or "pos_embed" in name or "cls_token" in name)


def layer_id(name: str) -> tuple[Optional[str], Optional[int]]:
    """``(tower, id)`` of a parameter for layer-wise lr decay: id 0 for the stem (embeddings), ``i + 1``
    for block ``i``, ``(None, None)`` for everything after the blocks or unknown (lr scale 1).

    Example:
        >>> layer_id("clip.visual.transformer.resblocks.3.attn.in_proj_weight")
        ('image', 4)
    """
    for tower, pattern in _BLOCK_PATTERNS:
        match = pattern.search(name)
        if match:
            return tower, int(match.group(1)) + 1
    for tower, pattern in _STEM_PATTERNS:
        if pattern.search(name):
            return tower, 0
    return None, None


def layer_scales(model: nn.Module, layer_decay: float) -> dict[str, float]:
    """lr scale of every parameter: ``layer_decay ** (num_layers + 1 - layer_id)``, counted per tower
    (BEiT / ELECTRA style), so each tower's top gets 1 and its embeddings ``layer_decay ** (L + 1)``.

    Example:
        >>> layer_scales(model, 0.75)["clip.visual.conv1.weight"]   # a 12-block ViT: 0.75 ** 13
        0.023757264018058777
    """
    ids = {name: layer_id(name) for name, _ in model.named_parameters()}
    num_layers: dict[str, int] = {}
    for tower, i in ids.values():
        if tower is not None:
            num_layers[tower] = max(num_layers.get(tower, 0), i)
    scales = {}
    for name, (tower, i) in ids.items():
        scales[name] = 1.0 if tower is None else layer_decay ** (num_layers[tower] + 1 - i)
    return scales


def parameter_groups(model: nn.Module, weight_decay: float, layer_decay: Optional[float] = None,
                     lr: Optional[float] = None) -> list[dict]:
    """Two groups: decayed matrices, and everything :func:`is_no_decay` exempts; frozen ones left out.

    With ``layer_decay``, each (decay, lr scale) pair is its own group carrying ``lr = lr * scale``
    (and ``lr_scale``); the groups at scale 1 come first, so ``get_last_lr()[0]`` is the base lr.
    """
    embedding_names = {f"{module_name}.weight" if module_name else "weight"
                       for module_name, module in model.named_modules() if isinstance(module, nn.Embedding)}
    if layer_decay is None:
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if is_no_decay(name, param, embedding_names) else decay).append(param)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
    if not 0 < layer_decay <= 1:
        raise ValueError(f"train.layer_decay must be in (0, 1], got {layer_decay} (e.g. 0.75; null turns it off)")
    if lr is None:
        raise ValueError("parameter_groups: layer_decay needs the base lr")
    scales = layer_scales(model, layer_decay)
    groups: dict[tuple[float, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = is_no_decay(name, param, embedding_names)
        key = (scales[name], no_decay)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                           "lr": lr * scales[name], "lr_scale": scales[name]}
        groups[key]["params"].append(param)
    # LambdaLR multiplies each group's own initial lr, so the scales survive warmup and cosine decay.
    return [groups[key] for key in sorted(groups, key=lambda k: (-k[0], k[1]))]


def create_optimizer(model: nn.Module, cfg: TrainConfig) -> AdamW:
    groups = parameter_groups(model, cfg.weight_decay, cfg.layer_decay, cfg.lr)
    if not any(group["params"] for group in groups):
        raise ValueError("every parameter is frozen: nothing to train (check model.lock_image / lock_text)")
    try:
        # The fused kernel (CPU and CUDA) updates all tensors in one pass: about 6x faster than the
        # per-tensor loop on a 10M-parameter model here, a few percent of a whole training step.
        return AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)
    except (RuntimeError, ValueError):
        return AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
def create_scheduler(optimizer, cfg: TrainConfig, total_steps: int) -> LambdaLR:
    """Linear warmup, then cosine decay to ``min_lr_ratio * lr`` (or constant with ``schedule: constant``)."""
    from transformers import get_constant_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup

    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    if cfg.schedule == "cosine":
        return get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, num_warmup_steps=warmup, num_training_steps=total_steps, min_lr_rate=cfg.min_lr_ratio)
    if cfg.schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, num_warmup_steps=warmup)
    raise ValueError(f"train.schedule: unknown schedule '{cfg.schedule}' (use cosine or constant)")
