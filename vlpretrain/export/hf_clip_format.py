"""Export an open_clip ViT + text transformer model as a transformers ``CLIPModel`` folder.

The two architectures are the same network with other parameter names: open_clip's fused attention
``in_proj`` splits into ``q/k/v_proj``, its ``(width, embed_dim)`` projection matrices are the
transposed weights of CLIPModel's bias-free ``Linear`` projections, and CLIPModel pools the text at the
first end-of-text token (``eos_token_id=49407``), which is where open_clip's argmax pooling lands with
its tokenizer. Anything without a CLIPModel counterpart (a timm or Hugging Face tower, attentional
pooling, layer scale, ...) is refused up front, naming the part; such models export with
``--format open_clip``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import open_clip
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import ResidualAttentionBlock, TextTransformer, VisionTransformer
from torch import nn

from .clip_tokenizer import write_clip_tokenizer

# Tower settings that change the network into one CLIPModel cannot express: the values it can.
_VISION_FIXED = {"ls_init_value": (None,), "no_ln_pre": (False,), "block_type": (None, "default"),
                 "qk_norm": (False,), "scaled_cosine_attn": (False,), "scale_heads": (False,),
                 "scale_attn_inner": (False,), "scale_attn": (False,), "scale_fc": (False,),
                 "act_kwargs": (None, {})}
_TEXT_FIXED = {"ls_init_value": (None,), "embed_cls": (False,), "no_causal_mask": (False,),
               "proj_type": ("linear",), "proj_bias": (False,), "block_type": (None, "default"),
               "qk_norm": (False,), "scaled_cosine_attn": (False,), "scale_heads": (False,),
               "scale_attn_inner": (False,), "scale_attn": (False,), "scale_fc": (False,),
               "act_kwargs": (None, {}), "tokenizer_mode": (None, "")}
_DEFAULT_EPS = 1e-5  # open_clip's LayerNorm is torch's, eps 1e-5 unless norm_kwargs say otherwise


def _refuse(part: str) -> ValueError:
    return ValueError(f"--format hf: the {part} is not HF-CLIP-compatible; use --format open_clip")


def _eps(norm_kwargs: Optional[dict], tower: str, key: str) -> float:
    norm_kwargs = dict(norm_kwargs or {})
    eps = norm_kwargs.pop("eps", _DEFAULT_EPS)
    if norm_kwargs:
        raise _refuse(f"{tower}'s setting {key}.norm_kwargs={norm_kwargs!r}")
    return float(eps)


def _check_vision(model, vision_cfg: dict) -> None:
    visual = model.clip.visual
    if "timm_model_name" in vision_cfg:
        raise _refuse(f"timm image tower (timm:{vision_cfg['timm_model_name']})")
    if not isinstance(visual, VisionTransformer):
        raise _refuse(f"{type(visual).__name__} image tower")
    cfg = CLIPVisionCfg(**vision_cfg)
    if cfg.attentional_pool:
        raise _refuse("image tower's attentional pooler (vision_cfg.attentional_pool)")
    if cfg.pool_type != "tok":
        raise _refuse(f"image tower's pool_type '{cfg.pool_type}' (CLIPModel pools the class token)")
    for key, allowed in _VISION_FIXED.items():
        if getattr(cfg, key) not in allowed:
            raise _refuse(f"image tower's setting vision_cfg.{key}={getattr(cfg, key)!r}")
    _eps(cfg.norm_kwargs, "image tower", "vision_cfg")
    if visual.image_size[0] != visual.image_size[1] or visual.patch_size[0] != visual.patch_size[1]:
        raise _refuse(f"image tower's non-square image_size {list(visual.image_size)} / "
                      f"patch_size {list(visual.patch_size)}")
    _check_blocks(visual.transformer.resblocks, "image tower")


def _check_text(model, text_cfg: dict) -> None:
    if "hf_model_name" in text_cfg:
        tower = getattr(model.model_config, "text_tower", None) or f"hf:{text_cfg['hf_model_name']}"
        raise _refuse(f"Hugging Face text tower ({tower})")
    text = getattr(model.clip, "text", model.clip)
    if isinstance(model.clip, open_clip.CustomTextCLIP) and not isinstance(text, TextTransformer):
        raise _refuse(f"{type(text).__name__} text tower")
    cfg = CLIPTextCfg(**text_cfg)
    if cfg.pool_type != "argmax":
        raise _refuse(f"text tower's pool_type '{cfg.pool_type}' (CLIPModel pools at the end-of-text token, "
                      f"like 'argmax')")
    for key, allowed in _TEXT_FIXED.items():
        if getattr(cfg, key) not in allowed:
            raise _refuse(f"text tower's setting text_cfg.{key}={getattr(cfg, key)!r}")
    _eps(cfg.norm_kwargs, "text tower", "text_cfg")
    tokenizer = model.tokenizer
    if cfg.hf_tokenizer_name or not isinstance(tokenizer, SimpleTokenizer) or \
            getattr(tokenizer, "reduction_fn", None) is not None:
        raise _refuse(f"text tower's tokenizer ({type(tokenizer).__name__}, not open_clip's plain CLIP BPE)")
    if cfg.vocab_size != tokenizer.vocab_size:
        raise _refuse(f"text tower's vocab_size {cfg.vocab_size} (the CLIP tokenizer has {tokenizer.vocab_size})")
    _check_blocks(text.transformer.resblocks, "text tower")


def _check_blocks(blocks: nn.ModuleList, tower: str) -> None:
    # The config checks above name the usual culprits; this catches any other block variant.
    for block in blocks:
        if type(block) is not ResidualAttentionBlock or not isinstance(block.attn, nn.MultiheadAttention) \
                or block.attn.in_proj_weight is None or block.attn.in_proj_bias is None \
                or not isinstance(block.ls_1, nn.Identity) or not isinstance(block.ls_2, nn.Identity):
            raise _refuse(f"{tower}'s {type(block).__name__} blocks")


def check_hf_convertible(model) -> None:
    """Raise a one-line ValueError naming the first part of ``model`` that has no CLIPModel equivalent.

    Example:
        >>> check_hf_convertible(vlpretrain.load_model("recipes/lit-minilm-emoji.yaml"))
        ValueError: --format hf: the Hugging Face text tower (hf:minilm-l6) is not HF-CLIP-compatible; ...
    """
    clip = model.clip
    if not isinstance(clip, (open_clip.CLIP, open_clip.CustomTextCLIP)):
        raise ValueError(f"--format hf: {type(clip).__name__} is not HF-CLIP-compatible; use --format open_clip")
    cfg = model.open_clip_config
    _check_vision(model, dict(cfg["vision_cfg"]))
    _check_text(model, dict(cfg["text_cfg"]))
    if getattr(clip, "logit_bias", None) is not None:
        raise _refuse("logit_bias (of a sigmoid-loss model; CLIPModel has none)")


def hf_clip_config(model) -> Any:
    """The ``transformers.CLIPConfig`` of ``model``'s towers (sizes read from the modules themselves)."""
    from transformers import CLIPConfig

    cfg = model.open_clip_config
    vision_cfg, text_cfg = CLIPVisionCfg(**cfg["vision_cfg"]), CLIPTextCfg(**cfg["text_cfg"])
    visual, text = model.clip.visual, getattr(model.clip, "text", model.clip)
    act = "quick_gelu" if cfg.get("quick_gelu") else "gelu"  # open_clip's nn.GELU is the exact (erf) GELU
    v_block, t_block = visual.transformer.resblocks[0], text.transformer.resblocks[0]
    embed_dim = int(visual.proj.shape[1])
    vision = {
        "hidden_size": visual.conv1.out_channels, "intermediate_size": v_block.mlp.c_fc.out_features,
        "num_hidden_layers": len(visual.transformer.resblocks), "num_attention_heads": v_block.attn.num_heads,
        "image_size": visual.image_size[0], "patch_size": visual.patch_size[0], "num_channels": 3,
        "projection_dim": embed_dim, "hidden_act": act,
        "layer_norm_eps": _eps(vision_cfg.norm_kwargs, "image tower", "vision_cfg"),
    }
    textc = {
        "vocab_size": text.token_embedding.num_embeddings, "hidden_size": text.token_embedding.embedding_dim,
        "intermediate_size": t_block.mlp.c_fc.out_features, "num_hidden_layers": len(text.transformer.resblocks),
        "num_attention_heads": t_block.attn.num_heads, "max_position_embeddings": text.positional_embedding.shape[0],
        "projection_dim": embed_dim, "hidden_act": act,
        "layer_norm_eps": _eps(text_cfg.norm_kwargs, "text tower", "text_cfg"),
        # Pooling at the first 49407 equals open_clip's argmax; padding is id 0 ("!"), as open_clip pads.
        "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 0,
    }
    return CLIPConfig(text_config=textc, vision_config=vision, projection_dim=embed_dim,
                      logit_scale_init_value=float(model.clip.logit_scale.detach().reshape(-1)[0]))


