"""Low-level FAISS helpers: kind choice, factory strings, building, exact search, tuning, sizes."""

from __future__ import annotations

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from vlpretrain.retrieval.faiss_index import (  # noqa: E402
    build_faiss_index,
    choose_kind,
    exact_search,
    factory_string,
    get_search_params,
    index_kind,
    ivf_nlist,
    parse_memory,
    pq_m,
    recall_at_k,
    set_search_params,
    tune_search_params,
)

GB = 1000 ** 3


def clustered(n: int, dim: int, seed: int, clusters: int = 50, noise: float = 0.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + noise * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    base = clustered(20_000, 32, seed=0)
    rng = np.random.default_rng(1)
    queries = base[rng.choice(len(base), 300, replace=False)] + 0.05 * rng.normal(size=(300, 32)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return base, queries.astype(np.float32)


def test_parse_memory_good():
    assert parse_memory("4GB") == 4 * GB
    assert parse_memory("512MB") == 512 * 1000 ** 2
    assert parse_memory("2GiB") == 2 * 1024 ** 3
    assert parse_memory("1.5 gb") == 1_500_000_000
    assert parse_memory("100KiB") == 102_400
    assert parse_memory(1000) == 1000
    assert parse_memory("1000") == 1000


@pytest.mark.parametrize("text", ["lots", "4XB", "GB", "-1GB", "", "4 G B"])
def test_parse_memory_bad(text):
    with pytest.raises(ValueError) as e:
        parse_memory(text)
    assert str(e.value) == (f"memory budget '{text}' is not a size: use a number of bytes or a size like "
                            f"4GB, 512MB or 2GiB")


def test_parse_memory_zero():
    with pytest.raises(ValueError, match=r"^memory budget '0MB' must be more than 0 bytes: use a size like 4GB$"):
        parse_memory("0MB")


def test_choose_kind_boundaries():
    dim, budget = 512, 4 * GB
    assert choose_kind(999_999, dim, budget) == "flat"
    assert choose_kind(1_000_000, dim, budget) == "ivfsq8"  # the size limit, not memory, rules here
    # The raw vectors (n*dim*4 bytes) must fit the budget, else the index is built on disk.
    assert choose_kind(1000, 16, 1000 * 16 * 4) == "flat"
    assert choose_kind(1000, 16, 1000 * 16 * 4 - 1) == "ivf-ondisk"
    assert choose_kind(2_000_000, dim, 2_000_000 * dim * 4) == "ivfsq8"
    assert choose_kind(2_000_000, dim, 2_000_000 * dim * 4 - 1) == "ivf-ondisk"
    assert choose_kind(10_000_000, dim, budget) == "ivf-ondisk"


def test_factory_strings():
    assert factory_string("flat", 100, 16, GB) == "Flat"
    assert factory_string("hnsw", 10**6, 512, GB) == "HNSW32,Flat"
    assert ivf_nlist(1_000_000) == 4000
    assert ivf_nlist(20_000) == 512  # 4*sqrt(n) = 566, clipped to n // 39
    assert ivf_nlist(10) == 1
    assert factory_string("ivf", 1_000_000, 512, GB) == "IVF4000,Flat"
    assert factory_string("ivfpq", 10_000_000, 512, 4 * GB) == "IVF12649,PQ128x8"
    # m shrinks to what the budget holds: n*(m+8) bytes plus centroids and codebooks.
    n, dim = 10_000_000, 512
    fixed = ivf_nlist(n) * dim * 4 + 256 * dim * 4
    assert pq_m(n, dim, n * (32 + 8) + fixed) == 32
    assert pq_m(n, dim, n * (32 + 8) + fixed - 1) == 16
    assert pq_m(n, dim, 1000) == 1
    assert pq_m(1000, 32, GB) == 8  # at most dim / 4
    assert pq_m(1000, 48, GB) == 12
    with pytest.raises(ValueError, match=r"^index kind 'annoy' is unknown: use one of auto, flat, hnsw, ivf, ivfpq, ivfpq-refine, ivfsq8, ivf-ondisk$"):
        factory_string("annoy", 10, 4, GB)


def assert_numpy_top_k(ids: np.ndarray, base: np.ndarray, queries: np.ndarray, k: int) -> None:
    """ids equal numpy's argsort top-k, except where two scores tie to float32 rounding."""
    sims = queries.astype(np.float64) @ base.astype(np.float64).T
    reference = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    differ = ids != reference
    assert differ.mean() < 0.01
    found_scores = np.take_along_axis(sims, ids, 1)
    np.testing.assert_allclose(found_scores[differ], np.take_along_axis(sims, reference, 1)[differ], atol=1e-6)


def test_exact_search_matches_numpy(data):
    base, queries = data
    scores, ids = exact_search(base, queries, 10)
    assert_numpy_top_k(ids, base, queries, 10)
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ base.T, ids, 1), rtol=1e-5, atol=1e-5)
    # k is capped at the number of base vectors.
    assert exact_search(base[:3], queries[:2], 10)[1].shape == (2, 3)


