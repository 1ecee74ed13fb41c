"""Indexes larger than memory: an IVF-SQ8 index built shard by shard with its lists merged on disk equals an
in-memory build with the same trained quantizer, reads back from its own files, and searches by id and meta."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

faiss = pytest.importorskip("faiss")


# faiss's and torch's OpenMP runtimes spin against each other on a few cores (conftest.py)
pytestmark = pytest.mark.usefixtures("one_faiss_thread")

from test_index import synthetic, write_embedding_folder  # noqa: E402
from vlpretrain.retrieval.faiss_index import exact_search  # noqa: E402
from vlpretrain.retrieval.index import RetrievalIndex  # noqa: E402
from vlpretrain.retrieval.index_files import INDEX_NAME  # noqa: E402
from vlpretrain.retrieval.ondisk import ONDISK_NAME, TopK  # noqa: E402

DIM = 16
SIGNATURE = {"model": None, "dim": DIM}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Two embedding folders of 1500 rows each in shards of 400 (8 shards); rows 3 and 900 undecodable."""
    root = tmp_path_factory.mktemp("ondisk")
    images, texts = synthetic(3000, DIM, seed=3)
    ok = np.ones(3000, bool)
    ok[[3, 900]] = False
    folders = [write_embedding_folder(root / f"part{i}", images[i * 1500:(i + 1) * 1500],
                                      texts[i * 3000:(i + 1) * 3000], SIGNATURE, shard_size=400,
                                      ok=ok[i * 1500:(i + 1) * 1500], first_row=i * 1500) for i in range(2)]
    return root, folders, images, ok


def test_topk_over_chunks_equals_exact_search():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(1000, 8)).astype(np.float32)
    queries = rng.normal(size=(20, 8)).astype(np.float32)
    top = TopK(queries, 10)
    for lo in range(0, 1000, 130):
        top.update(base[lo:lo + 130], lo)
    scores, ids = exact_search(base, queries, 10)
    assert (top.ids == ids).all() and np.allclose(top.scores, scores)


def test_ondisk_build_equals_in_memory_ivf(parts):
    root, folders, images, ok = parts
    out = root / "index"
    # 192 KB of raw vectors against a 100 KB budget: auto builds on disk, in several blocks.
    built = RetrievalIndex.build(folders, out, memory_budget="100KB", progress=False)
    info = built.info
    assert info["kind"] == "ivf-ondisk" and info["factory"] == "IVF10,SQ8" and info["ntotal"] == 2998
    assert info["build_plan"]["blocks"] >= 2 and info["skipped_bad_images"] == 2
    assert (out / ONDISK_NAME).stat().st_size == info["ondisk_bytes"]
    assert 0.9 <= info["recall@10"]["image_queries"] <= 1 and info["recall@10"]["text_queries"] is not None
    assert info["recall@10"]["tune_overlaps_measure"] == []  # 2998 vectors: held-out tune queries

    # The files are what faiss reads back, from a moved folder too: lists on disk, beside index.faiss.
    moved = root / "moved"
    shutil.move(str(out), str(moved))
    loaded = RetrievalIndex.load(moved)
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(loaded.index).invlists)
    assert isinstance(lists, faiss.OnDiskInvertedLists) and lists.filename == str(moved / ONDISK_NAME)
    assert loaded.index.ntotal == 2998 and loaded.info["search_params"] == info["search_params"]

    # The same trained quantizer and codes, filled in memory with the kept vectors in id order.
    kept = images[ok]
    memory = faiss.read_index(str(moved / INDEX_NAME), faiss.IO_FLAG_ONDISK_SAME_DIR)
    ivf = faiss.extract_index_ivf(memory)
    in_memory = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.replace_invlists(in_memory, True)
    in_memory.this.disown()  # the index owns the lists now
    ivf.ntotal = memory.ntotal = 0
    memory.add(kept)
    queries = kept[::37]
    for nprobe in (1, 3, 10):
        ivf.nprobe = faiss.extract_index_ivf(loaded.index).nprobe = nprobe
        d_disk, i_disk = loaded.index.search(queries, 10)
        d_mem, i_mem = memory.search(queries, 10)
        assert (i_disk == i_mem).all() and (d_disk == d_mem).all()

    # Hits carry the meta rows of their ids (read when first needed), undecodable rows left out.
    assert loaded._meta is None
    hits = loaded.search(vectors=kept[[0, 2500]], k=1)
    kept_rows = np.flatnonzero(ok)
    assert [h[0]["image"] for h in hits] == [f"/data/img{kept_rows[0]}.png", f"/data/img{kept_rows[2500]}.png"]
    assert loaded._meta is None  # searches read only their rows' row groups, not the whole meta.parquet
    whole = pd.read_parquet(moved / "meta.parquet")
    ids = [2997, 0, 1200, 0, 401]  # several row groups, out of order, repeated
    pd.testing.assert_frame_equal(loaded.meta_rows(ids).reset_index(drop=True),
                                  whole.iloc[ids].reset_index(drop=True))
    assert list(loaded.meta["id"]) == list(range(2998)) and list(loaded.meta["source"][[0, 2997]]) == [0, 1]
    with pytest.raises(ValueError, match="is an on-disk index"):
        loaded.add(folders[0], progress=False)


