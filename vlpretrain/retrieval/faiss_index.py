"""Low-level FAISS helpers: pick an index kind for a size and memory budget, build, search, tune.

Everything here works on plain float32 arrays of unit-norm vectors and inner-product indexes; no
model is needed (the index benchmark imports this module on its own).

Example:
    >>> budget = parse_memory("4GB")
    >>> kind = choose_kind(len(vectors), vectors.shape[1], budget)          # "flat" below 1M vectors
    >>> index = build_faiss_index(vectors, kind, memory_budget=budget)
    >>> params, recall = tune_search_params(index, vectors, queries, k=10, target=0.95)
"""

from __future__ import annotations

import math
import re
from typing import Optional, Union

import numpy as np

__all__ = [
    "KINDS",
    "IN_MEMORY_KINDS",
    "FLAT_MAX_VECTORS",
    "HNSW_M",
    "parse_memory",
    "choose_kind",
    "factory_string",
    "ivf_nlist",
    "pq_m",
    "build_faiss_index",
    "add_vectors",
    "exact_search",
    "recall_at_k",
    "set_search_params",
    "get_search_params",
    "tune_search_params",
    "index_kind",
]

KINDS = ("flat", "hnsw", "ivf", "ivfpq", "ivfpq-refine", "ivfsq8", "ivf-ondisk")
IN_MEMORY_KINDS = KINDS[:-1]  # ivf-ondisk is built shard by shard (see ondisk.py), never from one array
FLAT_MAX_VECTORS = 1_000_000  # below this an exact search is fast enough on a CPU
HNSW_M = 32  # graph links per node; level 0 keeps 2*M links of 4 bytes for every vector
IVF_MIN_POINTS_PER_LIST = 39  # faiss k-means warns below 39 training points per centroid
PQ_TRAIN_MIN = 256  # 8-bit PQ codebooks have 256 centroids each
ADD_BATCH = 65_536
REFINE_K_FACTOR = 16  # candidates re-scored per wanted hit until tune_search_params sets it
REFINE_K_FACTORS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000 ** 2, "mb": 1000 ** 2, "g": 1000 ** 3, "gb": 1000 ** 3,
          "t": 1000 ** 4, "tb": 1000 ** 4, "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3, "tib": 1024 ** 4}


def parse_memory(text: Union[str, int]) -> int:
    """A memory size in bytes: ``"4GB"`` (powers of 1000), ``"2GiB"`` (powers of 1024), ``"512MB"``, ``1000``.

    Example:
        >>> parse_memory("512MB"), parse_memory("2GiB"), parse_memory(1000)
        (512000000, 2147483648, 1000)
    """
    if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
        value = int(text)
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(text))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(f"memory budget '{text}' is not a size: use a number of bytes or a size like "
                             f"4GB, 512MB or 2GiB")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"memory budget '{text}' must be more than 0 bytes: use a size like 4GB")
    return value


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"index kind '{kind}' is unknown: use one of {', '.join(('auto',) + KINDS)}")
    return kind


def choose_kind(n: int, dim: int, memory_budget: int) -> str:
    """The index kind for ``n`` vectors of ``dim`` floats within ``memory_budget`` bytes.

    ``"ivf-ondisk"`` (built shard by shard, inverted lists on disk) when the raw vectors (n*dim*4
    bytes) do not fit; else ``"flat"`` (exact) while n < 1,000,000; else ``"ivfsq8"`` (IVF over 8-bit
    scalar codes, n*(dim + 8) bytes), whose quantization error is small enough that recall@10 is
    set by nprobe alone. ``"hnsw"``, ``"ivf"``, ``"ivfpq"`` and ``"ivfpq-refine"`` are never
    chosen but can be asked for with ``kind=``: on the 1M-vector benchmark HNSW stays under recall@10
    0.95 and builds many times slower, IVF-Flat holds 4x the bytes for the same recall, and IVF-PQ
    needed 16x re-scored candidates to pass 0.95, searching slower than IVF-SQ8 (IVF-PQ alone stays
    near 0.5).

    Example:
        >>> choose_kind(50_000, 512, parse_memory("4GB")), choose_kind(1_000_000, 512, parse_memory("4GB"))
        ('flat', 'ivfsq8')
    """
    if n * dim * 4 > memory_budget:
        return "ivf-ondisk"
    if n < FLAT_MAX_VECTORS:
        return "flat"
    return "ivfsq8"  # n*(dim + 8) bytes: always within a budget that holds the n*dim*4 raw bytes


