"""What each numeric recipe key allows, in one table, checked when a recipe loads.

Every ``int`` / ``float`` key of the recipe dataclasses has an entry (a test holds this), and so do the
numeric keys of the free-form mappings (``model.vision``, ``model.text``, ``model.fusion``,
``data.augmentation``) that we know of. A value outside its range is a one-line :class:`ConfigError`
naming the dotted key, the value and what is allowed.

Example:
    >>> recipe_from_dict({}, ["train.epochs=0"])
    Traceback (most recent call last):
    ConfigError: train.epochs must be >= 1, got 0
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from .config import ConfigError

if TYPE_CHECKING:
    from .config import RecipeConfig


@dataclass(frozen=True)
class Range:
    """The values a numeric recipe key allows: finite, between ``low`` and ``high`` (None: unbounded),
    each bound closed unless ``*_open``; ``hint`` is shown after the range (an example, what null means)."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    hint: str = ""

    def allows(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        # Python ints are exact (and may be too large for a float): only floats can be inf, NaN or fractional.
        if isinstance(value, float) and (not math.isfinite(value) or (self.integer and not value.is_integer())):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def describe(self) -> str:
        """``in [0, 1)``, ``a finite number > 0``, ``an integer >= 1``, then the hint in parentheses."""
        low, high = (None if b is None else (int(b) if float(b).is_integer() else b) for b in (self.low, self.high))
        if low is not None and high is not None:
            text = f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        else:
            text = (f"{'>' if self.low_open else '>='} {low}" if low is not None else
                    f"{'<' if self.high_open else '<='} {high}" if high is not None else "")
        if self.integer:
            text = f"an integer {text}"
        elif low is None or high is None:
            text = f"a finite number {text}".strip()
        return text + (f" ({self.hint})" if self.hint else "")


_COUNT, _SIZE = Range(0, integer=True), Range(1, integer=True)
_PROBABILITY, _FRACTION = Range(0, 1), Range(0, 1, high_open=True)
_POSITIVE, _NON_NEGATIVE, _FINITE = Range(0, low_open=True), Range(0), Range()

# Every numeric recipe key and what it allows, checked when a recipe loads; keys inside the free-form
# mappings (model.vision, data.augmentation, ...) are checked when present. A list value is checked
# element by element (image_size: [h, w], color_jitter: [b, c, s, h]); null always passes (unset).
RANGES: dict[str, Range] = {
    "model.embed_dim": _SIZE,
    "model.init_logit_scale": _FINITE,
    "model.max_logit_scale": _NON_NEGATIVE,
    "model.lock_image_unlocked_groups": _COUNT,
    "model.lock_text_unlocked_layers": _COUNT,
    "model.cached_text_dropout": _FRACTION,
    "model.image_mean": _FINITE,
    "model.image_std": _POSITIVE,
    **{f"model.vision.{k}": _SIZE for k in ("image_size", "patch_size", "width", "layers", "head_width",
                                             "attn_pooler_queries", "attn_pooler_heads")},
    **{f"model.vision.{k}": _FRACTION for k in ("patch_dropout", "timm_drop", "timm_drop_path")},
    "model.vision.mlp_ratio": _POSITIVE,
    **{f"model.text.{k}": _SIZE for k in ("context_length", "vocab_size", "width", "heads", "layers")},
    "model.text.mlp_ratio": _POSITIVE,
    **{f"model.fusion.{k}": _SIZE for k in ("layers", "width", "heads")},
    "model.fusion.mlp_ratio": _POSITIVE,
    "model.fusion.mlm_probability": Range(0, 1, low_open=True),
    "data.num_workers": _COUNT,
    "data.train_num_samples": _SIZE,
    "data.shuffle_buffer": Range(0, integer=True, hint="0: no shuffle buffer"),
    "data.max_pixels": _SIZE,
    **{f"data.augmentation.{k}": _PROBABILITY for k in ("color_jitter_prob", "gray_scale_prob", "re_prob",
                                                        "blur_prob", "shade_prob")},
    "data.augmentation.re_count": _SIZE,
    "data.augmentation.scale": Range(0, 1, low_open=True),
    "data.augmentation.ratio": _POSITIVE,
    "data.augmentation.color_jitter": _NON_NEGATIVE,
    "data.augmentation.blur_sigma": _POSITIVE,
    "data.augmentation.shade_strength": _FRACTION,
    "train.epochs": _SIZE,
    "train.max_steps": Range(1, integer=True, hint="null: train.epochs decide"),
    "train.batch_size": _SIZE,
    "train.accum_freq": Range(1, integer=True, hint="1: no accumulation"),
    "train.lr": _NON_NEGATIVE,  # 0 is allowed: a run that changes nothing (tests use it as a control)
    "train.weight_decay": _NON_NEGATIVE,
    "train.beta1": _FRACTION,
    "train.beta2": _FRACTION,
    "train.eps": _POSITIVE,
    "train.warmup_steps": _COUNT,
    "train.min_lr_ratio": _PROBABILITY,
    "train.grad_clip_norm": Range(0, hint="0 or null: no clipping"),
    "train.layer_decay": Range(0, 1, low_open=True, hint="e.g. 0.75; null turns it off"),
    "train.ema_decay": Range(0, 1, high_open=True, hint="e.g. 0.999"),
    "train.checkpoint_every": Range(0, integer=True, hint="0 or null: only at the end"),
    "train.keep_checkpoints": Range(0, integer=True, hint="0 keeps all"),
    "train.log_every": _SIZE,
    "train.seed": Range(0, 2**32 - 1, integer=True),
    "train.threads": _SIZE,
    "train.profile_steps": Range(0, integer=True, hint="0: no profiling"),
    "train.max_nonfinite_steps": _SIZE,
    "train.monitor_every": Range(0, integer=True, hint="0: no monitors"),
    "train.eval_every_epochs": _SIZE,
    "loss.weight": _NON_NEGATIVE,
    "loss.itc_weight": _NON_NEGATIVE,
    "loss.itm_weight": _NON_NEGATIVE,
    "loss.mlm_weight": _NON_NEGATIVE,
    "loss.momentum": Range(0, 1, low_open=True, high_open=True, hint="e.g. 0.995; null: no momentum model"),
    "loss.queue_size": Range(0, integer=True, hint="0: no queue"),
    "loss.distill_alpha": _PROBABILITY,
    "loss.distill_warmup_steps": Range(0, integer=True, hint="null: one epoch"),
    "loss.ssl_weight": _NON_NEGATIVE,
    "loss.ssl_temperature": Range(0, low_open=True, hint="SLIP uses 0.1"),
}


def check_ranges(cfg: "RecipeConfig") -> None:
    """Refuse the first value outside its :data:`RANGES` entry with a one-line :class:`ConfigError`
    (``recipe_from_dict`` calls it; so does the trainer, for recipes built in Python).

    Example:
        >>> cfg = RecipeConfig()
        >>> cfg.train.epochs = 0
        >>> check_ranges(cfg)
        Traceback (most recent call last):
        ConfigError: train.epochs must be >= 1, got 0
    """
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for f in dataclasses.fields(values):
            key, value = f"{section.name}.{f.name}", getattr(values, f.name)
            entries = value.items() if isinstance(value, dict) else [(None, value)]
            for sub, item in entries:
                dotted = key if sub is None else f"{key}.{sub}"
                rule = RANGES.get(dotted)
                parts = item if isinstance(item, (list, tuple)) else [item]
                if rule is not None and not all(part is None or rule.allows(part) for part in parts):
                    raise ConfigError(f"{dotted} must be {rule.describe()}, got {item!r}")
