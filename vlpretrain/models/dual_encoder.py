"""The dual image/text encoder: an open_clip model plus its tokenizer and transforms.

Its interface is the one CLIP_benchmark expects (``encode_image``, ``encode_text``, ``tokenizer``,
``preprocess``), so any checkpoint of ours can be evaluated there too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from ..io import write_folder_atomically

logger = logging.getLogger(__name__)

CONFIG_NAME = "vlp_config.json"
WEIGHTS_NAME = "model.safetensors"
# Beside the weights of a transformers CLIP / SigLIP model: its config, tokenizer and processor files.
HF_SUPPORT_DIR = "hf"
# open_clip's SimpleTokenizer gets this as an additional special token when a model trains MLM.
MASK_TOKEN = "<mask>"


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
        # Fusion heads (model.fusion): set by add_fusion, with the tokenizer's mask / special tokens.
        self.fusion = None
        self.mask_token_id: Optional[int] = None
        self.special_token_ids: set[int] = set()
        self.vocab_size: Optional[int] = None

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

    def forward(self, images: torch.Tensor, tokens: torch.Tensor,
                image_ids: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Normalized features of both towers, the (exponentiated) logit scale and, for sigmoid-loss
        models (SigLIP), the logit bias: ready for a loss.

        With fusion heads, in training mode, also the ITM and MLM outputs (see :meth:`fusion_forward`);
        ``image_ids`` (B,) names each pair's image (e.g. the dataset row) so that other captions of the
        same image are never drawn as its negatives.
        """
        if self.fusion is not None and self.training:
            return self.fusion_forward(images, tokens, image_ids)
        out = {
            "image_features": self.encode_image(images, normalize=True),
            "text_features": self.encode_text(tokens, normalize=True),
            "logit_scale": self.clip.logit_scale.exp(),
        }
        logit_bias = getattr(self.clip, "logit_bias", None)
        if logit_bias is not None:
            out["logit_bias"] = logit_bias
        return out

    # ------------------------------------------------------------------ fusion heads

    @property
    def has_itm(self) -> bool:
        """True when the model has an image-text matching head (ITM re-ranking works)."""
        return self.fusion is not None and self.fusion.itm_head is not None

    def add_fusion(self, settings: Any) -> None:
        """Attach fusion heads (:class:`~vlpretrain.models.fusion.FusionModule`) sized from the towers;
        the tokenizer's mask token (MLM) must already exist. ``build_model`` calls this for ``model.fusion``."""
        from .fusion import FusionModule
        from .tower_tokens import image_token_width, text_is_causal, text_pad_id, text_token_width, text_vocab_size

        self.vocab_size = text_vocab_size(self.clip)
        self.mask_token_id, self.special_token_ids = _mask_and_special_ids(self.tokenizer, text_pad_id(self.clip))
        if settings.mlm and self.mask_token_id is None:
            raise ValueError(f"model.fusion.mlm: the tokenizer {type(self.tokenizer).__name__} has no mask token; "
                             f"set model.fusion.mlm: false or use a text tower whose tokenizer has one")
        if self.mask_token_id is not None and self.mask_token_id >= self.vocab_size:
            raise ValueError(f"model.fusion.mlm: the mask token id {self.mask_token_id} is outside the text "
                             f"tower's vocabulary of {self.vocab_size}; set model.text.vocab_size to at least "
                             f"{self.mask_token_id + 1}")
        if settings.summary_token == "auto":
            settings = dataclasses.replace(settings, summary_token="last" if text_is_causal(self.clip) else "first")
        self.fusion = FusionModule(settings, text_token_width(self.clip), image_token_width(self.clip),
                                   self.vocab_size)

    def encode_image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) preprocessed images -> (B, N, image_width) token features of the image tower
        (a ViT's class + patch tokens, a CNN's feature map flattened)."""
        from .tower_tokens import image_features_and_tokens

        return image_features_and_tokens(self.clip, images)[1]

    def encode_text_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) token ids -> (hidden (B, T, text_width), padding (B, T) bool, True = pad).

        Always runs the text tower (a locked tower's feature cache holds pooled features only)."""
        from .tower_tokens import text_features_and_tokens

        _, hidden, padding = text_features_and_tokens(self.clip, tokens, pooled=False)
        return hidden, padding

    def itm_scores(self, image_tokens: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Probability that image i and caption i match, (B,), from the ITM head (use in eval mode).

        ``image_tokens`` are :meth:`encode_image_tokens` features (B, N, D), or preprocessed images
        (B, 3, H, W), encoded here; ``tokens`` are (B, T) token ids.

        Example:
            >>> model.eval()
            >>> model.itm_scores(images, model.tokenizer(["a red heart", "a frog"]))
            tensor([0.93, 0.08])
        """
        if not self.has_itm:
            raise ValueError(ITM_MISSING)
        if image_tokens.ndim == 4:
            image_tokens = self.encode_image_tokens(image_tokens)
        if image_tokens.shape[0] != tokens.shape[0]:
            raise ValueError(f"itm_scores: {image_tokens.shape[0]} images but {tokens.shape[0]} captions; "
                             f"pass aligned pairs (row i with row i)")
        hidden, padding = self.encode_text_tokens(tokens)
        return self.fusion.itm_logits(hidden, padding, image_tokens).float().softmax(-1)[:, 1]

    def fusion_forward(self, images: torch.Tensor, tokens: torch.Tensor,
                       image_ids: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """The training forward of a model with fusion heads: :meth:`forward`'s keys, plus

        - ``itm_logits`` (up to 3B, 2) and ``itm_labels`` (long): the B positive pairs (label 1), then B
          (image, negative caption) and B (negative image, caption) pairs (label 0); a pair whose row has
          no allowed negative (every other item shows the same image or caption) is left out;
        - ``mlm_logits`` (P, vocab) and ``mlm_labels`` (P,): the P positions BERT's rule chose in the
          positive captions (masked text + positive image through the fusion encoder); only those
          positions are projected to the vocabulary, since that projection is most of the cost.

        Negatives (``model.fusion.negatives``): ``hard`` draws from softmax of the detached similarity
        ``logit_scale * image @ text.T``, ``random`` uniformly; never the same image (``image_ids``) or an
        identical caption. ``negatives_from: global`` samples over the batch gathered from all processes
        with a generator seeded identically on every rank (seed + the module's step counter).
        """
        from ..distributed import get_rank
        from .fusion_sampling import mask_tokens
        from .fusion import SAMPLING_SEED
        from .tower_tokens import image_features_and_tokens, text_features_and_tokens

        if tokens.shape[0] != images.shape[0]:
            raise ValueError(f"model.fusion: {images.shape[0]} images but {tokens.shape[0]} captions in the batch; "
                             f"fusion heads need one caption per image (data.caption_choice all is not supported)")
        settings = self.fusion.settings
        step = int(self.fusion.step)
        self.fusion.step.add_(1)
        # Seeded per step so a resumed run repeats the draws; the shared generator is identical on every
        # rank (global negatives), the local one differs per rank (local negatives, masking).
        shared = torch.Generator().manual_seed(SAMPLING_SEED + step)
        local = torch.Generator().manual_seed(SAMPLING_SEED + step + 1_000_003 * (get_rank() + 1))

        image_raw, image_tokens = image_features_and_tokens(self.clip, images)
        text_raw, text_hidden, text_padding = text_features_and_tokens(self.clip, tokens)
        out = {
            "image_features": nn.functional.normalize(image_raw, dim=-1),
            "text_features": nn.functional.normalize(text_raw, dim=-1),
            "logit_scale": self.clip.logit_scale.exp(),
        }
        logit_bias = getattr(self.clip, "logit_bias", None)
        if logit_bias is not None:
            out["logit_bias"] = logit_bias
        if settings.itm:
            generator = shared if settings.negatives_from == "global" else local
            out.update(self._itm_pairs(out, image_tokens, text_hidden, text_padding, tokens, image_ids, generator))
        if settings.mlm:
            masked, labels = mask_tokens(tokens, self.mask_token_id, self.special_token_ids, self.vocab_size,
                                         settings.mlm_probability, generator=local)
            _, masked_hidden, masked_padding = text_features_and_tokens(self.clip, masked, pooled=False)
            chosen = labels != -100
            out["mlm_logits"] = self.fusion.mlm_logits(masked_hidden, masked_padding, image_tokens, positions=chosen)
            out["mlm_labels"] = labels[chosen]
        return out

    def _itm_pairs(self, out: dict, image_tokens: torch.Tensor, text_hidden: torch.Tensor,
                   text_padding: torch.Tensor, tokens: torch.Tensor, image_ids: Optional[torch.Tensor],
                   generator: torch.Generator) -> dict[str, torch.Tensor]:
        from ..distributed import all_gather_no_grad, all_gather_with_grad
        from .fusion_sampling import caption_keys, negative_pairs

        settings = self.fusion.settings
        across = settings.negatives_from == "global"
        if image_ids is not None:
            image_ids = image_ids.to(tokens.device).long().reshape(-1)
        text_for_image, image_for_text = negative_pairs(
            out["image_features"], out["text_features"], out["logit_scale"], image_ids, caption_keys(tokens),
            negatives=settings.negatives, generator=generator, across_ranks=across)
        all_image, all_hidden, all_padding = image_tokens, text_hidden, text_padding
        if across:
            # Negatives may live on other ranks; the gather keeps gradients (as the contrastive loss does).
            all_image, all_hidden = all_gather_with_grad(image_tokens), all_gather_with_grad(text_hidden)
            all_padding = all_gather_no_grad(text_padding.to(torch.uint8)).bool()
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        with_text, with_image = text_for_image >= 0, image_for_text >= 0
        neg_text, neg_image = text_for_image[with_text], image_for_text[with_image]
        images_in = torch.cat([image_tokens, image_tokens[rows[with_text]], all_image[neg_image]])
        hidden_in = torch.cat([text_hidden, all_hidden[neg_text], text_hidden[rows[with_image]]])
        padding_in = torch.cat([text_padding, all_padding[neg_text], text_padding[rows[with_image]]])
        logits = self.fusion.itm_logits(hidden_in, padding_in, images_in)
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        labels[:tokens.shape[0]] = 1
        return {"itm_logits": logits, "itm_labels": labels}

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

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the towers' block activations in the backward pass instead of storing them
        (``model.grad_checkpointing``): the same gradients, less memory, more compute. Uses each tower's own
        switch: open_clip's ViT / text transformer, timm's trunk, transformers' activation checkpointing
        (Hugging Face towers, non-reentrant). open_clip's ResNet has none (a warning); fusion heads stay as they are.

        Example:
            >>> model.set_grad_checkpointing()
            >>> model.clip.visual.transformer.grad_checkpointing
            True
        """
        from open_clip.hf_model import HFTextEncoder
        from open_clip.modified_resnet import ModifiedResNet
        from open_clip.timm_model import TimmModel

        from .hf_towers import set_hf_checkpointing

        if hasattr(self.clip, "hf_model"):  # transformers CLIP / SigLIP towers
            self.clip.set_grad_checkpointing(enable)
            return
        visual, text = self.clip.visual, getattr(self.clip, "text", None)
        if isinstance(visual, TimmModel):
            # open_clip's TimmModel would only log a warning; asked-for memory savings that never happen is an error.
            try:
                visual.trunk.set_grad_checkpointing(enable)
            except Exception as error:  # noqa: BLE001 - timm models refuse with assert or NotImplementedError
                raise ValueError(f"model.grad_checkpointing: the timm image tower {type(visual.trunk).__name__} does "
                                 f"not support it ({str(error) or type(error).__name__}); set it to false") from None
        else:
            if isinstance(visual, ModifiedResNet) and enable:
                logger.warning("model.grad_checkpointing: open_clip's ResNet image tower has no checkpointing; "
                               "only the text tower is checkpointed")
            visual.set_grad_checkpointing(enable)
        if isinstance(text, HFTextEncoder):
            set_hf_checkpointing(text.transformer, enable)  # open_clip's own call cannot turn it off
        elif text is not None:
            text.set_grad_checkpointing(enable)
        else:
            self.clip.transformer.grad_checkpointing = enable

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

    def save_pretrained(self, directory: Union[str, Path], state_dict: Optional[dict] = None) -> Path:
        """Write ``vlp_config.json`` + ``model.safetensors`` atomically: a crash leaves the old folder.
        Weights holding NaN or inf are refused (a ValueError naming a tensor); nothing is written then.
        ``state_dict`` replaces ``self.state_dict()`` (FSDP: the weights consolidated from every process)."""
        state = state_dict if state_dict is not None else self.state_dict()
        bad = first_non_finite(state)
        if bad is not None:
            raise ValueError(f"{directory}: not written: the weights hold NaN or inf values (e.g. in {bad})")
        return write_folder_atomically(Path(directory), lambda tmp: write_model_files(self, tmp, state_dict))


ITM_MISSING = "this model has no ITM fusion head (train one with model.fusion and loss.name albef)"


def _mask_and_special_ids(tokenizer: Any, pad_id: int) -> tuple[Optional[int], set[int]]:
    """The tokenizer's mask token id (None if it has none) and its special ids (pad, start / end of text,
    [CLS], [SEP], mask, ...)."""
    inner = getattr(tokenizer, "tokenizer", None)  # a Hugging Face tokenizer inside open_clip's / our wrapper
    if inner is not None and hasattr(inner, "all_special_ids"):
        return inner.mask_token_id, {int(i) for i in inner.all_special_ids} | {int(pad_id)}
    encoder = getattr(tokenizer, "encoder", {})  # open_clip's SimpleTokenizer
    special = {int(i) for i in getattr(tokenizer, "all_special_ids", [])} | {int(pad_id)}
    mask = encoder.get(MASK_TOKEN)
    return (int(mask) if mask is not None else None), special


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


def first_non_finite(state: dict[str, torch.Tensor]) -> Optional[str]:
    """The name of the first floating-point tensor of ``state`` holding a NaN or inf, or None.

    Example:
        >>> first_non_finite({"w": torch.tensor([1.0, float("nan")])})
        'w'
    """
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


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