def refine_pq_m(dim: int) -> int:
    """PQ sub-quantizers under a float16 re-scoring stage: the largest divisor of ``dim`` up to dim/4.

    The codes are 4-bit fast-scan PQ (``PQ{m}x4fs``, m/2 bytes a vector, scanned with SIMD lookups):
    they only have to bring the true neighbours into the ``k_factor * k`` candidates that are
    re-scored with the float16 vectors, so coarse, fast codes are enough.

    Example:
        >>> refine_pq_m(256), refine_pq_m(100)
        (64, 25)
    """
    return max(m for m in range(1, max(1, dim // 4) + 1) if dim % m == 0)


def ivf_nlist(n: int) -> int:
    """Inverted lists for ``n`` vectors: about 4*sqrt(n), at most n // 39 (k-means needs ~39 points a list).

    Example:
        >>> ivf_nlist(1_000_000)
        4000
    """
    return int(max(1, min(round(4 * math.sqrt(max(n, 1))), n // IVF_MIN_POINTS_PER_LIST)))


def pq_m(n: int, dim: int, memory_budget: int) -> int:
    """PQ sub-quantizers (= bytes per code with 8-bit codes) for ``n`` vectors within the budget.

    The largest divisor m of ``dim`` with m <= dim/4 whose codes plus ids (n*(m+8) bytes), coarse
    centroids and codebooks fit ``memory_budget``; 1 when nothing fits. At least four dimensions per
    sub-quantizer, because faiss's k-means (which trains each of the m codebooks) is many times
    slower on 1-3 dimensional data.

    Example:
        >>> pq_m(10_000_000, 512, parse_memory("4GB"))
        128
    """
    nlist = ivf_nlist(n)
    fixed = nlist * dim * 4 + 256 * dim * 4  # coarse centroids + PQ codebooks
    divisors = [m for m in range(1, max(1, dim // 4) + 1) if dim % m == 0]
    fitting = [m for m in divisors if n * (m + 8) + fixed <= memory_budget]
    return max(fitting) if fitting else 1


def factory_string(kind: str, n: int, dim: int, memory_budget: int) -> str:
    """The ``faiss.index_factory`` string of ``kind`` for ``n`` vectors of ``dim`` floats.

    ``"Flat"``, ``"HNSW32,Flat"``, ``"IVF{nlist},Flat"``, ``"IVF{nlist},PQ{m}x8"``,
    ``"IVF{nlist},PQ{m}x4fs,Refine(SQfp16)"``, ``"IVF{nlist},SQ8"`` (in memory, or its lists on disk
    for ``ivf-ondisk``) with ``nlist = ivf_nlist(n)``, ``m = pq_m(n, dim, memory_budget)`` (refine:
    :func:`refine_pq_m`).

    Example:
        >>> factory_string("ivfpq", 10_000_000, 512, parse_memory("4GB"))
        'IVF12649,PQ128x8'
    """
    _check_kind(kind)
    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        return f"HNSW{HNSW_M},Flat"
    if kind == "ivf":
        return f"IVF{ivf_nlist(n)},Flat"
    if kind == "ivfpq-refine":
        return f"IVF{ivf_nlist(n)},PQ{refine_pq_m(dim)}x4fs,Refine(SQfp16)"
    if kind in ("ivfsq8", "ivf-ondisk"):
        return f"IVF{ivf_nlist(n)},SQ8"
    return f"IVF{ivf_nlist(n)},PQ{pq_m(n, dim, memory_budget)}x8"


def _as_vectors(vectors: np.ndarray, what: str) -> np.ndarray:
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise ValueError(f"{what} must be a non-empty (n, dim) array, got shape {vectors.shape}")
    return np.ascontiguousarray(vectors, dtype=np.float32)


def _min_train_points(factory: str) -> int:
    nlist = int(re.match(r"IVF(\d+)", factory).group(1)) if factory.startswith("IVF") else 0
    return max(nlist, PQ_TRAIN_MIN if ",PQ" in factory else 0)


def build_faiss_index(vectors: np.ndarray, kind: str, *, memory_budget: int, train_size: int = 100_000,
                      seed: int = 0, progress: bool = True, holdout: Optional[np.ndarray] = None,
                      factory: Optional[str] = None):
    """An inner-product index of ``kind`` over ``vectors`` (float32, unit norm), trained and filled.

    Training uses a seeded random sample of at most ``max(train_size, 39 * nlist)`` vectors (IVF
    k-means wants ~39 points per list, so a large nlist raises the sample). ``holdout`` ids (e.g.
    the vectors later used as recall queries) are left out of the training sample when the others
    alone fill it. ``factory`` overrides :func:`factory_string`. Vectors are added in batches.

    Example:
        >>> index = build_faiss_index(vectors, "ivf", memory_budget=parse_memory("1GB"), seed=0)
        >>> index.ntotal == len(vectors)
        True
    """
    import faiss

    _check_kind(kind)
    if kind not in IN_MEMORY_KINDS:
        raise ValueError(f"index kind {kind} is built shard by shard from embedding folders: use "
                         f"RetrievalIndex.build (vlp index build), or kind ivfsq8 for an in-memory array")
    vectors = _as_vectors(vectors, "vectors")
    n, dim = vectors.shape
    factory = factory or factory_string(kind, n, dim, memory_budget)
    needed = _min_train_points(factory)
    if n < needed:
        raise ValueError(f"kind {kind} ({factory}) needs at least {needed} vectors to train, got {n}: "
                         f"use kind flat or hnsw for this few vectors")
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        nlist = faiss.extract_index_ivf(index).nlist if kind.startswith("ivf") else 1
        size = min(n, max(train_size, IVF_MIN_POINTS_PER_LIST * nlist))
        pool = np.arange(n)
        if holdout is not None and len(holdout):
            rest = np.setdiff1d(pool, np.asarray(holdout, dtype=np.int64))
            # Held-out vectors stay out of training only when that does not shrink the sample.
            pool = rest if len(rest) >= size else pool
        sample = np.sort(rng.choice(pool, size=size, replace=False))
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        ivf.cp.seed = int(seed)  # k-means seeds, so a rebuild gives the same quantizer
        if hasattr(ivf, "pq"):
            ivf.pq.cp.seed = int(seed)
            # Polysemous codes only speed up Hamming-filtered search, which is not used here, and
            # their training (simulated annealing) costs far more than the PQ itself.
            if hasattr(ivf, "do_polysemous_training"):  # IVF-PQ; fast-scan PQ has no polysemous codes
                ivf.do_polysemous_training = False
        index.train(vectors[sample])
    if kind == "ivfpq-refine":
        set_search_params(index, {"k_factor": REFINE_K_FACTOR})
    add_vectors(index, vectors, progress=progress, desc=f"adding to {factory}")
    return index


def add_vectors(index, vectors: np.ndarray, *, progress: bool = True, desc: str = "adding") -> None:
    """Add ``vectors`` to a trained ``index`` in batches, with a progress bar.

    Example:
        >>> add_vectors(index, more_vectors, progress=False)
    """
    from ..progress import progress_bar

    vectors = _as_vectors(vectors, "vectors")
    if vectors.shape[1] != index.d:
        raise ValueError(f"vectors have dim {vectors.shape[1]}, the index {index.d}")
    n = len(vectors)
    with progress_bar(total=n, desc=desc, unit="vec", enabled=progress) as bar:
        for start in range(0, n, ADD_BATCH):
            index.add(vectors[start:start + ADD_BATCH])
            bar.update(min(ADD_BATCH, n - start))


def exact_search(base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-``k`` (``min(k, len(base))`` columns): ``(scores, ids)``.

    Example:
        >>> scores, ids = exact_search(vectors, vectors[:5], k=10)
        >>> (ids[:, 0] == np.arange(5)).all()
        True
    """
    import faiss

    base = _as_vectors(base, "base")
    queries = _as_vectors(queries, "queries")
    if queries.shape[1] != base.shape[1]:
        raise ValueError(f"queries have dim {queries.shape[1]}, the base vectors {base.shape[1]}")
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(base)
    return index.search(queries, min(int(k), base.shape[0]))


def recall_at_k(found_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """Mean over queries of |found[:k] ∩ exact[:k]| / k (k capped at the exact list length).

    Example:
        >>> recall_at_k(np.array([[1, 2, 3]]), np.array([[1, 2, 4]]), 3)
        0.6666666666666666
    """
    found = np.asarray(found_ids)[:, :k]
    exact = np.asarray(exact_ids)[:, :k]
    if len(exact) == 0:
        raise ValueError("recall_at_k needs at least one query")
    denominator = min(int(k), exact.shape[1])
    hits = [len(set(f[f >= 0].tolist()) & set(e[e >= 0].tolist())) for f, e in zip(found, exact)]
    return float(np.mean(hits) / denominator)


def index_kind(index) -> str:
    """``"flat"``, ``"hnsw"``, ``"ivf"``, ``"ivfpq"``, ``"ivfpq-refine"``, ``"ivfsq8"`` or ``"ivf-ondisk"``.

    Example:
        >>> index_kind(faiss.index_factory(8, "HNSW32,Flat", faiss.METRIC_INNER_PRODUCT))
        'hnsw'
    """
    import faiss

    if isinstance(faiss.downcast_index(index), faiss.IndexRefine):
        return "ivfpq-refine"
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    if ivf is not None:
        ivf = faiss.downcast_index(ivf)
        if isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists):
            return "ivf-ondisk"
        if hasattr(ivf, "pq"):
            return "ivfpq"
        return "ivfsq8" if isinstance(ivf, faiss.IndexIVFScalarQuantizer) else "ivf"
    if hasattr(faiss.downcast_index(index), "hnsw"):
        return "hnsw"
    return "flat"


def set_search_params(index, params: dict) -> None:
    """Apply ``{"nprobe": n}`` (IVF), ``{"efSearch": n}`` (HNSW) or ``{"k_factor": f}`` (refine:
    ``f * k`` candidates re-scored) to ``index``; ``{}`` does nothing.

    Example:
        >>> set_search_params(index, {"nprobe": 16})
    """
    import faiss

    kind = index_kind(index)
    for name, value in (params or {}).items():
        if name == "nprobe" and kind.startswith("ivf"):
            faiss.extract_index_ivf(index).nprobe = int(value)
        elif name == "efSearch" and kind == "hnsw":
            faiss.downcast_index(index).hnsw.efSearch = int(value)
        elif name == "k_factor" and kind == "ivfpq-refine":
            faiss.downcast_index(index).k_factor = float(value)
        else:
            raise ValueError(f"search parameter '{name}' does not apply to a {kind} index: "
                             f"use nprobe for IVF, efSearch for HNSW, k_factor for ivfpq-refine")


def get_search_params(index) -> dict:
    """The current ``{"nprobe": n}`` / ``{"efSearch": n}`` / ``{"nprobe", "k_factor"}`` / ``{}`` of ``index``.

    Example:
        >>> get_search_params(index)
        {'nprobe': 1}
    """
    import faiss

    kind = index_kind(index)
    params = {}
    if kind.startswith("ivf"):
        params["nprobe"] = int(faiss.extract_index_ivf(index).nprobe)
    if kind == "ivfpq-refine":
        params["k_factor"] = int(faiss.downcast_index(index).k_factor)
    if kind == "hnsw":
        params["efSearch"] = int(faiss.downcast_index(index).hnsw.efSearch)
    return params


def _candidates(index) -> tuple[str, list[int]]:
    import faiss

    kind = index_kind(index)
    if kind.startswith("ivf"):
        nlist = int(faiss.extract_index_ivf(index).nlist)
        values = [1 << i for i in range(64) if (1 << i) < nlist] + [nlist]
        return "nprobe", values
    if kind == "hnsw":
        return "efSearch", [16 << i for i in range(7)]  # 16 ... 1024
    return "", []


def tune_search_params(index, base: Optional[np.ndarray], queries: np.ndarray, k: int = 10, target: float = 0.95,
                       exact_ids: Optional[np.ndarray] = None) -> tuple[dict, float]:
    """The smallest nprobe (IVF: 1, 2, 4, ..., nlist) or efSearch (HNSW: 16, 32, ..., 1024) whose
    recall@k against exact search over ``base`` reaches ``target``; else the best one tried.

    For ``ivfpq-refine``, nprobe is tuned with ``k_factor`` 256 (so many candidates re-scored that
    the PQ codes lose no true neighbour), then the smallest k_factor of 1, 2, 4, ... that keeps the
    target (or the recall reached) is taken. The index is left set
    to the returned parameters. ``exact_ids`` (from :func:`exact_search`) saves recomputing the
    reference (``base`` may then be None). A flat index returns ``({}, recall)``.

    Example:
        >>> params, recall = tune_search_params(index, vectors, queries, k=10, target=0.95)
        >>> params
        {'nprobe': 8}
    """
    queries = _as_vectors(queries, "queries")
    if exact_ids is None:
        _, exact_ids = exact_search(base, queries, k)

    def recall_now() -> float:
        _, found = index.search(queries, exact_ids.shape[1])
        return recall_at_k(found, exact_ids, k)

    name, values = _candidates(index)
    if not name:
        return {}, recall_now()
    refine = index_kind(index) == "ivfpq-refine"
    if refine:  # nprobe first, with so many candidates re-scored that the PQ codes lose none
        set_search_params(index, {"k_factor": REFINE_K_FACTORS[-1]})
    best = None
    for value in values:
        set_search_params(index, {name: value})
        recall = recall_now()
        if best is None or recall > best[1]:
            best = (value, recall)
        if recall >= target:
            best = (value, recall)
            break
    params = {name: int(best[0])}
    set_search_params(index, params)
    recall = float(best[1])
    if refine:  # then the fewest candidates that keep the recall reached (or the target)
        goal = min(target, recall)
        for factor in REFINE_K_FACTORS:
            set_search_params(index, {"k_factor": factor})
            found = recall_now()
            if found >= goal or factor == REFINE_K_FACTORS[-1]:
                params["k_factor"], recall = int(factor), float(found)
                break
    return params, recall
