"""WiSE-FT's weight interpolation (Wortsman et al., 2022): a zero-shot model and its fine-tune, mixed.

``theta = (1 - alpha) * theta_zeroshot + alpha * theta_finetuned``, tensor by tensor. Between the two
ends, the mix often keeps most of the fine-tune's gain on its target task and most of the zero-shot
model's robustness elsewhere; :func:`vlpretrain.evaluation.wise_ft.wise_ft_sweep` measures that trade-off.

Example:
    >>> model = interpolate_weights("runs/lit/final", "runs/ft/final", alpha=0.5)
    >>> model.save_pretrained("runs/wise-0.5")
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..config import ModelConfig
from .dual_encoder import DualEncoder

__all__ = ["ModelSpec", "check_alpha", "check_same_architecture", "interpolate_weights", "mix_into", "alpha_name",
           "model_name", "load_spec"]

ModelSpec = Union[DualEncoder, str, Path, ModelConfig]

# Flags that only say how a tower was first initialised; they do not change the weights' layout.
_INIT_ONLY_KEYS = {"hf_model_pretrained", "timm_model_pretrained"}


def model_name(spec: ModelSpec, default: str) -> str:
    return default if isinstance(spec, DualEncoder) else str(spec)


def load_spec(spec: ModelSpec) -> DualEncoder:
    if isinstance(spec, DualEncoder):
        return spec
    from .factory import load_model

    return load_model(spec)


def check_alpha(alpha: float) -> float:
    """``alpha`` as a float in [0, 1], or a one-line ValueError."""
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        value = math.nan
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"alpha must be between 0 and 1 (0 = zero-shot, 1 = fine-tuned), got {alpha}")
    return value


def _architecture(model: DualEncoder) -> dict:
    """What must agree between the two models besides their weights' names and shapes."""
    clip = model.clip
    if getattr(clip, "hf_model", None) is not None:
        # A transformers CLIP / SigLIP: the state dict's keys and shapes pin the layout; the source
        # (hub id or folder) legitimately differs between a model and its fine-tune.
        return {"hf_model_type": getattr(clip, "model_type", type(clip.hf_model).__name__)}
    return {"open_clip_model_cfg": model.config_dict()["open_clip_model_cfg"]}


def _first_difference(a: Any, b: Any, prefix: str = "") -> Optional[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            if key in _INIT_ONLY_KEYS:
                continue
            if key not in a or key not in b:
                shown = [repr(side[key]) if key in side else "(unset)" for side in (a, b)]
                return f"{prefix}{key}: {shown[0]} vs {shown[1]}"
            difference = _first_difference(a[key], b[key], f"{prefix}{key}.")
            if difference:
                return difference
        return None
    return None if a == b else f"{prefix.rstrip('.')}: {a!r} vs {b!r}"


def check_same_architecture(zeroshot: DualEncoder, finetuned: DualEncoder, zeroshot_name: str = "zeroshot model",
                            finetuned_name: str = "finetuned model") -> None:
    """One-line ValueError naming both models and the first setting or weight that differs."""
    difference = _first_difference(_architecture(zeroshot), _architecture(finetuned))
    if difference is None:
        a, b = zeroshot.state_dict(), finetuned.state_dict()
        for key in list(a) + [k for k in b if k not in a]:
            if key not in b:
                difference = f"weight {key} only in {zeroshot_name}"
            elif key not in a:
                difference = f"weight {key} only in {finetuned_name}"
            elif a[key].shape != b[key].shape:
                difference = f"weight {key}: shape {tuple(a[key].shape)} vs {tuple(b[key].shape)}"
            if difference:
                break
    if difference:
        raise ValueError(f"cannot interpolate {zeroshot_name} and {finetuned_name}: not the same architecture "
                         f"(first difference: {difference}); WiSE-FT needs a model and a fine-tune of it")


@torch.no_grad()
def mix_into(target: DualEncoder, zeroshot_state: dict, finetuned_state: dict, alpha: float) -> None:
    mixed = {}
    for key, b in finetuned_state.items():
        a = zeroshot_state[key]
        if not torch.is_floating_point(b):
            mixed[key] = b  # integer buffers (counters, position ids) are not averaged
        elif alpha == 0.0:
            mixed[key] = a  # exact ends, even where the other model holds inf
        elif alpha == 1.0:
            mixed[key] = b
        else:
            a32 = a.to(device=b.device, dtype=torch.float32)
            mixed[key] = ((1 - alpha) * a32 + alpha * b.float()).to(b.dtype)
    target.load_state_dict(mixed, strict=True)
    if target.text_cache is not None:
        target.text_cache.clear()  # cached text features belong to the old weights


def interpolate_weights(zeroshot: ModelSpec, finetuned: ModelSpec, alpha: float) -> DualEncoder:
    """The WiSE-FT model ``(1 - alpha) * zeroshot + alpha * finetuned`` over every floating tensor.

    Both may be :class:`DualEncoder` objects (left unchanged) or anything ``load_model`` takes; integer
    buffers come from ``finetuned``, and so do the tokenizer, transforms and config of the result.

    Example:
        >>> model = interpolate_weights("open_clip:ViT-B-32/laion2b_s34b_b79k", "runs/ft/final", 0.5)
        >>> model.save_pretrained("runs/ft/wise-0.5")
    """
    alpha = check_alpha(alpha)
    zeroshot_name, finetuned_name = model_name(zeroshot, "zeroshot model"), model_name(finetuned, "finetuned model")
    zeroshot_model, finetuned_model = load_spec(zeroshot), load_spec(finetuned)
    check_same_architecture(zeroshot_model, finetuned_model, zeroshot_name, finetuned_name)
    # A model the caller handed in is theirs: mix into a copy. One loaded here can be reused.
    target = copy.deepcopy(finetuned_model) if isinstance(finetuned, DualEncoder) else finetuned_model
    mix_into(target, zeroshot_model.state_dict(), finetuned_model.state_dict(), alpha)
    return target


def alpha_name(alpha: float) -> str:
    return f"{alpha:g}"
