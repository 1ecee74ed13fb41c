"""Saved zero-shot classifiers: the (D, C) class weights in a safetensors file, with a JSON header naming the
class names, the templates and the signature of the model that encoded them (never pickle).

A saved classifier is only used with the model that made it (same dimension, same embeddings of a few probe
texts, see :mod:`vlpretrain.retrieval.signature`) and the same class names, in the same order; anything else
is a one-line error, because the weights would silently score the wrong classes.

Example:
    >>> save_classifier("clf/emoji.safetensors", clf, model, model_spec="runs/demo/final")
    >>> weights = load_classifier("clf/emoji.safetensors", model, clf.classnames, model_spec="runs/demo/final")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from ..inference_precision import current_precision
from ..io import atomic_write
from ..retrieval.signature import check_same_model, model_signature

__all__ = ["CLF_FORMAT", "save_classifier", "load_classifier"]

CLF_FORMAT = "vlpretrain-zeroshot-classifier-v1"


def save_classifier(path: Union[str, Path], classifier: Any, model: Any, model_spec: Optional[str] = None) -> Path:
    """Write ``classifier.weights`` (a :class:`~vlpretrain.evaluation.zeroshot.ZeroShotClassifier`) to ``path``
    atomically, with its class names, templates and ``model``'s signature in the header.

    Raises:
        ValueError: weights that are not all finite (one line, naming the file; nothing is written).

    Example:
        >>> save_classifier("clf/emoji.safetensors", clf, model, "runs/demo/final")
        PosixPath('clf/emoji.safetensors')
    """
    from safetensors.torch import save_file

    header = {"format": CLF_FORMAT, "classnames": json.dumps(list(classifier.classnames)),
              "templates": json.dumps(classifier.templates),
              "signature": json.dumps(model_signature(model, model_spec))}
    weights = classifier.weights.detach().float().cpu().contiguous()
    if not weights.isfinite().all():  # fp16 / bf16 prompt encodings can overflow: such weights score nothing
        raise ValueError(f"--save-clf: {path}: the class weights hold NaN or inf (prompts encoded in "
                         f"{current_precision()}; fp16 / bf16 can overflow); not saved: rerun with --precision fp32")
    return atomic_write(Path(path), lambda tmp: save_file({"weights": weights}, str(tmp), metadata=header))


def load_classifier(path: Union[str, Path], model: Any, classnames: Sequence[str],
                    model_spec: Optional[str] = None) -> torch.Tensor:
    """The (D, C) class weights saved at ``path``, after checking they were made by ``model`` for ``classnames``.

    Raises:
        ValueError: not a saved classifier, another model, or other class names (one line, naming the file).

    Example:
        >>> weights = load_classifier("clf/emoji.safetensors", model, ["flags", "food"], "runs/demo/final")
        >>> ZeroShotClassifier(model, ["flags", "food"], weights=weights)
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--load-clf: {path} not found (write one with --save-clf)")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            weights = f.get_tensor("weights") if "weights" in f.keys() else None
    except (SafetensorError, OSError) as e:
        raise ValueError(f"--load-clf: {path} is not a safetensors file ({e}); write it with --save-clf") from None
    if header.get("format") != CLF_FORMAT or weights is None:
        raise ValueError(f"--load-clf: {path} is not a saved zero-shot classifier (format "
                         f"{header.get('format')!r}, expected {CLF_FORMAT!r}); write it with --save-clf")
    missing = [key for key in ("signature", "classnames") if key not in header]
    if missing:
        raise ValueError(f"--load-clf: {path}: its header has no {' or '.join(missing)} (damaged, or not written by "
                         f"--save-clf); save a new one with --save-clf")
    check_same_model(json.loads(header["signature"]), model, f"--load-clf: {path}", model_spec, made="was made with",
                     advice="load it with that model, or save a new one with --save-clf")
    stored = json.loads(header["classnames"])
    if stored != list(classnames):
        first = next((i for i, (a, b) in enumerate(zip(stored, classnames)) if a != b), min(len(stored), len(classnames)))
        where = (f"class {first + 1} is {stored[first]!r} there, {list(classnames)[first]!r} here"
                 if first < min(len(stored), len(classnames)) else "")
        raise ValueError(f"--load-clf: {path} holds {len(stored)} classes, this data set has {len(classnames)}"
                         f"{'; ' + where if where else ''}: use the same class names, or save a new one with --save-clf")
    return weights