def _blocks_state(blocks: nn.ModuleList, prefix: str) -> dict[str, torch.Tensor]:
    state = {}
    for i, block in enumerate(blocks):
        p = f"{prefix}.encoder.layers.{i}"
        for name, w, b in zip("qkv", block.attn.in_proj_weight.chunk(3), block.attn.in_proj_bias.chunk(3)):
            state[f"{p}.self_attn.{name}_proj.weight"], state[f"{p}.self_attn.{name}_proj.bias"] = w, b
        pairs = {"self_attn.out_proj": block.attn.out_proj, "layer_norm1": block.ln_1,
                 "layer_norm2": block.ln_2, "mlp.fc1": block.mlp.c_fc, "mlp.fc2": block.mlp.c_proj}
        for name, module in pairs.items():
            state[f"{p}.{name}.weight"], state[f"{p}.{name}.bias"] = module.weight, module.bias
    return state


def hf_clip_state_dict(model) -> dict[str, torch.Tensor]:
    """``model.clip``'s weights under CLIPModel's parameter names."""
    visual, text = model.clip.visual, getattr(model.clip, "text", model.clip)
    state = {
        "vision_model.embeddings.class_embedding": visual.class_embedding,
        "vision_model.embeddings.patch_embedding.weight": visual.conv1.weight,
        "vision_model.embeddings.position_embedding.weight": visual.positional_embedding,
        "vision_model.pre_layrnorm.weight": visual.ln_pre.weight,  # sic: transformers' spelling
        "vision_model.pre_layrnorm.bias": visual.ln_pre.bias,
        "vision_model.post_layernorm.weight": visual.ln_post.weight,
        "vision_model.post_layernorm.bias": visual.ln_post.bias,
        "visual_projection.weight": visual.proj.T,
        "text_model.embeddings.token_embedding.weight": text.token_embedding.weight,
        "text_model.embeddings.position_embedding.weight": text.positional_embedding,
        "text_model.final_layer_norm.weight": text.ln_final.weight,
        "text_model.final_layer_norm.bias": text.ln_final.bias,
        "text_projection.weight": text.text_projection.T,
        "logit_scale": model.clip.logit_scale.reshape(()),
    }
    state.update(_blocks_state(visual.transformer.resblocks, "vision_model"))
    state.update(_blocks_state(text.transformer.resblocks, "text_model"))
    return {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in state.items()}


