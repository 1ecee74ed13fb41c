"""The precision of every forward of :mod:`vlpretrain.inference`: fp32 (the default), or autocast to bf16 / fp16
on the model's device, as CLIP_benchmark's ``--precision amp`` runs. Features stay unit-norm float32 either way.

It is a context variable rather than a parameter, so each encoding function keeps its signature and a command
sets it once around all its work.

Example:
    >>> with inference_precision("bf16"):
    ...     features = encode_images(model, ["a.png"])     # encoded under torch.autocast(dtype=bfloat16)
    >>> current_precision()
    'fp32'
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import ContextManager, Iterator

import torch

__all__ = ["PRECISIONS", "inference_precision", "current_precision", "precision_autocast"]

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_PRECISION: contextvars.ContextVar[str] = contextvars.ContextVar("vlpretrain_precision", default="fp32")


@contextlib.contextmanager
def inference_precision(name: str) -> Iterator[str]:
    """Encode in ``name`` precision (``fp32``, ``bf16`` or ``fp16``) inside the block.

    Example:
        >>> with inference_precision("fp16"):
        ...     report = evaluate_zeroshot(model, data)
    """
    if name not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    token = _PRECISION.set(name)
    try:
        yield name
    finally:
        _PRECISION.reset(token)


def current_precision() -> str:
    """The precision set by the innermost :func:`inference_precision` (``fp32`` outside any).

    Example:
        >>> current_precision()
        'fp32'
    """
    return _PRECISION.get()


def precision_autocast(model: torch.nn.Module) -> ContextManager:
    """``torch.autocast`` on ``model``'s device for the current precision, or a no-op for fp32.

    Example:
        >>> with torch.no_grad(), precision_autocast(model):
        ...     features = model.encode_image(images)
    """
    dtype = PRECISIONS[_PRECISION.get()]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(next(model.parameters()).device.type, dtype=dtype)
