"""Token features of each tower kind, with the pooled (projected) features from the same pass.

Fusion heads need the towers' per-token outputs, which open_clip's ``encode_image`` /
``encode_text`` pool away. Each function here runs the tower through its own modules, exactly as
its ``forward`` does, and returns both: the pooled features equal ``encode_image`` /
``encode_text`` (unnormalized), so one pass serves the contrastive loss and the fusion heads.

Supported: open_clip's ViT and ModifiedResNet and timm image towers; open_clip's text transformer
(``CLIP`` and ``CustomTextCLIP``) and Hugging Face text towers (``HFTextEncoder``).

Example:
    >>> pooled, tokens = image_features_and_tokens(model.clip, images)     # (B, D), (B, N, width)
    >>> pooled, hidden, padding = text_features_and_tokens(model.clip, token_ids)
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

UNSUPPORTED_IMAGE = ("model.fusion: the image tower {name} cannot give token features; use an open_clip ViT "
                     "or ResNet (model.arch / image_tower: open_clip:ARCH) or a timm tower (image_tower: timm:NAME)")
UNSUPPORTED_TEXT = ("model.fusion: the text tower {name} cannot give token features; use open_clip's text "
                    "transformer or a Hugging Face text tower (text_tower: hf:NAME)")


def _hf_text(clip: nn.Module) -> Optional[nn.Module]:
    from open_clip.hf_model import HFTextEncoder

    text = getattr(clip, "text", None)
    return text if isinstance(text, HFTextEncoder) else None


def _open_clip_text(clip: nn.Module) -> Optional[nn.Module]:
    """The module holding open_clip's text transformer: the CLIP itself, or ``clip.text``."""
    from open_clip.transformer import TextTransformer

    if hasattr(clip, "token_embedding") and hasattr(clip, "ln_final"):
        return clip
    text = getattr(clip, "text", None)
    return text if isinstance(text, TextTransformer) else None


def image_token_width(clip: nn.Module) -> int:
    """Width of the tokens :func:`image_features_and_tokens` returns."""
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import VisionTransformer

    visual = getattr(clip, "visual", None)
    if isinstance(visual, VisionTransformer):
        return int(visual.transformer.width)
    if isinstance(visual, TimmModel):
        return int(visual.trunk.num_features)
    if isinstance(visual, ModifiedResNet):
        return int(visual.attnpool.k_proj.in_features)
    raise ValueError(UNSUPPORTED_IMAGE.format(name=type(visual).__name__))


def text_token_width(clip: nn.Module) -> int:
    """Width of the hidden states :func:`text_features_and_tokens` returns."""
    hf = _hf_text(clip)
    if hf is not None:
        config = hf.transformer.config
        return int(getattr(config, "hidden_size", None) or getattr(config, "d_model"))
    text = _open_clip_text(clip)
    if text is None:
        raise ValueError(UNSUPPORTED_TEXT.format(name=type(getattr(clip, "text", clip)).__name__))
    return int(text.transformer.width)


def text_is_causal(clip: nn.Module) -> bool:
    """True when the text tower attends causally (open_clip's text transformer with its causal mask), so
    a caption's content reaches only its later positions; Hugging Face encoders are bidirectional."""
    if _hf_text(clip) is not None:
        return False
    text = _open_clip_text(clip)
    return getattr(text, "attn_mask", None) is not None


def text_vocab_size(clip: nn.Module) -> int:
    """Rows of the text tower's token embedding: the size of the MLM head's output."""
    hf = _hf_text(clip)
    if hf is not None:
        return int(hf.transformer.get_input_embeddings().num_embeddings)
    text = _open_clip_text(clip)
    if text is None:
        raise ValueError(UNSUPPORTED_TEXT.format(name=type(getattr(clip, "text", clip)).__name__))
    return int(text.token_embedding.num_embeddings)


def text_pad_id(clip: nn.Module) -> int:
    """The padding token id of the text tower (open_clip pads with 0)."""
    hf = _hf_text(clip)
    if hf is not None:
        return int(hf.config.pad_token_id if hf.config.pad_token_id is not None else 0)
    text = _open_clip_text(clip)
    return int(getattr(text, "pad_id", 0) or 0)