def image_processor(model) -> Any:
    """A ``CLIPImageProcessor`` doing our eval transform: bicubic shortest-edge resize, centre crop, normalize."""
    from transformers import CLIPImageProcessor

    from .open_clip_format import preprocess_cfg

    pp = preprocess_cfg(model)
    size = model.clip.visual.image_size[0]
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              image_mean=pp["mean"], image_std=pp["std"], resample=3, do_resize=True,
                              do_center_crop=True, do_rescale=True, do_normalize=True, do_convert_rgb=True)


def write_hf_clip(model, directory: Path) -> None:
    """Write ``config.json`` + ``model.safetensors`` of a CLIPModel, the CLIPTokenizer files and the
    image processor config into ``directory``.

    Example:
        >>> write_hf_clip(model, Path("out"))
        >>> transformers.CLIPModel.from_pretrained("out")
    """
    from transformers import CLIPModel, CLIPProcessor

    check_hf_convertible(model)
    hf_model = CLIPModel(hf_clip_config(model)).eval()
    state = hf_clip_state_dict(model)
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]  # a constant buffer, not a weight
    if missing or unexpected:
        raise RuntimeError(f"CLIPModel conversion left weights unmapped (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    from transformers.utils import logging as hf_logging

    # A one-shard save needs no progress bar between the CLI's own lines.
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        hf_model.save_pretrained(str(directory))
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    tokenizer = write_clip_tokenizer(directory, int(hf_model.config.text_config.max_position_embeddings))
    CLIPProcessor(image_processor=image_processor(model), tokenizer=tokenizer).save_pretrained(str(directory))


def hf_load_line(directory: Path, auto: bool = False) -> str:
    where = repr(str(Path(directory).resolve()))
    model_cls, proc_cls = ("AutoModel", "AutoProcessor") if auto else ("CLIPModel", "CLIPProcessor")
    return (f"from transformers import {model_cls}, {proc_cls}; model = {model_cls}.from_pretrained({where}); "
            f"processor = {proc_cls}.from_pretrained({where})")
