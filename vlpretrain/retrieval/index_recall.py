"""How well an approximate index finds the exact top 10: query samples, tuning of search parameters, recall@10.

recall@10 is measured against exact search for queries of both modalities: same-modality queries
drawn from the indexed vectors, cross-modal ones from the other modality's embeddings (quantization
hurts those more, so they are measured and warned about separately).

Example:
    >>> measure_ids, tune_ids = query_ids(len(base), np.random.default_rng(0))
    >>> params = tune(index, base, [base[tune_ids]])
    >>> measure(index, base, base[measure_ids], text_queries, "image")["image_queries"]
    0.97
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .faiss_index import exact_search, recall_at_k, set_search_params, tune_search_params

__all__ = ["RECALL_K", "MEASURE_QUERIES", "TUNE_QUERIES", "sample_other", "query_ids", "split_other",
           "measure", "other_modality", "tune", "recall_warnings"]

RECALL_K = 10
MEASURE_QUERIES = 1000  # per modality, for the recall written to info.json
TUNE_QUERIES = 500  # per modality, for tuning; disjoint from the measured ones when the data allows
TUNE_TARGET = 0.95
TEXT_RECALL_FLOOR = 0.9
TEXT_RECALL_GAP = 0.05


def sample_other(sets: list, modality: str, count: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``count`` random non-zero ``modality`` embeddings of ``sets`` (cross-modal queries), read with
    explicit reads (:class:`NpyRows`), so that sampling shards larger than memory maps none of them."""
    from .ondisk_reads import NpyRows

    shards = [NpyRows(emb.path / modality / f"{k:06d}.npy") for emb in sets
              if modality in emb.manifest.get("modalities", []) for k in range(int(emb.manifest["num_shards"]))]
    sizes = np.array([len(a) for a in shards], dtype=np.int64)
    total = int(sizes.sum())
    if total == 0:
        return np.zeros((0, 0), np.float32)
    # A few extra draws make up for zero vectors (undecodable images) that are dropped.
    picks = np.sort(rng.choice(total, size=min(total, count + count // 10 + 8), replace=False))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    which = np.searchsorted(starts, picks, side="right") - 1
    # picks are sorted, so shard by shard is the order of picks
    rows = np.concatenate([shards[w].rows(picks[which == w] - starts[w]) for w in np.unique(which)])
    rows = rows[np.linalg.norm(rows, axis=1) > 0]
    return np.ascontiguousarray(rng.permutation(rows)[:count])


def query_ids(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint (measure, tune) samples of base ids; with too few vectors, tuning reuses measured ids."""
    order = rng.permutation(n)
    measure = order[:MEASURE_QUERIES]
    tune = order[MEASURE_QUERIES:MEASURE_QUERIES + TUNE_QUERIES]
    if len(tune) < min(TUNE_QUERIES, n):
        tune = order[:TUNE_QUERIES]
    return measure, tune


def split_other(queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    measure = queries[:MEASURE_QUERIES]
    tune = queries[MEASURE_QUERIES:]
    return measure, (tune if len(tune) >= min(TUNE_QUERIES, len(queries)) else queries[:TUNE_QUERIES])


def measure(index, base: np.ndarray, same: np.ndarray, other: np.ndarray, modality: str) -> dict[str, Any]:
    """recall@10 against exact search for same-modality and cross-modal queries."""
    result: dict[str, Any] = {}
    for name, queries in ((modality, same), (other_modality(modality), other)):
        key = f"{name}_queries"
        if len(queries) == 0:
            result[key] = None
            continue
        _, exact = exact_search(base, queries, RECALL_K)
        _, found = index.search(queries, exact.shape[1])
        result[key] = round(recall_at_k(found, exact, RECALL_K), 4)
    result["num_queries"] = int(len(same) + len(other))
    result["exact"] = False
    return result


def other_modality(modality: str) -> str:
    return "text" if modality == "image" else "image"


def tune(index, base: np.ndarray, tune_sets: list[np.ndarray]) -> dict[str, int]:
    """The larger of the parameters each query modality needs to reach the target recall."""
    chosen: dict[str, int] = {}
    for queries in tune_sets:
        if len(queries):
            params, _ = tune_search_params(index, base, queries, k=RECALL_K, target=TUNE_TARGET)
            for name, value in params.items():
                chosen[name] = max(chosen.get(name, 0), int(value))
    set_search_params(index, chosen)
    return chosen


def recall_warnings(recall: dict[str, Any], modality: str, kind: str) -> list[str]:
    """Warn when cross-modal queries lose recall (quantization hurts them more than same-modality ones)."""
    if recall.get("exact"):
        return []
    same, cross = recall.get(f"{modality}_queries"), recall.get(f"{other_modality(modality)}_queries")
    if cross is None or same is None:
        return []
    if cross < TEXT_RECALL_FLOOR or cross < same - TEXT_RECALL_GAP:
        other = other_modality(modality)
        return [f"{other}-query recall@10 is {cross:.3f} ({modality} queries {same:.3f}) on this {kind} index: "
                f"{other} queries lose recall with approximate search; rebuild with --kind flat or hnsw, or a "
                f"larger --memory-budget"]
    return []