def image_features_and_tokens(clip: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pooled, tokens)``: ``clip.encode_image(images)`` (unnormalized) and the tower's last token
    features ``(B, N, width)``: a ViT's class + patch tokens after its final norm, a timm model's
    ``forward_features`` (a CNN's feature map flattened to H*W tokens), a ResNet's last feature map."""
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import VisionTransformer

    visual = clip.visual
    if isinstance(visual, VisionTransformer):
        # VisionTransformer.forward, keeping the tokens: _embeds -> transformer -> _pool -> proj.
        x = visual.transformer(visual._embeds(images))
        pooled, pooled_tokens = visual._pool(x)
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        # The class token is kept (the pool drops it); attention-pooled towers give their pooled tokens.
        tokens = pooled_tokens if visual.attn_pool is not None else visual.ln_post(x)
        return pooled, tokens
    if isinstance(visual, TimmModel):
        # TimmModel.forward is trunk (= forward_head(forward_features)) then head.
        features = visual.trunk.forward_features(images)
        pooled = visual.head(visual.trunk.forward_head(features))
        return pooled, _feature_tokens(features, int(visual.trunk.num_features))
    if isinstance(visual, ModifiedResNet):
        x = visual.stem(images)
        x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
        return visual.attnpool(x), x.flatten(2).transpose(1, 2)
    raise ValueError(UNSUPPORTED_IMAGE.format(name=type(visual).__name__))


def _feature_tokens(features: torch.Tensor, channels: int) -> torch.Tensor:
    if features.ndim == 3:  # (B, N, C): transformer tokens, prefix (class) tokens included
        return features
    if features.ndim == 4:
        if features.shape[1] == channels:  # NCHW
            return features.flatten(2).transpose(1, 2)
        return features.flatten(1, 2)  # NHWC (e.g. Swin, ConvNeXt-V2 variants)
    raise ValueError(f"model.fusion: the timm image tower returned features of shape {tuple(features.shape)}; "
                     f"expected (B, N, C) tokens or a (B, C, H, W) map")


def text_features_and_tokens(clip: nn.Module, tokens: torch.Tensor, pooled: bool = True
                             ) -> tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """``(pooled, hidden, padding)``: ``clip.encode_text(tokens)`` (unnormalized; ``None`` when
    ``pooled`` is False), the last hidden states ``(B, T, width)`` and the padding mask ``(B, T)``
    (True = pad). open_clip's transformer keeps its causal mask, exactly as in ``encode_text``."""
    from open_clip.transformer import text_global_pool

    hf = _hf_text(clip)
    if hf is not None:
        # HFTextEncoder.forward: transformer -> pooler -> proj.
        attention = (tokens != hf.config.pad_token_id).long()
        out = hf.transformer(input_ids=tokens, attention_mask=attention)
        features = hf.proj(hf.pooler(out, attention)) if pooled else None
        return features, out.last_hidden_state, attention == 0
    text = _open_clip_text(clip)
    if text is None:
        raise ValueError(UNSUPPORTED_TEXT.format(name=type(getattr(clip, "text", clip)).__name__))
    padding = tokens == text_pad_id(clip)
    if text is clip:
        # CLIP.encode_text: token + positional embedding -> transformer (causal) -> ln_final -> pool -> proj.
        cast_dtype = clip.transformer.get_cast_dtype()
        x = clip.token_embedding(tokens).to(cast_dtype) + clip.positional_embedding.to(cast_dtype)
        x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask))
        features = None
        if pooled:
            features = text_global_pool(x, tokens, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
            features = _project(features, clip.text_projection)
        return features, x, padding
    # TextTransformer.forward (CustomTextCLIP with open_clip's own text transformer).
    x, attn_mask = text._embeds(tokens)
    x = text.transformer(x, attn_mask=attn_mask)
    features = None
    if text.cls_emb is not None:  # CoCa-style appended class token: pooled from the last position
        hidden = text.ln_final(x[:, :-1])
        if pooled:
            features = _project(text.ln_final(x[:, -1]), text.text_projection)
        return features, hidden, padding
    x = text.ln_final(x)
    if pooled:
        features = text_global_pool(x, tokens, pool_type=text.pool_type, eos_token_id=getattr(text, "eos_id", None))
        features = _project(features, text.text_projection)
    return features, x, padding


def _project(x: torch.Tensor, projection) -> torch.Tensor:
    if projection is None:
        return x
    return projection(x) if isinstance(projection, nn.Linear) else x @ projection