def test_ondisk_text_index_matches_exact_on_probed_lists(parts):
    root, folders, _, _ = parts
    built = RetrievalIndex.build(folders[:1], root / "text", kind="ivf-ondisk", modality="text",
                                 memory_budget="100KB", progress=False)
    meta = pd.read_parquet(root / "text" / "meta.parquet")
    assert built.ntotal == len(meta) == 3000 and meta["caption"][1] == "caption 0 b"
    # All lists probed: exact search over the 8-bit codes, which keeps the exact top hit.
    faiss.extract_index_ivf(built.index).nprobe = faiss.extract_index_ivf(built.index).nlist
    _, texts = synthetic(3000, DIM, seed=3)
    _, ids = built.index.search(texts[:50], 1)
    assert (ids[:, 0] == np.arange(50)).mean() >= 0.9
    del built
    data = root / "text" / ONDISK_NAME
    size = data.stat().st_size
    with open(data, "r+b") as f:
        f.truncate(size - 16)
    with pytest.raises(ValueError) as error:
        RetrievalIndex.load(root / "text")
    assert str(error.value) == (f"{data} is missing, truncated or corrupt ({size - 16} bytes, expected {size}): "
                                f"rebuild it with `vlp index build`")


def test_ondisk_small_build_records_that_tuning_reused_the_measured_queries(tmp_path):
    """800 image vectors (under the 1000 measured queries): the tune queries are the measured ones, and
    info.json says so; the 1600 caption queries hold out their own tune queries."""
    images, texts = synthetic(800, DIM, seed=4)
    folder = write_embedding_folder(tmp_path / "emb", images, texts, SIGNATURE, shard_size=400)
    built = RetrievalIndex.build(folder, tmp_path / "index", kind="ivf-ondisk", memory_budget="100KB",
                                 progress=False)
    assert built.info["recall@10"]["tune_overlaps_measure"] == ["image"]


def test_explicit_reads_and_bounded_search_equal_maps_and_plain_search(parts, tmp_path):
    """The build's memory-bounding readers change no numbers: rows read with explicit reads equal
    np.load's, and a search split into batches that drop their pages equals one plain search."""
    from vlpretrain.retrieval.ondisk_reads import NpyRows, bounded_search

    matrix = np.random.default_rng(1).normal(size=(50, DIM)).astype(np.float32)
    np.save(tmp_path / "rows.npy", matrix)
    positions = np.array([0, 1, 2, 7, 8, 30, 49])  # runs of consecutive rows and gaps
    shard = NpyRows(tmp_path / "rows.npy")
    assert len(shard) == 50 and np.array_equal(shard.rows(positions), np.load(tmp_path / "rows.npy")[positions])

    root, folders, images, ok = parts
    out = tmp_path / "index"
    RetrievalIndex.build(folders, out, memory_budget="100KB", progress=False)
    index = faiss.read_index(str(out / INDEX_NAME), faiss.IO_FLAG_ONDISK_SAME_DIR)
    faiss.extract_index_ivf(index).nprobe = 3
    queries = images[ok][::29]
    plain = index.search(queries, 10)
    with bounded_search(index, page_bytes=1):  # one query a batch, pages dropped after each
        batched = index.search(queries, 10)
    assert "search" not in vars(index)  # the plain method is back
    assert (batched[1] == plain[1]).all() and (batched[0] == plain[0]).all()
