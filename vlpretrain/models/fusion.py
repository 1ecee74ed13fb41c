"""Fusion heads (ALBEF / FLAVA): a small cross-attention encoder over text and image tokens, with an
image-text matching (ITM) head and a masked-language-modelling (MLM) head.

The encoder reads the unimodal towers' token features (``DualEncoder.encode_text_tokens`` /
``encode_image_tokens``): text tokens attend to each other (bidirectionally, padding masked), then
to the image tokens, ``layers`` times; the output at position 0 (SOT / [CLS]) summarises the pair.
The blocks are open_clip's own ``ResidualAttentionBlock`` (self- and cross-attention).

A recipe turns it on with ``model.fusion`` (see :class:`FusionSettings` for the keys).

Example:
    >>> settings = fusion_settings({"layers": 2})
    >>> fusion = FusionModule(settings, text_width=192, image_width=192, vocab_size=49409)
    >>> itm_logits = fusion.itm_logits(text_hidden, text_padding, image_tokens)     # (B, 2)
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, Optional

import torch
from open_clip.transformer import LayerNorm, ResidualAttentionBlock
from torch import nn

NEGATIVES = ("hard", "random")
NEGATIVES_FROM = ("local", "global")
# Which fused text position the ITM head reads: the first (BERT's [CLS]; ALBEF) or the last non-padding
# one (the end-of-text token a causal text tower such as open_clip's pools: its first position sees only
# itself, the same for every caption). "auto": last for a causal text tower, first otherwise.
SUMMARY_TOKENS = ("auto", "first", "last")
# Seed of the negative sampling and masking generators; the module's step counter is added to it.
SAMPLING_SEED = 6_070_917


@dataclass
class FusionSettings:
    """``model.fusion`` keys.

    ``negatives``: ``hard`` (ALBEF: drawn from softmax of the contrastive similarity) or ``random``
    (FLAVA: uniform). ``negatives_from``: ``local`` (this process's batch) or ``global`` (the batch
    gathered from every process, BLIP's ``negative_all_rank``).
    """

    layers: int = 2
    width: Optional[int] = None
    heads: Optional[int] = None
    mlp_ratio: float = 4.0
    itm: bool = True
    mlm: bool = True
    negatives: str = "hard"
    negatives_from: str = "local"
    mlm_probability: float = 0.15
    summary_token: str = "auto"


def fusion_settings(values: Optional[dict]) -> Optional[FusionSettings]:
    """Validate a recipe's ``model.fusion`` mapping; ``None`` when it is empty (no fusion heads).

    Example:
        >>> fusion_settings({"layers": 4, "negatives": "random"}).negatives
        'random'
    """
    if not values:
        return None
    if not isinstance(values, dict):
        raise ValueError(f"model.fusion: expected a mapping of keys (e.g. {{layers: 2}}), got {values!r}")
    names = [f.name for f in dataclasses.fields(FusionSettings)]
    settings = FusionSettings()
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"model.fusion: unknown key '{key}'{hint}; keys: {', '.join(names)}")
        setattr(settings, key, _check_value(key, value, getattr(settings, key)))
    if settings.layers < 1:
        raise ValueError(f"model.fusion.layers must be at least 1, got {settings.layers}")
    for key in ("width", "heads"):
        if getattr(settings, key) is not None and getattr(settings, key) < 1:
            raise ValueError(f"model.fusion.{key} must be at least 1 (or null), got {getattr(settings, key)}")
    if settings.mlp_ratio <= 0:
        raise ValueError(f"model.fusion.mlp_ratio must be positive, got {settings.mlp_ratio}")
    if settings.negatives not in NEGATIVES:
        raise ValueError(f"model.fusion.negatives: '{settings.negatives}' is not one of {list(NEGATIVES)}")
    if settings.negatives_from not in NEGATIVES_FROM:
        raise ValueError(f"model.fusion.negatives_from: '{settings.negatives_from}' is not one of "
                         f"{list(NEGATIVES_FROM)}")
    if settings.summary_token not in SUMMARY_TOKENS:
        raise ValueError(f"model.fusion.summary_token: '{settings.summary_token}' is not one of {list(SUMMARY_TOKENS)}")
    if not 0.0 < settings.mlm_probability <= 1.0:
        raise ValueError(f"model.fusion.mlm_probability must be in (0, 1], got {settings.mlm_probability}")
    if not (settings.itm or settings.mlm):
        raise ValueError("model.fusion: itm and mlm are both false, so the fusion encoder would never train; "
                         "turn one on or remove model.fusion")
    return settings


def _check_value(key: str, value: Any, default: Any) -> Any:
    # The defaults' types say what each key takes (width / heads: an integer or null).
    if key in ("width", "heads"):
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"model.fusion.{key}: expected an integer or null, got {value!r}")
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise ValueError(f"model.fusion.{key}: expected true or false, got {value!r}")
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"model.fusion.{key}: expected an integer, got {value!r}")
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"model.fusion.{key}: expected a number, got {value!r}")
    if not isinstance(value, str):
        raise ValueError(f"model.fusion.{key}: expected a string, got {value!r}")
    return value


def padding_attn_mask(padding: torch.Tensor, heads: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive self-attention mask ``(B * heads, T, T)``: -inf at padded keys (``padding`` True).

    ``ResidualAttentionBlock`` takes only ``attn_mask`` (it casts a bool mask to numbers), so the
    key padding mask is written in the additive form ``nn.MultiheadAttention`` accepts.
    """
    batch, length = padding.shape
    mask = torch.zeros(batch, 1, 1, length, dtype=dtype, device=padding.device)
    mask = mask.masked_fill(padding[:, None, None, :], float("-inf"))
    return mask.expand(batch, heads, length, length).reshape(batch * heads, length, length)


class FusionEncoder(nn.Module):
    """``layers`` x [self-attention over text tokens, cross-attention to image tokens], then a LayerNorm.

    Inputs are projected from the towers' widths to ``width`` first. Output ``(B, T, width)``;
    position 0 is the pair's summary (what the ITM head reads).

    Example:
        >>> encoder = FusionEncoder(text_width=192, image_width=256, width=192, layers=2, heads=3)
        >>> encoder(text_hidden, text_padding, image_tokens).shape
        torch.Size([8, 24, 192])
    """

    def __init__(self, text_width: int, image_width: int, width: int, layers: int, heads: int,
                 mlp_ratio: float = 4.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"model.fusion: width {width} is not divisible by heads {heads}; "
                             f"set model.fusion.heads to a divisor of the width")
        self.width, self.heads = width, heads
        self.text_proj = nn.Linear(text_width, width)
        self.image_proj = nn.Linear(image_width, width)
        self.self_blocks = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers))
        self.cross_blocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio, is_cross_attention=True) for _ in range(layers))
        self.ln_final = LayerNorm(width)

    def forward(self, text_hidden: torch.Tensor, text_padding: torch.Tensor,
                image_tokens: torch.Tensor) -> torch.Tensor:
        """``text_hidden`` (B, T, text_width), ``text_padding`` (B, T) bool (True = pad),
        ``image_tokens`` (B, N, image_width) -> (B, T, width)."""
        x = self.text_proj(text_hidden)
        image = self.image_proj(image_tokens.to(x.dtype))
        mask = padding_attn_mask(text_padding, self.heads, x.dtype)
        for self_block, cross_block in zip(self.self_blocks, self.cross_blocks):
            x = self_block(x, attn_mask=mask)
            x = cross_block(x, k_x=image, v_x=image)
        return self.ln_final(x)


