"""Indexes larger than memory: an IVF-SQ8 index built shard by shard, its inverted lists merged on disk.

The embeddings are never held whole: the coarse quantizer and the 8-bit scalar codes are trained on
a seeded sample (at most a quarter of the memory budget), the vectors are read from the shards in
chunks (explicit reads, no maps: :mod:`.ondisk_reads`) into block indexes of at most an eighth of the
budget each, written to disk, and
the blocks' inverted lists are merged into one ``index.ivfdata`` file as faiss's
``OnDiskInvertedLists`` (:func:`merge_blocks`: what ``faiss.contrib.ondisk.merge_ondisk`` does, with
one block in memory at a time). ``index.faiss`` then holds the quantizer and the list offsets only,
and search reads the lists it probes from the mapped file.
Recall@10 is measured against exact search done chunk by chunk over the same shards; the searches
drop the list pages they mapped after each batch of queries, so the resident set stays within the budget.

Example:
    >>> index, info = build_ondisk(sets, tmp, modality="image", memory_budget=parse_memory("256MB"))
    >>> info["kind"], info["recall@10"]["image_queries"]
    ('ivf-ondisk', 0.97)
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..io import atomic_write
from .embedding_set import shard_name
from .faiss_index import IVF_MIN_POINTS_PER_LIST, exact_search, ivf_nlist, recall_at_k, tune_search_params
from .index_files import INDEX_NAME, META_NAME
from .index_recall import MEASURE_QUERIES, RECALL_K, TUNE_QUERIES, TUNE_TARGET, other_modality, sample_other
from .ondisk_reads import NpyRows, bounded_search
from .index_sources import meta_frame

__all__ = ["ONDISK_NAME", "build_ondisk", "listed_count", "read_ondisk", "quiet_native_stdout", "TopK"]

ONDISK_NAME = "index.ivfdata"  # the merged inverted lists, next to index.faiss
BLOCKS_NAME = ".blocks"  # block indexes, removed once merged
TRAIN_SIZE = 100_000
TRAIN_BYTES_SHARE = 4  # the training sample takes at most budget / 4
CHUNK_BYTES_SHARE = 8  # a chunk of float32 vectors and its scores against the centroids: budget / 8
BLOCK_BYTES_SHARE = 8  # a block index's codes and ids: budget / 8
SEARCH_BYTES_SHARE = 8  # list pages a batch of recall queries maps at once: budget / 8


@contextlib.contextmanager
def quiet_native_stdout() -> Iterator[None]:
    """Silence what faiss's C++ prints on file descriptor 1 ("resizing ...", "updating ondisk filename"),
    so `vlp index query --json` prints JSON only."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
ALLOCATOR_THRESHOLD = 128 * 1024


@contextlib.contextmanager
def returning_allocators() -> Iterator[None]:
    """Make freed memory go back to the system during a build that allocates and frees budget-sized
    buffers thousands of times: glibc's malloc otherwise raises its mmap threshold after the first
    large free and keeps later buffers in its heap, and pyarrow's pool keeps what parquet reads used,
    so the resident set grows with the data instead of staying within the budget.

    glibc's thresholds stay fixed at 128 KiB afterwards (there is no way to read the old ones back);
    pyarrow's pool is restored.
    """
    import ctypes

    import pyarrow as pa

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
        mallopt(M_MMAP_THRESHOLD, ALLOCATOR_THRESHOLD)
        mallopt(M_TRIM_THRESHOLD, ALLOCATOR_THRESHOLD)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to set
    pool = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        yield
    finally:
        pa.set_memory_pool(pool)


class _ShardView:
    """One shard of an embedding set, with the metadata readers :func:`meta_frame` asks for."""

    def __init__(self, emb, k: int):
        self.emb, self.k = emb, k

    def metadata(self):
        import pandas as pd

        return pd.read_parquet(self.emb.path / "meta" / shard_name(self.k, "parquet"))

    def text_metadata(self):
        import pandas as pd

        return pd.read_parquet(self.emb.path / "text_meta" / shard_name(self.k, "parquet"))


