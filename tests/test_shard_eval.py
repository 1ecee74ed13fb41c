"""Evaluation, embedding and indexing from WebDataset shards: the same numbers as the table the shards were
written from, one embedding shard per input shard, bad samples counted and named, resume per shard."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from vlpretrain.cli.main import main
from vlpretrain.data.named import open_named_corpus
from vlpretrain.data.shard_corpus import ShardCorpus
from vlpretrain.data.shard_format import sample_key, shard_name
from vlpretrain.data.labelled import open_labelled_images
from vlpretrain.evaluation.tasks import evaluate_retrieval, evaluate_zeroshot, evaluate_zeroshot_shards
from vlpretrain.inference import encode_images
from vlpretrain.retrieval import EmbeddingSet, export_embeddings

from helpers import launch_two_processes, write_image_csv, write_test_shards

LABELS = ["cat", "dog", "fish"]


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def shards_from_csv(table: Path, out: Path, sizes: list[int]) -> str:
    """img2dataset-style shards of a CSV's rows, in order: the image file's bytes as ``{key}.png``, its
    caption as ``{key}.txt``, ``{key}.json`` with the original path and the other columns. Returns the
    brace pattern naming them."""
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    assert sum(sizes) == len(rows)
    out.mkdir(parents=True)
    it = iter(rows)
    for k, size in enumerate(sizes):
        with tarfile.open(out / shard_name(k), "w") as tar:
            for position in range(size):
                row, key = next(it), sample_key(k, position, 1000)
                path = table.parent / row["image"]
                meta = {"path": str(path), **{c: v for c, v in row.items() if c not in ("image", "caption")}}
                _add_member(tar, f"{key}.png", path.read_bytes())
                _add_member(tar, f"{key}.txt", row["caption"].encode())
                _add_member(tar, f"{key}.json", json.dumps(meta).encode())
    return str(out / f"{{00000..{len(sizes) - 1:05d}}}.tar")


def labelled_csv(folder: Path, n: int) -> Path:
    """write_image_csv's images with a label column."""
    table = write_image_csv(folder, n)
    frame = pd.read_csv(table)
    frame["label"] = [LABELS[i % 3] for i in range(n)]
    frame.to_csv(table, index=False)
    return table


def test_retrieval_from_shards_equals_the_csv_they_were_written_from(tmp_path, checkpoint, model):
    table = write_image_csv(tmp_path, 14)
    pattern = shards_from_csv(table, tmp_path / "shards", [5, 4, 5])
    corpus = open_named_corpus(pattern)
    assert isinstance(corpus, ShardCorpus) and corpus.num_shards == 3 and corpus.num_samples is None

    expected = evaluate_retrieval(model, open_named_corpus(str(table)), batch_size=4, progress=False)
    got = evaluate_retrieval(model, corpus, batch_size=4, progress=False)
    assert got["metrics"] == expected["metrics"]
    assert got["skipped_samples"] == 0 and got["dataset"] == "shards"
    # Decoded in 2 workers (batches of one worker's shards, arriving interleaved): same ranks once reordered.
    two = evaluate_retrieval(model, corpus, batch_size=4, progress=False, num_workers=2)
    assert two["metrics"] == expected["metrics"]

    out = tmp_path / "shards.json"
    assert main(["eval", "retrieval", "--model", str(checkpoint), "--data", pattern, "--batch-size", "4",
                 "--no-progress", "--output", str(out)]) == 0
    assert json.loads(out.read_text())["metrics"] == json.loads(json.dumps(expected["metrics"]))