class FusionModule(nn.Module):
    """The fusion encoder with its heads: ``itm_head`` (match / no match) and ``mlm_head`` (BERT's
    Linear -> GELU -> LayerNorm -> Linear(vocab_size)); a head is ``None`` when turned off.

    A ``step`` buffer counts training forwards: the negative sampling and masking generators are
    seeded with it, so a run resumed from a checkpoint continues the same draws.
    """

    def __init__(self, settings: FusionSettings, text_width: int, image_width: int, vocab_size: int):
        super().__init__()
        self.settings = settings
        width = settings.width or text_width
        heads = settings.heads or max(1, width // 64)
        self.encoder = FusionEncoder(text_width, image_width, width, settings.layers, heads, settings.mlp_ratio)
        self.itm_head = nn.Linear(width, 2) if settings.itm else None
        self.mlm_head = nn.Sequential(nn.Linear(width, width), nn.GELU(), LayerNorm(width),
                                      nn.Linear(width, vocab_size)) if settings.mlm else None
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def itm_logits(self, text_hidden: torch.Tensor, text_padding: torch.Tensor,
                   image_tokens: torch.Tensor) -> torch.Tensor:
        """(B, 2) logits of (no match, match) for aligned pairs."""
        text_hidden, text_padding = _trim_padding(text_hidden, text_padding)
        fused = self.encoder(text_hidden, text_padding, image_tokens)
        if self.settings.summary_token == "last":
            last = ((~text_padding).sum(1) - 1).clamp(min=0)
            return self.itm_head(fused[torch.arange(len(fused), device=fused.device), last])
        return self.itm_head(fused[:, 0])

    def mlm_logits(self, text_hidden: torch.Tensor, text_padding: torch.Tensor, image_tokens: torch.Tensor,
                   positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Vocabulary logits: (B, T, vocab) or, with ``positions`` (B, T) bool, (P, vocab) for the P
        True positions only (the vocabulary projection is most of the cost)."""
        if positions is not None:
            text_hidden, text_padding = _trim_padding(text_hidden, text_padding)
            positions = positions[:, :text_hidden.shape[1]]  # chosen positions are never padding
        hidden = self.encoder(text_hidden, text_padding, image_tokens)
        if positions is not None:
            hidden = hidden[positions]
        return self.mlm_head(hidden)


def _trim_padding(hidden: torch.Tensor, padding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the trailing positions that are padding in every row: masked keys, and queries nobody
    reads, so the outputs at the kept positions are unchanged (captions are much shorter than the
    context length, and attention and MLPs cost per position)."""
    used = torch.nonzero((~padding).any(0))
    length = int(used.max()) + 1 if len(used) else 1
    return hidden[:, :length], padding[:, :length]
