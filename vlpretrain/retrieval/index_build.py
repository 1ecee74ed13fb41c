"""An index built from all its vectors in memory: trained on a sample, tuned and measured (see index.py).

Example:
    >>> index, meta, info = build_in_memory(open_sets("emb/pairs"), info, parse_memory("4GB"), progress=False)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .faiss_index import build_faiss_index, factory_string
from .index_recall import (MEASURE_QUERIES, TUNE_QUERIES, measure, other_modality, query_ids, recall_warnings,
                           sample_other, split_other, tune)
from .index_sources import collect

__all__ = ["build_in_memory"]


def build_in_memory(sets: list, info: dict[str, Any], budget: int, progress: bool) -> tuple[Any, Any, dict[str, Any]]:
    """Build an index of kind ``info["kind"]`` from all vectors in memory, tuned and measured; the
    index, its meta rows and ``info`` completed.

    Example:
        >>> index, meta, info = build_in_memory(open_sets("emb/pairs"), {"modality": "image", "kind": "flat",
        ...                                     "seed": 0, ...}, parse_memory("4GB"), progress=False)
    """
    modality, chosen, seed = info["modality"], info["kind"], info["seed"]
    base, meta, skipped = collect(sets, modality, 0, 0)
    n, dim = base.shape
    if n == 0:
        raise ValueError(f"{', '.join(str(e.path) for e in sets)}: no {modality} embeddings to index "
                         f"(all {skipped} images were undecodable)")
    rng = np.random.default_rng(seed)
    measure_ids, tune_ids = query_ids(n, rng)
    other = sample_other(sets, other_modality(modality), MEASURE_QUERIES + TUNE_QUERIES, rng)
    index = build_faiss_index(base, chosen, memory_budget=budget, seed=seed, progress=progress,
                              holdout=np.union1d(measure_ids, tune_ids))
    warnings: list[str] = []
    if chosen == "flat":
        params: dict[str, int] = {}
        recall = {f"{modality}_queries": 1.0, f"{other_modality(modality)}_queries": 1.0 if len(other) else None,
                  "num_queries": 0, "exact": True}
    else:
        other_measure, other_tune = split_other(other)
        params = tune(index, base, [base[tune_ids], other_tune])
        recall = measure(index, base, base[measure_ids], other_measure, modality)
        warnings += recall_warnings(recall, modality, chosen)
    if not len(other):
        warnings.append(f"no {other_modality(modality)} embeddings in the sources: {other_modality(modality)}-query recall "
                        f"was not measured")
    recall = {"image_queries": recall.get("image_queries"), "text_queries": recall.get("text_queries"),
              "num_queries": recall["num_queries"], "exact": recall["exact"]}
    info = dict(info, factory=factory_string(chosen, n, dim, budget), ntotal=int(index.ntotal), search_params=params,
                **{"recall@10": recall}, warnings=warnings, skipped_bad_images=int(skipped))
    return index, meta, info
