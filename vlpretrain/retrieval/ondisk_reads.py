"""Reading larger-than-memory files without keeping their pages in the resident set.

A memory map keeps every page it touched resident (and counted in the process's RSS) until it is
unmapped, so a build over shards several times its memory budget reads them with explicit reads
(:class:`NpyRows`; read pages stay in the page cache, which the kernel reclaims), and searching the
mapped ``index.ivfdata`` during a build drops the touched pages between query batches
(:func:`bounded_search`).

Example:
    >>> shard = NpyRows(Path("emb/image/000000.npy"))
    >>> with bounded_search(index, page_bytes=32_000_000):
    ...     scores, ids = index.search(queries, 10)
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import numpy as np

__all__ = ["NpyRows", "bounded_search"]

MADV_DONTNEED = 4  # linux/mman.h


class NpyRows:
    """Rows of a 2-D ``.npy`` file read with explicit reads, never memory-mapped: mapped pages stay in the
    resident set while the map lives, so over shards several times the memory budget a build would hold
    gigabytes of file pages; read pages stay in the page cache only.

    Example:
        >>> shard = NpyRows(Path("emb/image/000000.npy"))
        >>> shard.rows(np.array([0, 1, 2, 7])).shape
        (4, 512)
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) \
                else np.lib.format.read_array_header_2_0
            shape, fortran_order, self.dtype = read_header(f)
            self.offset = f.tell()
        if len(shape) != 2 or fortran_order:
            raise ValueError(f"{self.path}: not a 2-D C-order embedding array (shape {shape}); delete the embedding "
                             f"folder and export again with `vlp embed`")
        self.shape = (int(shape[0]), int(shape[1]))
        self.row_bytes = self.shape[1] * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def rows(self, positions: np.ndarray) -> np.ndarray:
        """The rows at ``positions`` as float32, one read per run of consecutive positions."""
        positions = np.asarray(positions, np.int64)
        out = np.empty((len(positions), self.shape[1]), np.float32)
        if not len(positions):
            return out
        breaks = np.flatnonzero(np.diff(positions) != 1) + 1
        with open(self.path, "rb") as f:
            for lo, hi in zip(np.concatenate([[0], breaks]), np.concatenate([breaks, [len(positions)]])):
                f.seek(self.offset + int(positions[lo]) * self.row_bytes)
                part = np.fromfile(f, self.dtype, count=int(hi - lo) * self.shape[1])
                if part.size != (hi - lo) * self.shape[1]:
                    raise ValueError(f"{self.path} is truncated: delete the embedding folder and export again "
                                     f"with `vlp embed`")
                out[lo:hi] = part.reshape(-1, self.shape[1])
        return out


@contextlib.contextmanager
def bounded_search(index, page_bytes: int) -> Iterator[None]:
    """Within the block, ``index.search`` (an IVF index over faiss's ``OnDiskInvertedLists``) runs in
    batches of queries whose probed lists fit in ``page_bytes``, and drops the mapped pages it touched
    (``madvise(MADV_DONTNEED)``; the data stays in the file and the page cache) after each batch, so
    tuning and measuring recall over a list file larger than the budget keep it out of the resident set.

    Example:
        >>> with bounded_search(index, page_bytes=32_000_000):
        ...     params, _ = tune_search_params(index, None, queries, exact_ids=exact)
    """
    import ctypes

    import faiss

    ivf = faiss.extract_index_ivf(index)
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    madvise = ctypes.CDLL("libc.so.6", use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    list_bytes = max(int(lists.list_size(j)) for j in range(int(ivf.nlist))) * (int(ivf.code_size) + 8)
    search = index.search

    def batched(x, k, **kwargs):
        batch = max(1, int(page_bytes) // max(1, int(ivf.nprobe) * list_bytes))
        found = []
        for lo in range(0, len(x), batch):
            found.append(search(x[lo:lo + batch], k, **kwargs))
            madvise(int(lists.ptr), int(lists.totsize), MADV_DONTNEED)
        return np.concatenate([d for d, _ in found]), np.concatenate([i for _, i in found])

    index.search = batched  # an instance attribute: tune_search_params calls index.search
    try:
        yield
    finally:
        del index.search
