"""A model's signature: what an embedding set or index remembers of the model that made it.

The spec string (``runs/demo-emoji/final``, ``open_clip:ViT-B-32/openai``) says where the model came
from, but the same spec can point at different weights later (a retrained run in the same folder).
So the signature also stores the embeddings of a few fixed probe texts: a model that embeds them the
same way (cosine >= ``PROBE_MIN_COSINE``, which tolerates bf16 / device noise) is the same model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch

from ..inference import encode_texts

__all__ = ["model_signature", "stored_spec", "check_model_present", "check_same_model", "signature_cosine",
           "PROBE_TEXTS", "PROBE_MIN_COSINE"]

PROBE_TEXTS = ("a photo of a dog", "red heart", "grinning face", "a map of the world", "flag: france")
PROBE_MIN_COSINE = 0.99


def _probe_embeddings(model) -> torch.Tensor:
    return encode_texts(model, list(PROBE_TEXTS))


LOCAL_PREFIXES = ("hf:", "local-dir:")  # specs whose rest may be a local folder


def _local_part(spec: str) -> tuple[str, str]:
    """(prefix, path) of a spec naming a local file or folder: ``("", "runs/x")`` or ``("hf:", "/m/bert")``."""
    for prefix in LOCAL_PREFIXES:
        if spec.startswith(prefix):
            return prefix, spec[len(prefix):]
    return "", ("" if ":" in spec.split("/")[0] else spec)  # open_clip:ARCH/TAG names no local path


def stored_spec(spec: Optional[str]) -> Optional[str]:
    """The spec to store with embeddings and indexes: a local path made absolute (so queries work from
    any folder), anything else (``open_clip:ViT-B-32/openai``, a hub id) as given.

    Example:
        >>> stored_spec("runs/demo/final"), stored_spec("open_clip:ViT-B-32/openai")
        ('/home/me/project/runs/demo/final', 'open_clip:ViT-B-32/openai')
    """
    if spec is None:
        return None
    prefix, path = _local_part(str(spec))
    if path and Path(path).exists():
        return prefix + os.path.abspath(path)
    return str(spec)


def check_model_present(spec: str, where: str) -> None:
    """One-line error when the stored ``spec`` of ``where`` names a local path that is no longer there.

    Example:
        >>> check_model_present("/old/runs/demo/final", "indexes/emoji")
        FileNotFoundError: indexes/emoji was built with model /old/runs/demo/final, which is not there any more: ...
    """
    prefix, path = _local_part(str(spec))
    # hf:org/name may be a hub id: only an absolute path (as stored_spec writes local folders) is local.
    looks_local = bool(path) and (Path(path).is_absolute() or (not prefix and ("/" in path or path.endswith(
        (".yaml", ".yml")))))
    if looks_local and not Path(path).exists():
        raise FileNotFoundError(f"{where} was built with model {spec}, which is not there any more: pass --model "
                                f"with its new location (or model_spec= in Python)")


def model_signature(model, spec: Optional[str] = None) -> dict[str, Any]:
    """``{"model", "dim", "probe_texts", "probe_embeddings"}`` for a manifest or index info JSON.

    Example:
        >>> sig = model_signature(load_model("runs/demo-emoji/final"), "runs/demo-emoji/final")
        >>> sig["dim"]
        256
    """
    return {
        "model": stored_spec(spec),
        "dim": int(model.embed_dim),
        "probe_texts": list(PROBE_TEXTS),
        "probe_embeddings": [[round(float(v), 6) for v in row] for row in _probe_embeddings(model)],
    }


def check_same_model(stored: dict[str, Any], model, where: str, spec: Optional[str] = None,
                     made: str = "was built with",
                     advice: str = "query with the same model, or rebuild the index with this one") -> None:
    """Raise a one-line ``ValueError`` unless ``model`` is the model ``stored`` was made with.

    ``where`` names the index or embedding folder in the message, ``made`` how it came from the model,
    ``advice`` the remedy.

    Example:
        >>> check_same_model(info["signature"], load_model("runs/other/final"), "runs/index")
        ValueError: runs/index was built with model runs/demo-emoji/final (dim 256); ...
    """
    made_with = f"{made} model {stored.get('model') or '(unnamed)'} (dim {stored.get('dim')})"
    given = f"the given model {spec or '(unnamed)'}"
    if int(model.embed_dim) != int(stored.get("dim", -1)):
        raise ValueError(f"{where} {made_with}; {given} has dim {model.embed_dim}: {advice}")
    if stored.get("probe_texts") != list(PROBE_TEXTS) or not stored.get("probe_embeddings"):
        return  # written by a version with other probes: the dimension check is all we can do
    expected = torch.tensor(stored["probe_embeddings"], dtype=torch.float32)
    cosine = (torch.nn.functional.normalize(expected, dim=-1) * _probe_embeddings(model)).sum(-1).min().item()
    if cosine < PROBE_MIN_COSINE:
        raise ValueError(f"{where} {made_with}; {given} embeds text differently (probe cosine "
                         f"{cosine:.3f} < {PROBE_MIN_COSINE}): {advice}")


def signature_cosine(a: dict[str, Any], b: dict[str, Any]) -> Optional[float]:
    """Smallest cosine between the probe embeddings of two stored signatures (None when they used
    other probes and cannot be compared); below ``PROBE_MIN_COSINE`` they come from different models.

    Example:
        >>> signature_cosine(index_info["signature"], EmbeddingSet.open("emb/more").signature)
        1.0
    """
    if a.get("probe_texts") != b.get("probe_texts") or not a.get("probe_embeddings") or not b.get("probe_embeddings"):
        return None
    x, y = (torch.tensor(s["probe_embeddings"], dtype=torch.float64) for s in (a, b))
    if x.shape != y.shape:
        return None
    x, y = torch.nn.functional.normalize(x, dim=-1), torch.nn.functional.normalize(y, dim=-1)
    return float((x * y).sum(-1).min())