def test_retrieval_from_shards_refuses_itm_rerank_and_names_a_missing_pattern(tmp_path, checkpoint, capsys):
    table = write_image_csv(tmp_path, 4)
    pattern = shards_from_csv(table, tmp_path / "shards", [4])
    assert main(["eval", "retrieval", "--model", str(checkpoint), "--data", pattern, "--rerank-itm", "2"]) == 2
    assert "--rerank-itm reads images by row number" in capsys.readouterr().err
    missing = str(tmp_path / "shards" / "{00000..00003}.tar")
    assert main(["eval", "retrieval", "--model", str(checkpoint), "--data", missing]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlp eval: error: ") and "00001.tar: no such shard" in err and "\n" not in err


def _bad_members(folder: Path) -> tuple[str, str]:
    """Append a sample with a corrupt image to shard 1 and one without a caption to shard 2."""
    with tarfile.open(folder / shard_name(1), "a") as tar:
        _add_member(tar, "000010003.jpg", b"\xff\xd8\xff this is not a jpeg")
        _add_member(tar, "000010003.txt", b"a broken square")
    with tarfile.open(folder / shard_name(2), "a") as tar:
        _add_member(tar, "000020004.jpg", (folder / "keep.jpg").read_bytes())
    return "000010003", "000020004"


def test_embed_from_shards_one_embedding_shard_per_input_shard(tmp_path, checkpoint, model, reset_accelerate, capsys):
    folder = tmp_path / "shards"
    write_test_shards(folder, [5, 3, 4])
    with tarfile.open(folder / shard_name(0)) as tar:  # a valid JPEG for the captionless sample
        (folder / "keep.jpg").write_bytes(tar.extractfile("000000000.jpg").read())
    corrupt, captionless = _bad_members(folder)
    out = tmp_path / "emb"
    assert main(["embed", "--model", str(checkpoint), "--data", str(folder), "--out", str(out), "--batch-size", "2",
                 "--num-workers", "2", "--dtype", "float32", "--no-progress"]) == 0
    assert "embedded 13 rows" in capsys.readouterr().out

    emb = EmbeddingSet.open(out)
    assert emb.num_shards == 3
    assert emb.counts == {"rows": 13, "image": 13, "text": 13, "bad_images": 1}
    assert emb.manifest["input"]["skipped_samples"] == 1
    assert emb.manifest["input"]["skipped_examples"] == [f"{folder / shard_name(2)}:{captionless}: no caption "
                                                         f"(.txt member or \"captions\" in {captionless}.json)"]
    per_shard = [pd.read_parquet(out / "meta" / f"{k:06d}.parquet") for k in range(3)]
    assert [len(m) for m in per_shard] == [5, 4, 4]
    meta = emb.metadata()
    assert meta["row"].tolist() == list(range(13))  # running numbers; the captionless sample was last
    assert meta["image"][5] == f"{folder / shard_name(1)}:000010000"
    assert meta["ok"].tolist() == [True] * 8 + [False] + [True] * 4
    assert meta["image"][8] == f"{folder / shard_name(1)}:{corrupt}"
    assert {"key", "width", "height"} <= set(meta.columns) and meta["key"][12] == "000020003"

    images = emb.image_embeddings()
    with tarfile.open(folder / shard_name(2)) as tar:
        jpeg = tar.extractfile("000020001.jpg").read()
    assert np.allclose(images[10], encode_images(model, [jpeg], progress=False)[0].numpy(), atol=1e-5)
    assert not images[8].any()
    text = emb.text_metadata()
    assert text["row"].tolist() == list(range(13))
    assert text["caption"][8] == "a broken square"


def test_embed_from_shards_resumes_only_the_missing_shard(tmp_path, model):
    folder = tmp_path / "shards"
    write_test_shards(folder, [3, 4, 2], manifest=True)
    corpus = ShardCorpus(folder)
    out = tmp_path / "emb"
    first = export_embeddings(model, corpus, out, spec="tiny", data_spec=str(folder), batch_size=2, progress=False)
    assert first.counts == {"rows": 9, "image": 9, "text": 9, "bad_images": 0}
    before = {p.relative_to(out): (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes())
              for p in out.rglob("*") if p.is_file() and p.name != "manifest.json"}

    (out / "manifest.json").unlink()  # as if killed after the last shard
    (out / "meta" / "000001.parquet").unlink()
    again = export_embeddings(model, ShardCorpus(folder), out, spec="tiny", data_spec=str(folder), batch_size=2,
                              progress=False)
    assert again.counts == first.counts
    after = {p.relative_to(out): (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes())
             for p in out.rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert set(after) == set(before)
    rewritten = {str(p) for p in after if after[p][:2] != before[p][:2]}
    assert rewritten == {"image/000001.npy", "text/000001.npy", "text_meta/000001.parquet", "meta/000001.parquet"}
    assert all(after[p][2] == before[p][2] for p in after if not str(p).startswith("meta/"))
    pd.testing.assert_frame_equal(again.metadata(), first.metadata())


def test_index_build_from_shards_answers_a_query(tmp_path, checkpoint, capsys):
    folder = tmp_path / "shards"
    write_test_shards(folder, [4, 3])
    index = tmp_path / "index"
    assert main(["index", "build", "--model", str(checkpoint), "--data", str(folder), "--out", str(index),
                 "--batch-size", "4", "--no-progress"]) == 0
    assert "flat index" in capsys.readouterr().out
    query = tmp_path / "query.jpg"
    with tarfile.open(folder / shard_name(1)) as tar:
        query.write_bytes(tar.extractfile("000010002.jpg").read())
    assert main(["index", "query", str(index), "--image", str(query), "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 3
    assert hits[0]["image"] == f"{folder / shard_name(1)}:000010002" and hits[0]["row"] == 6
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-3)


def test_zeroshot_from_shards_reads_labels_from_the_json(tmp_path, checkpoint, model, capsys):
    table = labelled_csv(tmp_path, 12)
    pattern = shards_from_csv(table, tmp_path / "shards", [7, 5])
    expected = evaluate_zeroshot(model, open_labelled_images(str(table), label_column="label"), templates="simple",
                                 batch_size=4, progress=False)
    got = evaluate_zeroshot_shards(model, ShardCorpus(pattern), "label", templates="simple", batch_size=4,
                                   progress=False)
    same = lambda a, b: json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # acc5 is NaN: 3 classes
    assert same(got["metrics"], expected["metrics"]) and got["skipped_samples"] == 0

    out = tmp_path / "zs.json"
    assert main(["eval", "zeroshot", "--model", str(checkpoint), "--data", str(tmp_path / "shards"),
                 "--label-column", "label", "--templates", "simple", "--num-workers", "2", "--no-progress",
                 "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["dataset"] == "shards" and report["metrics"]["num_samples"] == 12
    assert report["metrics"]["acc1"] == expected["metrics"]["acc1"]

    assert main(["eval", "zeroshot", "--model", str(checkpoint), "--data", pattern, "--label-column", "category",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"vlp eval: error: {tmp_path / 'shards' / shard_name(0)}:000000000: no field 'category' in its "
                   f".json (fields: ['label', 'path']); set --label-column")


@pytest.mark.slow
def test_two_processes_embed_shards_like_one(tmp_path, checkpoint, reset_accelerate):

    folder = tmp_path / "shards"
    write_test_shards(folder, [3, 2, 4])
    with tarfile.open(folder / shard_name(0)) as tar:
        (folder / "keep.jpg").write_bytes(tar.extractfile("000000000.jpg").read())
    corrupt, _ = _bad_members(folder)
    common = ["--model", str(checkpoint), "--data", str(folder), "--batch-size", "2", "--num-workers", "1",
              "--dtype", "float32", "--no-progress"]
    proc = launch_two_processes("embed", "--out", str(tmp_path / "two"), *common)
    # Input shard 1 holds the corrupt image, so process 1 (1 % 2) decoded it: input shards are split k % world.
    assert f"vlp embed [rank 1]: bad image, kept as a zero vector (ok=False): {folder / shard_name(1)}:{corrupt}: " \
        in proc.stderr
    assert main(["embed", "--out", str(tmp_path / "one"), *common]) == 0
    two, one = EmbeddingSet.open(tmp_path / "two"), EmbeddingSet.open(tmp_path / "one")
    np.testing.assert_allclose(two.image_embeddings(), one.image_embeddings(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(two.text_embeddings(), one.text_embeddings(), atol=1e-6, rtol=0)
    pd.testing.assert_frame_equal(two.metadata(), one.metadata())
    assert two.counts == one.counts == {"rows": 10, "image": 10, "text": 10, "bad_images": 1}
    assert two.manifest["input"]["skipped_samples"] == 1 and two.num_shards == 3