def listed_count(emb, modality: str) -> int:
    """Searchable vectors of ``modality`` in an embedding set, from its manifest (undecodable images excluded)."""
    counts = emb.manifest["counts"]
    return int(counts["text"]) if modality == "text" else int(counts["image"]) - int(counts.get("bad_images", 0))


def _shard_array(emb, k: int, modality: str) -> NpyRows:
    path = emb.path / modality / shard_name(k, "npy")
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the embedding folder {emb.path} is incomplete; delete it and "
                                f"export again with `vlp embed`")
    return NpyRows(path)


def _shards(sets: list, modality: str) -> list[tuple[int, Any, int]]:
    return [(i, emb, k) for i, emb in enumerate(sets) for k in range(int(emb.manifest["num_shards"]))]


def _sample_rows(sets: list, modality: str, positions: np.ndarray) -> np.ndarray:
    """Rows at global ``positions`` (over all shards' raw rows, sorted), float32, zero rows dropped."""
    out, start = [], 0
    for _, emb, k in _shards(sets, modality):
        array = _shard_array(emb, k, modality)
        stop = start + len(array)
        lo, hi = np.searchsorted(positions, [start, stop])
        if hi > lo:
            out.append(array.rows(positions[lo:hi] - start))
        start = stop
    rows = np.concatenate(out) if out else np.zeros((0, sets[0].dim), np.float32)
    return np.ascontiguousarray(rows[np.linalg.norm(rows, axis=1) > 0])


class TopK:
    """Running exact top-``k`` of many queries over base chunks seen one at a time.

    Example:
        >>> top = TopK(queries, 10)
        >>> for first_id, chunk in chunks:
        ...     top.update(chunk, first_id)
        >>> scores, ids = top.scores, top.ids
    """

    def __init__(self, queries: np.ndarray, k: int):
        self.queries, self.k = np.ascontiguousarray(queries, dtype=np.float32), int(k)
        self.scores = np.full((len(queries), 0), -np.inf, np.float32)
        self.ids = np.zeros((len(queries), 0), np.int64)

    def update(self, chunk: np.ndarray, first_id: int) -> None:
        if not len(self.queries) or not len(chunk):
            return
        scores, ids = exact_search(chunk, self.queries, self.k)
        scores = np.concatenate([self.scores, scores], 1)
        ids = np.concatenate([self.ids, ids + first_id], 1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :self.k]
        self.scores, self.ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def _chunks(sets: list, modality: str, chunk_rows: int, first_source: int) -> Iterator[tuple[np.ndarray, Any]]:
    """(float32 vectors, meta frame or None) per chunk of kept rows, shard by shard; the frame comes
    with a shard's first chunk."""
    for i, emb, k in _shards(sets, modality):
        frame, keep = meta_frame(_ShardView(emb, k), modality)
        array = _shard_array(emb, k, modality)
        if len(keep) != len(array):
            raise ValueError(f"{emb.path}: shard {k} holds {len(array)} {modality} embeddings but {len(keep)} "
                             f"metadata rows: delete {emb.path} and export again")
        frame.insert(4, "source", first_source + i)
        rows = np.flatnonzero(keep)
        for lo in range(0, max(len(rows), 1), chunk_rows):
            picked = rows[lo:lo + chunk_rows]
            # Contiguous kept rows (the usual case) come in one read.
            yield array.rows(picked), (frame if lo == 0 else None)


