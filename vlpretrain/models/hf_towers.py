"""Hugging Face CLIP and SigLIP models (transformers ``CLIPModel`` / ``SiglipModel``) as dual towers.

:class:`HFDualTowers` stands where a :class:`DualEncoder` usually holds an open_clip model: it has the
same ``encode_image`` / ``encode_text`` / ``logit_scale`` / ``lock_*_tower`` interface, computed by
the transformers model itself (``get_image_features`` / ``get_text_features``), so its embeddings
are exactly the ones transformers gives. ``save_hf`` writes a folder transformers loads back.

Example:
    >>> model = vlpretrain.load_model("hf:openai/clip-vit-base-patch32")   # or "hf:/path/to/folder"
    >>> model.clip.model_type, model.context_length
    ('clip', 77)
"""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from ..io import read_json

logger = logging.getLogger(__name__)

# model_type in config.json -> the transformers model class that holds both towers.
SUPPORTED_MODEL_TYPES = {"clip": "CLIPModel", "siglip": "SiglipModel"}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_PIL_INTERPOLATION = {2: "bilinear", 3: "bicubic"}


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _is_local(source: str) -> bool:
    """True for an existing path; a missing path that cannot be a hub id is a one-line error."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{source}: is a file; model.hf_model takes a transformers CLIP or SigLIP folder "
                             f"or a hub id (e.g. openai/clip-vit-base-patch32)")
        return True
    if source.startswith(("/", ".", "~")) or not _HUB_ID.fullmatch(source):
        raise ValueError(f"{source}: no such folder; model.hf_model takes a transformers CLIP or SigLIP folder "
                         f"or a hub id (e.g. openai/clip-vit-base-patch32)")
    return False


def _check_model_type(model_type: Optional[str], where: str) -> str:
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{where}: model_type '{model_type}' is not a CLIP or SigLIP model "
                         f"(model.hf_model takes transformers CLIPModel or SiglipModel folders)")
    return model_type


def load_hf_config(source: str, config_dict: Optional[dict] = None):
    """The transformers config of ``source`` (a folder or hub id), or rebuilt from ``config_dict``."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if config_dict is not None:
        model_type = _check_model_type(config_dict.get("model_type"), f"{source} (saved config)")
        return CONFIG_MAPPING[model_type].from_dict(config_dict)
    if _is_local(source):
        config_path = Path(source).expanduser() / "config.json"
        if not config_path.is_file():
            raise ValueError(f"{source}: not a transformers model folder (no config.json)")
        values = read_json(config_path)
        _check_model_type(values.get("model_type") if isinstance(values, dict) else None, str(source))
        return AutoConfig.from_pretrained(str(Path(source).expanduser()))
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ValueError(f"{source}: not a local folder, and the Hugging Face hub copy cannot be loaded "
                         f"({_first_line(e)}); pass a local folder or download it once online") from None
    _check_model_type(config.model_type, source)
    return config


