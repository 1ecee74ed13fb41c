"""RetrievalIndex and `vlp index`: build, search, add, model checks, integrity, atomic writes, CLI."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

faiss = pytest.importorskip("faiss")

from helpers import tiny_model_config, write_image_csv  # noqa: E402
from vlpretrain.cli.main import main  # noqa: E402
from vlpretrain.models import build_model  # noqa: E402
from vlpretrain import io as io_module  # noqa: E402
from vlpretrain.retrieval.index import RetrievalIndex, read_info  # noqa: E402
from vlpretrain.retrieval.index_search import RERANK_MESSAGE  # noqa: E402
from vlpretrain.retrieval.signature import model_signature  # noqa: E402

DIM = 16


def save_tiny_model(folder: Path, seed: int, **overrides) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(seed)
    model = build_model(tiny_model_config(**overrides)).eval()
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"a": save_tiny_model(root / "model_a", 0), "b": save_tiny_model(root / "model_b", 1),
            "c": save_tiny_model(root / "model_c", 2, embed_dim=8)}


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_embedding_folder(out: Path, images: np.ndarray, texts: np.ndarray, signature: dict, shard_size: int = 250,
                           ok: np.ndarray | None = None, first_row: int = 0, dtype: str = "float16") -> Path:
    """The documented embedding folder format (two captions per row), written directly."""
    n = len(images)
    ok = np.ones(n, bool) if ok is None else ok
    images = np.where(ok[:, None], images, 0)
    assert len(texts) == 2 * n
    num_shards = -(-n // shard_size)
    for folder in ("image", "text", "meta", "text_meta"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    for k in range(num_shards):
        lo, hi = k * shard_size, min((k + 1) * shard_size, n)
        rows = np.arange(lo, hi) + first_row
        np.save(out / "image" / f"{k:06d}.npy", images[lo:hi].astype(dtype))
        np.save(out / "text" / f"{k:06d}.npy", texts[2 * lo:2 * hi].astype(dtype))
        captions = [[f"caption {r} a", f"caption {r} b"] for r in rows]
        pd.DataFrame({"row": np.repeat(rows, 2).astype(np.int64), "caption": [c for cs in captions for c in cs]}
                     ).to_parquet(out / "text_meta" / f"{k:06d}.parquet", index=False)
        pd.DataFrame({"row": rows.astype(np.int64), "image": [f"/data/img{r}.png" for r in rows],
                      "captions": captions, "ok": ok[lo:hi], "label": [f"label{r % 7}" for r in rows],
                      "source": [f"table:{r}" for r in rows]}).to_parquet(out / "meta" / f"{k:06d}.parquet",
                                                                            index=False)
    manifest = {"format": "vlpretrain-embeddings-v1", "signature": signature, "dim": images.shape[1],
                "dtype": dtype, "normalized": True, "modalities": ["image", "text"], "shard_size": shard_size,
                "num_shards": num_shards, "counts": {"rows": n, "image": n, "text": 2 * n,
                                                     "bad_images": int((~ok).sum())},
                "data": "synthetic", "created": "2024-01-01T00:00:00+00:00"}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def synthetic(n: int, dim: int, seed: int, text_noise: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Clustered image vectors and two captions per image near them (stored as float16, like an export)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, dim))
    images = unit(centres[rng.integers(0, 20, n)] + 0.6 * rng.normal(size=(n, dim)))
    texts = unit(np.repeat(images, 2, axis=0) + text_noise * rng.normal(size=(2 * n, dim)))
    return images.astype(np.float16).astype(np.float32), texts.astype(np.float16).astype(np.float32)


@pytest.fixture(scope="module")
def emb(tmp_path_factory, models):
    """600 rows in 3 shards, rows 5 and 17 undecodable, signed by model a."""
    path, model = models["a"]
    images, texts = synthetic(600, DIM, seed=0)
    ok = np.ones(600, bool)
    ok[[5, 17]] = False
    folder = write_embedding_folder(tmp_path_factory.mktemp("emb") / "part1", images, texts,
                                    model_signature(model, str(path)), ok=ok)
    return folder, images, texts, ok


def brute_force(queries: np.ndarray, base: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = queries.astype(np.float64) @ base.astype(np.float64).T
    ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, ids, 1), ids


def encode_texts(model, texts: list[str]) -> np.ndarray:
    with torch.no_grad():
        return model.encode_text(model.tokenizer(texts)).float().numpy()


def test_build_flat_and_search_by_text(tmp_path, models, emb):
    folder, images, _, ok = emb
    model_dir, model = models["a"]
    index = RetrievalIndex.build(folder, tmp_path / "idx", progress=False)
    info = read_info(tmp_path / "idx")
    assert info == index.info
    assert info["format"] == "vlpretrain-index-v1" and info["kind"] == "flat" and info["factory"] == "Flat"
    assert info["ntotal"] == 598 and info["dim"] == DIM and info["modality"] == "image"
    assert info["recall@10"] == {"image_queries": 1.0, "text_queries": 1.0, "num_queries": 0, "exact": True}
    assert info["search_params"] == {} and info["warnings"] == [] and info["skipped_bad_images"] == 2
    assert info["signature"]["model"] == str(model_dir) and info["sources"] == [str(folder.resolve())]
    assert info["index_bytes"] == (tmp_path / "idx" / "index.faiss").stat().st_size
    assert not list(tmp_path.glob("idx.tmp-*"))

    meta = pd.read_parquet(tmp_path / "idx" / "meta.parquet")
    kept_rows = np.flatnonzero(ok)
    assert meta["id"].tolist() == list(range(598)) and meta["row"].tolist() == kept_rows.tolist()
    assert list(meta.columns[:6]) == ["id", "modality", "row", "image", "caption", "source"]
    assert "extra_source" in meta.columns and "label" in meta.columns  # corpus extras, renamed where clashing

    loaded = RetrievalIndex.load(tmp_path / "idx")  # the model comes from the signature's spec
    texts = ["a red square", "caption 3 a", "grinning face"]
    hits = loaded.search(texts=texts, k=5)
    scores, ids = brute_force(encode_texts(model, texts), images[ok], 5)
    assert [[h["id"] for h in q] for q in hits] == ids.tolist()
    np.testing.assert_allclose([[h["score"] for h in q] for q in hits], scores, atol=1e-5)
    first = hits[0][0]
    row = int(kept_rows[ids[0, 0]])
    assert first["rank"] == 1 and first["row"] == row and first["image"] == f"/data/img{row}.png"
    assert first["caption"] == f"caption {row} a" and first["label"] == f"label{row % 7}" and first["source"] == 0
    assert [h["rank"] for h in hits[1]] == [1, 2, 3, 4, 5]
    # A single string is one query; vectors work without a model.
    assert loaded.search(texts="a red square", k=5)[0] == hits[0]
    assert [h["id"] for h in loaded.search(vectors=images[ok][42], k=1)[0]] == [42]


def test_text_modality_index(tmp_path, emb):
    folder, _, texts, _ = emb
    index = RetrievalIndex.build(folder, tmp_path / "idx", modality="text", progress=False)
    assert index.ntotal == 1200 and index.info["modality"] == "text"
    hit = index.search(vectors=texts[7], k=1)[0][0]
    assert hit == {**hit, "id": 7, "row": 3, "caption": "caption 3 b", "image": "/data/img3.png", "modality": "text"}


def test_search_arguments(tmp_path, emb):
    index = RetrievalIndex.build(emb[0], tmp_path / "idx", progress=False)
    with pytest.raises(NotImplementedError, match=f"^{re.escape(RERANK_MESSAGE)}$"):
        index.search(texts="x", rerank=20)
    with pytest.raises(ValueError, match=r"^search: give exactly one of texts, images or vectors \(got none\)$"):
        index.search()
    with pytest.raises(ValueError,
                       match=r"^search: give exactly one of texts, images or vectors \(got texts, vectors\)$"):
        index.search(texts="x", vectors=np.zeros(DIM))
    with pytest.raises(ValueError, match=r"^search: vectors of shape \(3,\) do not match the index dimension 16"):
        index.search(vectors=np.zeros(3))
    assert len(index.search(vectors=np.ones((2, DIM)), k=10_000)[0]) == 598  # k capped at ntotal


def test_ivf_recall_measured_and_tuned(tmp_path, models, emb):
    folder, images, texts, ok = emb
    index = RetrievalIndex.build(folder, tmp_path / "idx", kind="ivf", memory_budget="10MB", seed=0, progress=False)
    info = index.info
    assert info["kind"] == "ivf" and info["factory"] == "IVF15,Flat"  # 598 // 39 lists
    assert set(info["search_params"]) == {"nprobe"}
    recall = info["recall@10"]
    # 598 image queries (all the base) and 1000 of the 1196 caption vectors of decodable rows.
    assert recall["exact"] is False and recall["num_queries"] == 598 + 1000
    assert 0 <= recall["text_queries"] <= 1 and recall["image_queries"] >= 0.95
    needs_warning = recall["text_queries"] < 0.9 or recall["text_queries"] < recall["image_queries"] - 0.05
    assert bool(info["warnings"]) == needs_warning
    # Re-measure by hand with the stored nprobe: every image query, exact reference by numpy.
    loaded = RetrievalIndex.load(tmp_path / "idx")
    assert faiss.extract_index_ivf(loaded.index).nprobe == info["search_params"]["nprobe"]
    _, exact = brute_force(images[ok], images[ok], 10)
    found = np.array([[h["id"] for h in q] for q in loaded.search(vectors=images[ok], k=10)])
    by_hand = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact)])
    assert recall["image_queries"] == pytest.approx(by_hand, abs=0.01)  # float16 ties may differ


def test_quantized_text_queries_warn(tmp_path, models):
    """Captions far from their images (as in real CLIP spaces) lose recall under PQ: a warning says so."""
    path, model = models["a"]
    images, texts = synthetic(2000, DIM, seed=3, text_noise=3.0)
    folder = write_embedding_folder(tmp_path / "emb", images, texts, model_signature(model, str(path)), 1000)
    index = RetrievalIndex.build(folder, tmp_path / "idx", kind="ivfpq", seed=0, progress=False)
    recall = index.info["recall@10"]
    assert index.info["factory"] == "IVF51,PQ4x8" and recall["text_queries"] < 0.9
    assert index.info["warnings"][0].startswith(f"text-query recall@10 is {recall['text_queries']:.3f} "
                                                f"(image queries {recall['image_queries']:.3f}) on this ivfpq index")


def test_add_grows_index(tmp_path, models, emb):
    folder, images, _, ok = emb
    path, model = models["a"]
    more_images, more_texts = synthetic(300, DIM, seed=7)
    more = write_embedding_folder(tmp_path / "part2", more_images, more_texts, model_signature(model, str(path)),
                                  first_row=600)
    RetrievalIndex.build(folder, tmp_path / "idx", progress=False)
    index = RetrievalIndex.load(tmp_path / "idx").add(more)
    assert index.ntotal == 898 and index.info["ntotal"] == 898
    assert index.info["sources"] == [str(folder.resolve()), str(more.resolve())]
    reloaded = RetrievalIndex.load(tmp_path / "idx")
    assert reloaded.info == index.info
    meta = reloaded.meta
    assert meta["id"].tolist() == list(range(898)) and meta["source"].tolist() == [0] * 598 + [1] * 300
    assert meta["row"].tolist()[598:] == list(range(600, 900))
    hit = reloaded.search(vectors=more_images[123], k=1)[0][0]
    assert (hit["id"], hit["row"], hit["image"]) == (598 + 123, 723, "/data/img723.png")
    # The whole grown index still equals brute force over old + new vectors.
    base = np.concatenate([images[ok], more_images])
    queries = encode_texts(model, ["caption 700 a", "a blue square"])
    _, ids = brute_force(queries, base, 10)
    hits = reloaded.search(texts=["caption 700 a", "a blue square"], k=10)
    assert [[h["id"] for h in q] for q in hits] == ids.tolist()


def test_add_to_ivf_keeps_quantizer_and_remeasures(tmp_path, models, emb):
    folder = emb[0]
    path, model = models["a"]
    more_images, more_texts = synthetic(300, DIM, seed=8)
    more = write_embedding_folder(tmp_path / "part2", more_images, more_texts, model_signature(model, str(path)))
    before = RetrievalIndex.build(folder, tmp_path / "idx", kind="ivf", progress=False)
    centroids = faiss.extract_index_ivf(before.index).quantizer.reconstruct_n(0, 15)
    after = RetrievalIndex.load(tmp_path / "idx").add(more)
    np.testing.assert_array_equal(faiss.extract_index_ivf(after.index).quantizer.reconstruct_n(0, 15), centroids)
    assert after.info["factory"] == before.info["factory"] and after.ntotal == 898
    assert after.info["search_params"] == before.info["search_params"]
    assert after.info["recall@10"]["num_queries"] == 898 + 1000 and "stale" not in after.info["recall@10"]
    hit = after.search(vectors=more_images[5], k=1)[0][0]
    assert hit["id"] == 598 + 5


def test_add_other_model_or_dim_is_refused(tmp_path, models, emb):
    folder = emb[0]
    path_a = models["a"][0]
    path_b, model_b = models["b"]
    path_c, model_c = models["c"]
    RetrievalIndex.build(folder, tmp_path / "idx", progress=False)
    images, texts = synthetic(50, DIM, seed=1)
    other = write_embedding_folder(tmp_path / "other", images, texts, model_signature(model_b, str(path_b)))
    index = RetrievalIndex.load(tmp_path / "idx")
    with pytest.raises(ValueError) as e:
        index.add(other)
    assert re.fullmatch(
        re.escape(f"{tmp_path / 'idx'} was built with model {path_a} (dim 16); {other} holds embeddings of model "
                  f"{path_b}, which embeds text differently (probe cosine ") + r"-?\d\.\d{3}" +
        re.escape(" < 0.99): use embeddings made with the same model, or rebuild the index from all of them"),
        str(e.value))
    images8, texts8 = synthetic(50, 8, seed=1)
    small = write_embedding_folder(tmp_path / "dim8", images8, texts8, model_signature(model_c, str(path_c)))
    with pytest.raises(ValueError) as e:
        index.add(small)
    assert str(e.value) == (f"{tmp_path / 'idx'} was built with model {path_a} (dim 16); {small} holds embeddings "
                            f"of model {path_c} with dim 8: use embeddings made with the same model, or rebuild the "
                            f"index from all of them")
    with pytest.raises(ValueError) as e:
        index.add(folder)
    assert str(e.value) == (f"{folder} is already in the index {tmp_path / 'idx'} (see its sources): adding it again "
                            f"would duplicate every vector")
    assert RetrievalIndex.load(tmp_path / "idx").ntotal == 598


def test_query_with_other_model_is_refused(tmp_path, models, emb):
    out = tmp_path / "idx"
    RetrievalIndex.build(emb[0], out, progress=False)
    path_a = models["a"][0]
    path_b, path_c = models["b"][0], models["c"][0]
    with pytest.raises(ValueError) as e:
        RetrievalIndex.load(out, model_spec=str(path_b)).search(texts="a cat")
    assert re.fullmatch(re.escape(f"{out} was built with model {path_a} (dim 16); the given model {path_b} embeds "
                                  f"text differently (probe cosine ") + r"-?\d\.\d{3}" +
                        re.escape(" < 0.99): query with the same model, or rebuild the index with this one"),
                        str(e.value))
    with pytest.raises(ValueError) as e:
        RetrievalIndex.load(out, model=models["c"][1], model_spec=str(path_c))
    assert str(e.value) == (f"{out} was built with model {path_a} (dim 16); the given model {path_c} has dim 8: "
                            f"query with the same model, or rebuild the index with this one")


def test_truncated_or_altered_index_file(tmp_path, emb):
    out = tmp_path / "idx"
    RetrievalIndex.build(emb[0], out, progress=False)
    data = (out / "index.faiss").read_bytes()
    (out / "index.faiss").write_bytes(data[:1000])
    with pytest.raises(ValueError) as e:
        RetrievalIndex.load(out)
    assert str(e.value) == (f"{out}/index.faiss is truncated or corrupt (1000 bytes, expected {len(data)}): "
                            f"rebuild it with `vlp index build`")
    altered = bytearray(data)
    altered[-5] ^= 0xFF
    (out / "index.faiss").write_bytes(bytes(altered))
    with pytest.raises(ValueError, match=re.escape(f"({len(data)} bytes, expected {len(data)})")):
        RetrievalIndex.load(out)
    (out / "info.json").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"{out} has no info.json: not a finished index")):
        RetrievalIndex.load(out)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_crash_while_writing_keeps_previous_index(tmp_path, models, emb, monkeypatch):
    out = tmp_path / "idx"
    RetrievalIndex.build(emb[0], out, progress=False)
    before = _snapshot(out)
    path, model = models["a"]
    more = write_embedding_folder(tmp_path / "more", *synthetic(100, DIM, seed=5), model_signature(model, str(path)))

    def broken_write(index, path):
        Path(path).write_bytes(b"half an index")
        raise RuntimeError("disk full")

    with monkeypatch.context() as m:
        m.setattr(faiss, "write_index", broken_write)
        with pytest.raises(RuntimeError, match="disk full"):
            RetrievalIndex.build(emb[0], out, kind="hnsw", progress=False)
        loaded = RetrievalIndex.load(out)
        with pytest.raises(RuntimeError, match="disk full"):
            loaded.add(more)
        assert loaded.ntotal == 598 and len(loaded.meta) == 598 and loaded.info == read_info(out)
    assert _snapshot(out) == before and RetrievalIndex.load(out).ntotal == 598

    def failed_exchange(a, b):
        raise OSError("killed during the swap")

    with monkeypatch.context() as m:
        m.setattr(io_module, "_rename_exchange", failed_exchange)
        with pytest.raises(OSError, match="killed during the swap"):
            RetrievalIndex.load(out).add(more)
    assert _snapshot(out) == before and RetrievalIndex.load(out).ntotal == 598

    # Without an atomic exchange the old folder is moved aside; a failed move-in puts it back.
    real_replace = os.replace

    def crash_on_move_in(src, dst):
        if ".tmp-" in Path(src).name and Path(src).is_dir():
            raise OSError("killed during the swap")
        real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(io_module, "_rename_exchange", lambda a, b: False)
        m.setattr(os, "replace", crash_on_move_in)
        with pytest.raises(OSError, match="killed during the swap"):
            RetrievalIndex.load(out).add(more)
    assert _snapshot(out) == before and RetrievalIndex.load(out).ntotal == 598
    with monkeypatch.context() as m:  # and when it works, the new index is in place
        m.setattr(io_module, "_rename_exchange", lambda a, b: False)
        assert RetrievalIndex.load(out).add(more).ntotal == 698
    assert RetrievalIndex.load(out).ntotal == 698
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx", "more"]  # no temp folders left behind


# ----------------------------------------------------------------------------- CLI


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_end_to_end(tmp_path, models, capsys):
    from vlpretrain.data import open_corpus
    from vlpretrain.retrieval import EmbeddingSet, export_embeddings

    model_dir, model = models["a"]
    csv = write_image_csv(tmp_path / "data", 12)
    out = tmp_path / "idx"
    code, stdout, _ = run_cli(capsys, "index", "build", "--model", model_dir, "--data", csv, "--out", out,
                              "--no-progress")
    assert code == 0 and f"{out}: flat index (Flat) of 12 image vectors, dim 16" in stdout
    emb = EmbeddingSet.open(out / "embeddings")  # the export is kept inside the index
    assert read_info(out)["sources"] == ["embeddings"] and not (tmp_path / "idx.embeddings-partial").exists()

    code, stdout, _ = run_cli(capsys, "index", "query", out, "--text", "a red square number 3", "-k", "3", "--json")
    hits = json.loads(stdout)
    _, ids = brute_force(encode_texts(model, ["a red square number 3"]), emb.image_embeddings(), 3)
    assert code == 0 and [h["id"] for h in hits] == ids[0].tolist()
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert hits[0]["image"] == str((tmp_path / "data" / "images" / f"img{ids[0, 0]}.png").resolve())
    assert hits[0]["caption"] == emb.metadata()["captions"][ids[0, 0]][0]

    code, stdout, _ = run_cli(capsys, "index", "query", out, "--image", tmp_path / "data" / "images" / "img5.png",
                              "-k", "2")
    lines = stdout.splitlines()
    assert code == 0 and len(lines) == 2
    rank, score, image, caption = lines[0].split(maxsplit=3)
    assert (rank, image, caption) == ("1", str((tmp_path / "data" / "images" / "img5.png").resolve()),
                                      "a orange square number 5")
    assert float(score) == pytest.approx(1.0, abs=1e-3)

    code, stdout, _ = run_cli(capsys, "index", "info", out)
    assert code == 0
    assert "kind:          flat (Flat)" in stdout and "vectors:       12 image embeddings, dim 16" in stdout
    assert f"model:         {model_dir} (dim 16)" in stdout and "recall@10:     exact (flat index)" in stdout
    assert "index.faiss" in stdout and "warnings:      none" in stdout
    code, stdout, _ = run_cli(capsys, "index", "info", out, "--json")
    assert json.loads(stdout) == read_info(out)

    csv2 = write_image_csv(tmp_path / "data2", 5, seed=1)
    more = export_embeddings(model, open_corpus(str(csv2)), tmp_path / "emb2", spec=str(model_dir), progress=False)
    code, stdout, _ = run_cli(capsys, "index", "add", out, more.path)
    assert code == 0 and "added 5 vectors (ids 12..16)" in stdout
    info = read_info(out)
    assert info["ntotal"] == 17 and info["sources"] == ["embeddings", str(more.path.resolve())]
    assert (out / "embeddings" / "manifest.json").is_file()
    code, stdout, _ = run_cli(capsys, "index", "query", out, "--image", tmp_path / "data2" / "images" / "img2.png",
                              "-k", "1", "--json")
    assert json.loads(stdout)[0]["id"] == 14 and json.loads(stdout)[0]["source"] == 1

    code, _, stderr = run_cli(capsys, "index", "query", out, "--text", "x", "--model", models["c"][0])
    assert code == 2 and stderr == (f"vlp index: error: {out} was built with model {model_dir} (dim 16); the given "
                                    f"model {models['c'][0]} has dim 8: query with the same model, or rebuild the "
                                    f"index with this one\n")

    (out / "index.faiss").write_bytes((out / "index.faiss").read_bytes()[:100])
    code, _, stderr = run_cli(capsys, "index", "query", out, "--text", "x")
    assert code == 2 and stderr == (f"vlp index: error: {out}/index.faiss is truncated or corrupt (100 bytes, "
                                    f"expected {info['index_bytes']}): rebuild it with `vlp index build`\n")


def test_cli_errors_and_help(tmp_path, emb, capsys):
    code, _, stderr = run_cli(capsys, "index", "build", "--out", tmp_path / "idx")
    assert code == 2 and stderr == ("vlp index: error: nothing to index: give embedding folders (EMB_DIR), or --model "
                                    "and --data to embed first\n")
    code, _, stderr = run_cli(capsys, "index", "build", emb[0], "--out", tmp_path / "idx", "--memory-budget", "lots")
    assert code == 2 and stderr == ("vlp index: error: memory budget 'lots' is not a size: use a number of bytes or a "
                                    "size like 4GB, 512MB or 2GiB\n")
    code, _, stderr = run_cli(capsys, "index", "info", tmp_path / "nothing")
    assert code == 2 and stderr == (f"vlp index: error: {tmp_path / 'nothing'}: no such index folder (make one with "
                                    f"`vlp index build`)\n")
    code, stdout, stderr = run_cli(capsys, "index", "build", emb[0], "--out", tmp_path / "idx", "--kind", "hnsw",
                                   "--no-progress")
    assert code == 0 and "hnsw index (HNSW32,Flat) of 598 image vectors" in stdout and "search efSearch=" in stdout
    for action in ("build", "add", "query", "info"):
        with pytest.raises(SystemExit) as e:
            main(["index", action, "--help"])
        assert e.value.code == 0
        assert f"usage: vlp index {action}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["index", "query", str(tmp_path / "idx")])  # --text or --image is required
    assert "one of the arguments --text --image is required" in capsys.readouterr().err


def test_build_from_model_keeps_export_after_a_crash(tmp_path, models, monkeypatch):
    model_dir, model = models["a"]
    csv = write_image_csv(tmp_path / "data", 6)
    out = tmp_path / "idx"
    args = ["index", "build", "--model", str(model_dir), "--data", str(csv), "--out", str(out), "--no-progress"]

    def broken_write(index, path):
        raise RuntimeError("disk full")

    with monkeypatch.context() as m:
        m.setattr(faiss, "write_index", broken_write)
        with pytest.raises(RuntimeError, match="disk full"):
            main(args)
    staging = tmp_path / "idx.embeddings-partial"
    assert not out.exists() and (staging / "manifest.json").is_file()  # the finished export waits for a rerun
    manifest = (staging / "manifest.json").read_text()
    assert main(args) == 0
    assert not staging.exists() and (out / "embeddings" / "manifest.json").read_text() == manifest
    assert RetrievalIndex.load(out).ntotal == 6


def test_build_from_corpus_fresh_discards_another_models_export(tmp_path, models):
    """An export left by another model blocks a resume; fresh=True (what `vlp demo` uses) starts over."""
    from vlpretrain.data import open_corpus
    from vlpretrain.retrieval import export_embeddings

    (dir_a, model_a), (dir_b, model_b) = models["a"], models["b"]
    corpus = open_corpus(write_image_csv(tmp_path / "data", 5))
    out = tmp_path / "idx"
    export_embeddings(model_a, corpus, tmp_path / "idx.embeddings-partial", spec=str(dir_a), progress=False)
    with pytest.raises(ValueError, match="holds embeddings of model"):
        RetrievalIndex.build_from_corpus(model_b, corpus, out, spec=str(dir_b), progress=False)
    index = RetrievalIndex.build_from_corpus(model_b, corpus, out, spec=str(dir_b), progress=False, fresh=True)
    assert index.info["signature"]["model"] == str(dir_b) and index.ntotal == 5