def _plan(n: int, dim: int, budget: int) -> dict[str, int]:
    """Sizes that keep the build within ``budget``: training sample (a quarter), chunk of vectors with
    its coarse-assignment scores (an eighth), block of codes (an eighth, as faiss's list vectors may
    hold twice their contents)."""
    sample_cap = max(1, budget // (TRAIN_BYTES_SHARE * dim * 4))
    nlist = max(1, min(ivf_nlist(n), sample_cap // IVF_MIN_POINTS_PER_LIST))
    return {"nlist": nlist, "train": int(min(n, sample_cap, max(TRAIN_SIZE, IVF_MIN_POINTS_PER_LIST * nlist))),
            "chunk_rows": int(max(256, budget // (CHUNK_BYTES_SHARE * (dim + nlist) * 4))),
            "block_bytes": int(max(1 << 14, budget // BLOCK_BYTES_SHARE))}


def _queries(sets: list, modality: str, raw_total: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Measure and tune queries of both modalities (same-modality ones drawn from the indexed shards).
    With at most MEASURE_QUERIES of a modality the tune queries are the measured ones (recorded in info.json
    as ``recall@10.tune_overlaps_measure``)."""
    wanted = min(raw_total, MEASURE_QUERIES + TUNE_QUERIES)
    same = _sample_rows(sets, modality, np.sort(rng.choice(raw_total, size=wanted, replace=False)))
    same = rng.permutation(same)
    other = sample_other(sets, other_modality(modality), MEASURE_QUERIES + TUNE_QUERIES, rng)
    return {"measure_same": same[:MEASURE_QUERIES], "tune_same": same[MEASURE_QUERIES:] if len(same) > MEASURE_QUERIES
            else same, "measure_other": other[:MEASURE_QUERIES],
            "tune_other": other[MEASURE_QUERIES:] if len(other) > MEASURE_QUERIES else other}


def build_ondisk(sets: list, tmp: Path, *, modality: str, memory_budget: int, seed: int = 0,
                 progress: bool = True, first_source: int = 0) -> tuple[Any, dict[str, Any]]:
    """Build an on-disk IVF-SQ8 index of ``modality`` vectors of ``sets`` into the folder ``tmp``.

    Writes ``tmp/index.faiss``, ``tmp/index.ivfdata`` and ``tmp/meta.parquet``; returns the loaded
    index (tuned to recall@10 >= 0.95) and the info fields it adds: ``kind``, ``factory``, ``ntotal``,
    ``search_params``, ``recall@10``, ``ondisk_bytes``, ``skipped_bad_images``, ``build_plan``.

    Example:
        >>> index, info = build_ondisk(open_sets(["emb/big"]), tmp, modality="image", memory_budget=256_000_000)
    """
    import faiss

    from ..progress import progress_bar

    dim = int(sets[0].dim)
    n = sum(listed_count(emb, modality) for emb in sets)
    raw_total = sum(len(_shard_array(emb, k, modality)) for _, emb, k in _shards(sets, modality))
    plan = _plan(n, dim, memory_budget)
    if n < plan["nlist"] or n < 2:
        raise ValueError(f"only {n} {modality} vectors: too few for an on-disk IVF index; build with --kind flat")
    rng = np.random.default_rng(seed)
    queries = _queries(sets, modality, raw_total, rng)
    factory = f"IVF{plan['nlist']},SQ8"
    trained = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(trained)
    ivf.cp.seed = int(seed)
    sample = _sample_rows(sets, modality, np.sort(rng.choice(raw_total, size=plan["train"], replace=False)))
    trained.train(sample)
    del sample
    blocks = tmp / BLOCKS_NAME
    blocks.mkdir()
    faiss.write_index(trained, str(blocks / "trained.index"))
    all_queries = np.concatenate([q for q in queries.values() if len(q)])
    top = TopK(all_queries, RECALL_K)
    names: list[str] = []
    state = {"block": None, "next_id": 0}

    def flush() -> None:
        if state["block"] is not None and state["block"].ntotal:
            names.append(str(blocks / f"{len(names):06d}.index"))
            faiss.write_index(state["block"], names[-1])
        state["block"] = None

    def add_all(meta_tmp: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        writer = None
        code_size = faiss.extract_index_ivf(trained).code_size + 8  # codes + ids per vector
        try:
            with progress_bar(total=n, desc=f"adding to {factory} (on disk)", unit="vec", enabled=progress) as bar:
                for vectors, frame in _chunks(sets, modality, plan["chunk_rows"], first_source):
                    if frame is not None and len(frame):
                        frame.insert(0, "id", np.arange(state["next_id"], state["next_id"] + len(frame),
                                                        dtype=np.int64))
                        table = pa.Table.from_pandas(frame, preserve_index=False)
                        writer = writer or pq.ParquetWriter(str(meta_tmp), table.schema)
                        writer.write_table(table.cast(writer.schema))
                    ids = np.arange(state["next_id"], state["next_id"] + len(vectors), dtype=np.int64)
                    if len(vectors):
                        state["block"] = state["block"] or faiss.read_index(str(blocks / "trained.index"))
                        state["block"].add_with_ids(vectors, ids)
                        top.update(vectors, state["next_id"])
                        if state["block"].ntotal * code_size >= plan["block_bytes"]:
                            flush()
                    state["next_id"] += len(vectors)
                    bar.update(len(vectors))
            flush()
        finally:  # an error mid-build still releases the file (atomic_write then removes it)
            if writer is not None:
                writer.close()

    atomic_write(tmp / META_NAME, add_all)
    merge_blocks(trained, names, tmp / ONDISK_NAME)
    with quiet_native_stdout():
        faiss.write_index(trained, str(tmp / INDEX_NAME))
    import shutil

    shutil.rmtree(blocks)
    index = trained
    with bounded_search(index, memory_budget // SEARCH_BYTES_SHARE):
        recall, params = _tune_and_measure(index, queries, top, modality)
    info = {"kind": "ivf-ondisk", "factory": factory, "ntotal": int(index.ntotal), "search_params": params,
            "recall@10": recall, "ondisk_bytes": int((tmp / ONDISK_NAME).stat().st_size),
            "skipped_bad_images": int(raw_total - n) if modality == "image" else 0,
            "build_plan": {"train_vectors": plan["train"], "chunk_rows": plan["chunk_rows"],
                           "block_bytes": plan["block_bytes"], "blocks": len(names)}}
    return index, info


def merge_blocks(trained, names: list[str], path: Path) -> None:
    """Merge the inverted lists of the block index files ``names`` into ``path`` as faiss's
    ``OnDiskInvertedLists``, and give them to the empty ``trained`` index.

    What :func:`faiss.contrib.ondisk.merge_ondisk` does, with the memory bounded: it maps every block
    file and the output at once, so all their pages end up in the resident set; here the lists are
    laid out with their final sizes (``set_all_lists_sizes``), then each block is read alone and its
    lists are written into place with ``pwrite``, which leaves the pages to the page cache.

    Example:
        >>> merge_blocks(trained, ["blocks/000000.index", "blocks/000001.index"], tmp / "index.ivfdata")
    """
    import faiss

    ivf = faiss.extract_index_ivf(trained)
    nlist, code_size = int(ivf.nlist), int(ivf.code_size)
    sizes = np.zeros(nlist, np.uint64)
    for name in names:
        block = faiss.read_index(name, faiss.IO_FLAG_MMAP)  # sizes only: the codes are not read
        lists = faiss.extract_index_ivf(block).invlists  # owned by block, which must stay alive
        sizes += np.array([lists.list_size(j) for j in range(nlist)], np.uint64)
    ondisk = faiss.OnDiskInvertedLists(nlist, code_size, str(path))
    ondisk.set_all_lists_sizes(faiss.swig_ptr(sizes))
    with quiet_native_stdout():
        ondisk.update_totsize(int(sizes.sum()) * (code_size + 8))  # the file, at its final size
    places = [(int(ondisk.lists.at(j).offset), int(ondisk.lists.at(j).capacity)) for j in range(nlist)]
    filled = np.zeros(nlist, np.int64)
    fd = os.open(path, os.O_WRONLY)
    try:
        for name in names:
            block = faiss.read_index(name)  # one block in memory at a time
            lists = faiss.extract_index_ivf(block).invlists
            for j in range(nlist):
                n = int(lists.list_size(j))
                if n:
                    offset, capacity = places[j]  # codes of the list first, then its ids
                    codes = faiss.rev_swig_ptr(lists.get_codes(j), n * code_size)
                    ids = faiss.rev_swig_ptr(lists.get_ids(j), n)
                    os.pwrite(fd, codes.tobytes(), offset + int(filled[j]) * code_size)
                    os.pwrite(fd, ids.tobytes(), offset + capacity * code_size + int(filled[j]) * 8)
                    filled[j] += n
            del lists, block
            os.remove(name)
    finally:
        os.close(fd)
    ivf.replace_invlists(ondisk, True)
    ondisk.this.disown()  # the index owns the lists now
    trained.ntotal = ivf.ntotal = int(sizes.sum())


def _tune_and_measure(index, queries: dict[str, np.ndarray], top: TopK, modality: str) -> tuple[dict, dict]:
    """Tune nprobe on the tune queries, then recall@10 of the measure queries, against ``top``'s exact ids."""
    exact, at = {}, 0
    for name, q in queries.items():
        if len(q):
            exact[name] = top.ids[at:at + len(q)]
            at += len(q)
    params: dict[str, int] = {}
    for name in ("tune_same", "tune_other"):
        if name in exact:
            found, _ = tune_search_params(index, None, queries[name], k=RECALL_K, target=TUNE_TARGET,
                                          exact_ids=exact[name])
            params["nprobe"] = max(params.get("nprobe", 0), found["nprobe"])
    faiss_set_nprobe(index, params["nprobe"])
    recall: dict[str, Any] = {"image_queries": None, "text_queries": None}
    for name, which in (("measure_same", modality), ("measure_other", other_modality(modality))):
        if name in exact:
            _, found = index.search(queries[name], RECALL_K)
            recall[f"{which}_queries"] = round(recall_at_k(found, exact[name], RECALL_K), 4)
    recall["num_queries"] = int(sum(len(queries[n]) for n in ("measure_same", "measure_other")))
    recall["exact"] = False
    # Too few vectors to hold out both samples: tuning reused the measured queries, so the recall is optimistic.
    recall["tune_overlaps_measure"] = [
        which for (measured, tuned), which in ((("measure_same", "tune_same"), modality),
                                               (("measure_other", "tune_other"), other_modality(modality)))
        if measured in exact and np.shares_memory(queries[measured], queries[tuned])]
    return recall, params


def faiss_set_nprobe(index, nprobe: int) -> None:
    import faiss

    faiss.extract_index_ivf(index).nprobe = int(nprobe)


def read_ondisk(path: Path, info: dict[str, Any]):
    """The on-disk index of folder ``path``: ``index.faiss`` (already checked by the caller) with its
    lists mapped from ``index.ivfdata`` beside it, whose size must match info.json."""
    import faiss

    data = path / ONDISK_NAME
    size = data.stat().st_size if data.is_file() else 0
    if size != int(info.get("ondisk_bytes", -1)):
        raise ValueError(f"{data} is missing, truncated or corrupt ({size} bytes, expected "
                         f"{info.get('ondisk_bytes')}): "
                         f"rebuild it with `vlp index build`")
    with quiet_native_stdout():
        # The lists file is named relative to index.faiss, so a moved or renamed folder still opens.
        return faiss.read_index(str(path / INDEX_NAME), faiss.IO_FLAG_ONDISK_SAME_DIR)


def write_ondisk_folder(sets: list, tmp: Path, info: dict[str, Any], *, start: float,
                        progress: bool = True) -> tuple[Any, dict[str, Any]]:
    """:func:`build_ondisk` into ``tmp``, then info.json (``info`` completed) written last.

    Example:
        >>> index, info = write_ondisk_folder(sets, tmp, {"modality": "image", "memory_budget": 256_000_000,
        ...                                               "seed": 0, ...}, start=time.time())
    """
    import time

    from .index_files import finish_index_folder
    from .index_recall import recall_warnings

    modality = info["modality"]
    with returning_allocators():
        index, built = build_ondisk(sets, tmp, modality=modality, memory_budget=int(info["memory_budget"]),
                                    seed=int(info["seed"]), progress=progress)
    warnings = recall_warnings(built["recall@10"], modality, "ivf-ondisk")
    if built["recall@10"][f"{other_modality(modality)}_queries"] is None:
        warnings.append(f"no {other_modality(modality)} embeddings in the sources: {other_modality(modality)}-query "
                        f"recall was not measured")
    info = dict(info, **built, warnings=warnings, build_seconds=round(time.time() - start, 3))
    return index, finish_index_folder(tmp, info)