@contextlib.contextmanager
def _quiet_transformers():
    """transformers prints a many-line load report on a mismatch; we raise one line of our own instead."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_UNUSED_V4 = re.compile(r"were not used when initializing \w+: \[([^\]]*)\]")


def _only_unused_pooler(message: str) -> bool:
    """True for a transformers load report whose only finding is unused ``pooler.*`` checkpoint weights:
    a BERT-style text tower loaded without its pooler (open_clip pools the tokens itself), as expected.
    transformers 5 writes a table (``LOAD REPORT``: key | status rows), 4.x one sentence with the keys."""
    text = _ANSI.sub("", message)
    if "LOAD REPORT" in text:
        lines = text.splitlines()
        start = next((i for i, line in enumerate(lines) if line.startswith("-") and "-+-" in line), None)
        if start is None:
            return False
        rows = []
        for line in lines[start + 1:]:
            if not line.strip():
                break
            rows.append([cell.strip() for cell in line.split(" | ")])
        return bool(rows) and all(len(r) >= 2 and r[0].startswith("pooler.") and r[1] == "UNEXPECTED" for r in rows)
    found = _UNUSED_V4.search(text)
    if found is None or "newly initialized" in text:
        return False
    keys = [k.strip().strip("'\"") for k in found.group(1).split(",") if k.strip()]
    return bool(keys) and all(k.startswith("pooler.") for k in keys)


class _UnusedPoolerFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _only_unused_pooler(record.getMessage())


@contextlib.contextmanager
def quiet_unused_pooler():
    """Drop transformers' load report while a BERT / MiniLM text tower loads without its pooler (every
    LiT run would print it); any other finding of the report (missing, mismatched, other unused
    weights) is still logged in full.

    Example:
        >>> with quiet_unused_pooler():
        ...     clip = open_clip.CustomTextCLIP(vision_cfg=..., text_cfg={"hf_model_name": folder, ...})
    """
    target = logging.getLogger("transformers.modeling_utils")
    quiet = _UnusedPoolerFilter()
    target.addFilter(quiet)
    try:
        yield
    finally:
        target.removeFilter(quiet)


def _check_local_weights(folder: Path) -> None:
    from safetensors import SafetensorError, safe_open

    present = [folder / name for name in WEIGHT_FILES if (folder / name).is_file()]
    if not present:
        raise ValueError(f"{folder}: no weights file ({WEIGHT_FILES[0]} or {WEIGHT_FILES[2]}); "
                         f"pass a folder written by save_pretrained")
    if present[0].name == "model.safetensors":
        # Opening reads and checks the header against the file size: catches truncated downloads.
        try:
            with safe_open(str(present[0]), framework="pt"):
                pass
        except (SafetensorError, OSError):
            raise ValueError(f"{present[0]}: unreadable or truncated weights file") from None


def load_hf_model(source: str, config, load_pretrained: bool = True) -> nn.Module:
    """A transformers CLIPModel / SiglipModel: the weights of ``source``, or random init from ``config``."""
    from safetensors import SafetensorError
    from transformers import AutoModel

    if not load_pretrained:
        return AutoModel.from_config(config, dtype=torch.float32)
    local = _is_local(source)
    if local:
        _check_local_weights(Path(source).expanduser())
    try:
        with _quiet_transformers():
            # float32 whatever the stored dtype: training keeps float32 master weights (autocast does the rest).
            model, info = AutoModel.from_pretrained(str(Path(source).expanduser()) if local else source,
                                                    config=config, dtype=torch.float32,
                                                    ignore_mismatched_sizes=True, output_loading_info=True)
    except (SafetensorError, OSError, EOFError, RuntimeError) as e:
        raise ValueError(f"{source}: cannot load the weights ({_first_line(e)})") from None
    missing, mismatched = sorted(info.get("missing_keys") or []), sorted(info.get("mismatched_keys") or [])
    if missing or mismatched:
        example = (missing or [m[0] if isinstance(m, tuple) else m for m in mismatched])[0]
        raise ValueError(f"{source}: the weights do not fit its {config.model_type} config.json "
                         f"({len(missing)} missing, {len(mismatched)} of another shape, e.g. {example}); "
                         f"are they another model's?")
    if info.get("unexpected_keys"):
        logger.warning("%s: ignored %d weights the %s model has no place for (e.g. %s)", source,
                       len(info["unexpected_keys"]), config.model_type, sorted(info["unexpected_keys"])[0])
    return model


class HFTokenizer:
    """A transformers tokenizer as the towers were trained with it: every text padded (and truncated)
    to ``context_length`` tokens, returning only the token ids.

    CLIP pools the end-of-text token under a causal mask, so padding after it changes nothing;
    SigLIP pools the last position and was trained on ``padding="max_length"`` (64 tokens).

    Example:
        >>> tokenizer = HFTokenizer(AutoTokenizer.from_pretrained(folder), context_length=77)
        >>> tokenizer(["a photo of a cat"]).shape
        torch.Size([1, 77])
    """

    def __init__(self, tokenizer: Any, context_length: int, source: str = ""):
        self.tokenizer = tokenizer
        self.context_length = int(context_length)
        self.source = source

    def __call__(self, texts: Union[str, list[str]], context_length: Optional[int] = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        length = int(context_length or self.context_length)
        return self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=length,
                              return_tensors="pt")["input_ids"]


# A local folder needs one of these; otherwise AutoTokenizer would quietly build an empty vocabulary.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "spiece.model", "tokenizer.model", "sentencepiece.bpe.model")


def load_hf_tokenizer(source: str, context_length: int) -> HFTokenizer:
    """The folder's (or hub model's) own tokenizer, wrapped in :class:`HFTokenizer`."""
    from transformers import AutoTokenizer

    folder = Path(source).expanduser()
    local = folder.is_dir()
    if local and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"{source}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}); save the "
                         f"model's tokenizer into the folder with tokenizer.save_pretrained")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder) if local else source)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds here; all mean "no tokenizer"
        if "sentencepiece" in str(e).lower():
            raise ValueError(f"{source}: its tokenizer is SentencePiece (SigLIP's), which needs the "
                             f"sentencepiece package: pip install sentencepiece") from None
        raise ValueError(f"{source}: cannot load its tokenizer ({_first_line(e)})") from None
    return HFTokenizer(tokenizer, context_length, source=source)


def _size_of(value: Any, key_options: tuple[str, ...]) -> Optional[int]:
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        for key in key_options:
            if value.get(key):
                return int(value[key])
    return None


def load_image_settings(source: str, config) -> dict:
    """Image size, resize, mean / std and interpolation from the folder's ``preprocessor_config.json``
    (falling back to what the model type uses). CLIP resizes the shortest side then center-crops;
    SigLIP resizes the whole image to a square."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    model_type = config.model_type
    image_size = int(config.vision_config.image_size)
    values: dict = {}
    path: Optional[Path] = Path(source).expanduser() / "preprocessor_config.json"
    if not path.is_file():
        path = None
        if not Path(source).expanduser().exists():
            with contextlib.suppress(Exception):
                from transformers.utils import cached_file

                found = cached_file(source, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
                path = Path(found) if found else None
    if path is not None:
        values = read_json(path)
    if model_type == "clip":
        crop = _size_of(values.get("crop_size"), ("height", "width")) or image_size
        resize = _size_of(values.get("size"), ("shortest_edge", "height")) or crop
        default_mean, default_std, resize_mode = OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, "shortest"
    else:
        crop = resize = _size_of(values.get("size"), ("height", "width")) or image_size
        default_mean, default_std, resize_mode = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "squash"
    return {
        "model_type": model_type,
        "image_size": int(crop),
        "resize_size": int(resize),
        "resize_mode": resize_mode,
        "mean": [float(v) for v in values.get("image_mean") or default_mean],
        "std": [float(v) for v in values.get("image_std") or default_std],
        "resample": int(values.get("resample", 3)),
        "interpolation": _PIL_INTERPOLATION.get(int(values.get("resample", 3)), "bicubic"),
    }


def set_hf_checkpointing(model: nn.Module, enable: bool = True) -> None:
    """Turn a transformers model's activation checkpointing on or off (non-reentrant, so it works whatever
    its inputs; transformers 5 names it ``activation_checkpointing_enable``, 4.x ``gradient_checkpointing_enable``).

    Example:
        >>> set_hf_checkpointing(towers.hf_model)
        >>> towers.hf_model.text_model.encoder.layers[0].gradient_checkpointing
        True
    """
    new_names = hasattr(model, "activation_checkpointing_enable")
    if not enable:
        (model.activation_checkpointing_disable if new_names else model.gradient_checkpointing_disable)()
    elif new_names:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _set_trainable(params, flag: bool) -> None:
    for param in params:
        param.requires_grad = flag


class HFDualTowers(nn.Module):
    """A transformers CLIPModel or SiglipModel behind open_clip's CLIP interface.

    ``encode_image`` / ``encode_text`` are the model's own ``get_image_features`` /
    ``get_text_features`` (projected, pooled), normalized on request; ``logit_scale`` and
    ``logit_bias`` (SigLIP only) are the model's parameters, so ``save_hf`` carries trained values.

    Example:
        >>> towers = HFDualTowers(CLIPModel.from_pretrained(folder), source=folder)
        >>> towers.encode_image(pixels).shape
        torch.Size([2, 512])
    """

    def __init__(self, hf_model: nn.Module, source: str, tokenizer: Any = None,
                 image_settings: Optional[dict] = None):
        super().__init__()
        self.hf_model = hf_model
        self.source = str(source)
        self.model_type = _check_model_type(hf_model.config.model_type, self.source)
        # Kept (not as modules) so save_hf can write a complete folder: tokenizer + image processor.
        self.hf_tokenizer = tokenizer
        self.image_settings = dict(image_settings or {})

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.hf_model.logit_scale

    @property
    def logit_bias(self) -> Optional[nn.Parameter]:
        return getattr(self.hf_model, "logit_bias", None)

    @property
    def embed_dim(self) -> int:
        config = self.hf_model.config
        if self.model_type == "clip":
            return int(config.projection_dim)
        return int(getattr(config.text_config, "projection_size", None) or config.vision_config.hidden_size)

    @property
    def context_length(self) -> int:
        return int(self.hf_model.config.text_config.max_position_embeddings)

    @property
    def image_size(self) -> int:
        return int(self.image_settings.get("image_size") or self.hf_model.config.vision_config.image_size)

    @staticmethod
    def _pooled(output: Any) -> torch.Tensor:
        # transformers 5 returns an output whose pooler_output is the projected embedding; 4.x a tensor.
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self._pooled(self.hf_model.get_image_features(pixel_values=images))
        return nn.functional.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        # No attention mask, as both models were trained (see HFTokenizer).
        features = self._pooled(self.hf_model.get_text_features(input_ids=tokens))
        return nn.functional.normalize(features, dim=-1) if normalize else features

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing in both towers (open_clip's name for it, so DualEncoder calls one method)."""
        set_hf_checkpointing(self.hf_model, enable)

    def _tower_groups(self, which: str) -> list[list[nn.Parameter]]:
        """[embeddings (+ pre-norm)], one group per encoder layer, [final norm + head / projection]."""
        tower = self.hf_model.vision_model if which == "image" else self.hf_model.text_model
        projection = getattr(self.hf_model, "visual_projection" if which == "image" else "text_projection", None)
        layers = list(tower.encoder.layers)
        in_layers = {id(p) for layer in layers for p in layer.parameters()}
        bottom, top = [], []
        for name, param in tower.named_parameters():
            if id(param) in in_layers:
                continue
            (bottom if name.startswith(("embeddings.", "pre_layrnorm.")) else top).append(param)
        if projection is not None:
            top.extend(projection.parameters())
        return [bottom, *[list(layer.parameters()) for layer in layers], top]

    def _lock(self, which: str, unlocked: int, freeze_layer_norm: bool, key: str) -> None:
        groups = self._tower_groups(which)
        if unlocked < 0 or unlocked > len(groups):
            raise ValueError(f"{key}={unlocked}, but the {which} tower has {len(groups)} groups "
                             f"(embeddings, {len(groups) - 2} layers, head)")
        for group in groups:
            _set_trainable(group, False)
        for group in groups[len(groups) - unlocked:] if unlocked else []:
            _set_trainable(group, True)
        if not freeze_layer_norm:
            tower = self.hf_model.vision_model if which == "image" else self.hf_model.text_model
            for module in tower.modules():
                if isinstance(module, nn.LayerNorm):
                    _set_trainable(module.parameters(), True)

    def lock_image_tower(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        """Freeze the image tower (with its projection / pooling head) except its last ``unlocked_groups``
        groups: 1 = the head, 2 = head + last layer, ... ``freeze_bn_stats`` is moot (a ViT has no BN)."""
        self._lock("image", unlocked_groups, freeze_layer_norm=True, key="model.lock_image_unlocked_groups")

    def lock_text_tower(self, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> None:
        """Freeze the text tower (with its projection / head) except its last ``unlocked_layers`` groups,
        counted as in :meth:`lock_image_tower`; ``freeze_layer_norm=False`` keeps LayerNorms trainable."""
        self._lock("text", unlocked_layers, freeze_layer_norm, key="model.lock_text_unlocked_layers")

    def image_processor(self):
        """A transformers image processor with this model's preprocessing (for ``save_hf``)."""
        from transformers import CLIPImageProcessor, SiglipImageProcessor

        s = self.image_settings or load_image_settings(self.source, self.hf_model.config)
        common = {"image_mean": s["mean"], "image_std": s["std"], "resample": s["resample"]}
        if self.model_type == "clip":
            return CLIPImageProcessor(size={"shortest_edge": s["resize_size"]},
                                      crop_size={"height": s["image_size"], "width": s["image_size"]}, **common)
        return SiglipImageProcessor(size={"height": s["image_size"], "width": s["image_size"]}, **common)

    def save_support_files(self, directory: Union[str, Path]) -> Path:
        """config.json, tokenizer files and preprocessor_config.json: everything but the weights."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.hf_model.config.save_pretrained(directory)
        if self.hf_tokenizer is not None:
            self.hf_tokenizer.save_pretrained(directory)
        self.image_processor().save_pretrained(directory)
        return directory

    def save_hf(self, directory: Union[str, Path]) -> Path:
        """A folder ``transformers.AutoModel`` / ``AutoTokenizer`` / ``AutoImageProcessor`` load.

        Example:
            >>> model.clip.save_hf("exported/")
            >>> CLIPModel.from_pretrained("exported/")
        """
        directory = self.save_support_files(directory)
        self.hf_model.save_pretrained(directory, safe_serialization=True)
        return directory


def load_hf_towers(source: str, load_pretrained: bool = True, config_dict: Optional[dict] = None,
                   support: Optional[str] = None) -> tuple[HFDualTowers, HFTokenizer]:
    """Towers and tokenizer of a transformers CLIP / SigLIP folder or hub id.

    ``config_dict`` (a saved ``config.to_dict()``) replaces the source's config.json and ``support``
    (a folder with tokenizer and preprocessor files) its tokenizer: how our checkpoints reload
    without the original folder.

    Example:
        >>> towers, tokenizer = load_hf_towers("openai/clip-vit-base-patch32")
    """
    source = str(source)
    config = load_hf_config(source, config_dict)
    support = str(support or source)
    # The tokenizer first: a missing one is found before minutes of loading weights.
    tokenizer = load_hf_tokenizer(support, int(config.text_config.max_position_embeddings))
    model = load_hf_model(source, config, load_pretrained)
    settings = load_image_settings(support, config)
    return HFDualTowers(model, source, tokenizer=tokenizer.tokenizer, image_settings=settings), tokenizer