def test_recall_at_k():
    assert recall_at_k(np.array([[1, 2, 3]]), np.array([[1, 2, 4]]), 3) == pytest.approx(2 / 3)
    assert recall_at_k(np.array([[1, -1, -1], [5, 6, 7]]), np.array([[1, 2, 3], [7, 6, 5]]), 3) == pytest.approx(
        (1 / 3 + 1) / 2)
    assert recall_at_k(np.array([[0, 1]]), np.array([[1, 0]]), 10) == 1.0  # fewer than k base vectors


def test_flat_is_exact(data):
    base, queries = data
    index = build_faiss_index(base, "flat", memory_budget=GB, progress=False)
    assert index.ntotal == len(base) and index_kind(index) == "flat"
    _, found = index.search(queries, 10)
    assert_numpy_top_k(found, base, queries, 10)
    params, recall = tune_search_params(index, base, queries, k=10)
    assert params == {} and recall == 1.0


@pytest.mark.parametrize("kind,floor,param,n", [
    ("hnsw", 0.9, "efSearch", 20_000), ("ivf", 0.9, "nprobe", 20_000),
    pytest.param("ivfpq", 0.45, "nprobe", 10_000, marks=pytest.mark.slow),  # PQ training is the slow part
])
def test_approximate_kinds_after_tuning(data, kind, floor, param, n):
    base, queries = data[0][:n], data[1]
    index = build_faiss_index(base, kind, memory_budget=GB, seed=0, progress=False)
    assert index.ntotal == len(base) and index_kind(index) == kind
    assert index.metric_type == faiss.METRIC_INNER_PRODUCT
    _, exact_ids = exact_search(base, queries, 10)
    params, recall = tune_search_params(index, base, queries, k=10, target=0.95)
    assert list(params) == [param]
    assert get_search_params(index) == params  # the index is left tuned
    _, found = index.search(queries, 10)
    assert recall_at_k(found, exact_ids, 10) == pytest.approx(recall)
    assert recall >= floor


def test_tune_picks_smallest_reaching_target(data):
    base, queries = data
    index = build_faiss_index(base, "ivf", memory_budget=GB, seed=0, progress=False)
    _, exact_ids = exact_search(base, queries, 10)
    nlist = faiss.extract_index_ivf(index).nlist
    recalls = {}
    for nprobe in [1, 2, 4, 8, 16, 32, 64, 128, 256, nlist]:
        set_search_params(index, {"nprobe": nprobe})
        recalls[nprobe] = recall_at_k(index.search(queries, 10)[1], exact_ids, 10)
    target = recalls[4] + 1e-9  # reached first at 8 or later (recall grows with nprobe)
    expected = min(p for p, r in recalls.items() if r >= target)
    params, recall = tune_search_params(index, base, queries, k=10, target=target, exact_ids=exact_ids)
    assert params == {"nprobe": expected} and recall == pytest.approx(recalls[expected])
    # An unreachable target gives the best one tried (the smallest with the best recall).
    params, recall = tune_search_params(index, base, queries, k=10, target=1.01, exact_ids=exact_ids)
    best = max(recalls.values())
    assert params == {"nprobe": min(p for p, r in recalls.items() if r == best)} and recall == pytest.approx(best)


def test_tune_hnsw_smallest_ef(data):
    base, queries = data
    index = build_faiss_index(base[:5000], "hnsw", memory_budget=GB, progress=False)
    _, exact_ids = exact_search(base[:5000], queries, 10)
    recalls = {}
    for ef in [16, 32, 64, 128, 256, 512, 1024]:
        set_search_params(index, {"efSearch": ef})
        recalls[ef] = recall_at_k(index.search(queries, 10)[1], exact_ids, 10)
    target = recalls[16] + 1e-9
    params, _ = tune_search_params(index, base[:5000], queries, target=target, exact_ids=exact_ids)
    assert params == {"efSearch": min(e for e, r in recalls.items() if r >= target)}


@pytest.mark.parametrize("train_size", [100_000, 0])  # all 4000 vectors train; a sample of 39 * nlist = 3978
def test_build_is_seeded(data, train_size):
    """The same seed gives the same index, byte for byte; another seed another one (k-means seeds, and
    with a training sample smaller than n, the sample too)."""
    base, _ = data

    def build(seed: int) -> bytes:
        index = build_faiss_index(base[:4000], "ivf", memory_budget=GB, seed=seed, train_size=train_size,
                                  progress=False)
        return faiss.serialize_index(index).tobytes()

    same, again, other = build(3), build(3), build(4)
    assert same == again
    assert same != other


def test_build_errors(data):
    base, _ = data
    with pytest.raises(ValueError, match=r"^kind ivfpq \(IVF2,PQ8x8\) needs at least 256 vectors to train, got 100: "
                                         r"use kind flat or hnsw for this few vectors$"):
        build_faiss_index(base[:100], "ivfpq", memory_budget=GB, progress=False)
    with pytest.raises(ValueError, match=r"^vectors must be a non-empty \(n, dim\) array, got shape \(0, 32\)$"):
        build_faiss_index(base[:0], "flat", memory_budget=GB, progress=False)
    index = build_faiss_index(base[:100], "flat", memory_budget=GB, progress=False)
    with pytest.raises(ValueError, match=r"^search parameter 'nprobe' does not apply to a flat index"):
        set_search_params(index, {"nprobe": 4})
