"""`vlp embed` / export_embeddings: shard contents against the model itself, resume, errors, 2 processes."""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from vlpretrain.cli.main import main
from vlpretrain.data import open_corpus
from vlpretrain.data.images import load_rgb
from vlpretrain.models import build_model
from vlpretrain.retrieval import embeddings as emb_module
from vlpretrain.retrieval import EmbeddingSet, export_embeddings
from vlpretrain.retrieval.signature import model_signature

from helpers import launch_two_processes, tiny_model_config

LABELS = ["cat", "dog", "fish"]


def write_corpus(folder: Path, n: int, bad: tuple[int, ...] = (), two_columns: bool = False) -> Path:
    """n PNGs, 1 to 3 captions each (a JSON list cell, or two caption columns), extra columns label and score."""
    rng = np.random.default_rng(1)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    path = folder / "corpus.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption_1", "caption_2", "label", "score"] if two_columns
                        else ["image", "caption", "label", "score"])
        for i in range(n):
            image = folder / "images" / f"img{i}.png"
            if i in bad:
                image.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
            else:
                Image.fromarray((rng.random((20, 20, 3)) * 255).astype("uint8")).save(image)
            captions = [f"picture {i} caption {j}" for j in range(1 + i % 3)]
            if two_columns:
                cells = [captions[0], captions[1] if len(captions) > 1 else ""]
            else:
                cells = [json.dumps(captions)]
            writer.writerow([f"images/img{i}.png", *cells, LABELS[i % 3], i * 10])
    return path


def reference(model, corpus) -> tuple[np.ndarray, np.ndarray, list[int], list[str]]:
    """Image and caption embeddings computed directly with the model, one row at a time."""
    with torch.no_grad():
        images = []
        for i in range(len(corpus)):
            try:
                pixels = model.preprocess(load_rgb(corpus[i].image))[None]
                images.append(model.encode_image(pixels)[0].numpy())
            except Exception:
                images.append(np.zeros(model.embed_dim, np.float32))
        rows = [i for i in range(len(corpus)) for _ in corpus[i].captions]
        captions = [c for i in range(len(corpus)) for c in corpus[i].captions]
        texts = model.encode_text(model.tokenizer(captions)).numpy()
    return np.stack(images), texts, rows, captions


def shard_files(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("dtype,atol", [("float32", 1e-5), ("float16", 1e-3)])
def test_export_equals_the_model_in_order_across_shards(tmp_path, checkpoint, model, dtype, atol):
    csv_path = write_corpus(tmp_path, 7)
    corpus = open_corpus(csv_path)
    out = tmp_path / "emb"
    result = export_embeddings(model, corpus, out, spec=str(checkpoint), data_spec=str(csv_path), dtype=dtype,
                               shard_size=3, batch_size=2, progress=False)
    images, texts, rows, captions = reference(model, corpus)
    assert len(captions) == 1 + 2 + 3 + 1 + 2 + 3 + 1

    # Files: 3 shards of 3, 3, 1 rows; text shards hold those rows' captions.
    for k, (lo, hi) in enumerate([(0, 3), (3, 6), (6, 7)]):
        image = np.load(out / "image" / f"{k:06d}.npy")
        text = np.load(out / "text" / f"{k:06d}.npy")
        assert image.dtype == np.dtype(dtype) and image.shape == (hi - lo, 16)
        assert text.dtype == np.dtype(dtype) and text.shape == (sum(1 for r in rows if lo <= r < hi), 16)
        meta = pd.read_parquet(out / "meta" / f"{k:06d}.parquet")
        assert meta["row"].tolist() == list(range(lo, hi))
        text_meta = pd.read_parquet(out / "text_meta" / f"{k:06d}.parquet")
        assert text_meta["row"].tolist() == [r for r in rows if lo <= r < hi]
    assert not (out / "image" / "000003.npy").exists()

    np.testing.assert_allclose(result.image_embeddings(), images, atol=atol, rtol=0)
    np.testing.assert_allclose(result.text_embeddings(), texts, atol=atol, rtol=0)
    assert result.image_embeddings().dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(result.image_embeddings(), axis=1), 1, atol=atol * 10)

    meta = result.metadata()
    assert meta.columns.tolist() == ["row", "image", "captions", "ok", "label", "score"]
    assert meta["row"].tolist() == list(range(7))
    assert meta["image"].tolist() == [str((tmp_path / "images" / f"img{i}.png").resolve()) for i in range(7)]
    assert [list(c) for c in meta["captions"]] == [corpus[i].captions for i in range(7)]
    assert meta["ok"].tolist() == [True] * 7
    assert meta["label"].tolist() == [LABELS[i % 3] for i in range(7)]
    assert meta["score"].tolist() == [i * 10 for i in range(7)]
    text_meta = result.text_metadata()
    assert text_meta["row"].tolist() == rows and text_meta["caption"].tolist() == captions

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == result.manifest
    assert manifest["format"] == "vlpretrain-embeddings-v1"
    assert manifest["signature"] == model_signature(model, str(checkpoint))
    assert (manifest["dim"], manifest["dtype"], manifest["normalized"]) == (16, dtype, True)
    assert (manifest["modalities"], manifest["shard_size"], manifest["num_shards"]) == (["image", "text"], 3, 3)
    assert manifest["counts"] == {"rows": 7, "image": 7, "text": 13, "bad_images": 0}
    assert manifest["data"] == str(csv_path)
    assert sorted(os.listdir(out)) == [".export.json", "image", "manifest.json", "meta", "text", "text_meta"]


def test_image_only_export_has_no_text_folders(tmp_path, model):
    corpus = open_corpus(write_corpus(tmp_path, 4))
    result = export_embeddings(model, corpus, tmp_path / "emb", modalities=("image",), shard_size=3, progress=False)
    assert sorted(os.listdir(tmp_path / "emb")) == [".export.json", "image", "manifest.json", "meta"]
    assert result.manifest["counts"] == {"rows": 4, "image": 4, "text": 0, "bad_images": 0}
    assert result.manifest["modalities"] == ["image"]
    with pytest.raises(ValueError, match=re.escape(
            f"{tmp_path / 'emb'} holds no text embeddings (exported with modalities ['image']): "
            f"export again with --modality text or both")):
        result.text_embeddings()


def test_killed_export_resumes_from_finished_shards(tmp_path, monkeypatch, caplog, model):
    corpus = open_corpus(write_corpus(tmp_path, 7))
    out = tmp_path / "emb"
    real_write = emb_module._write_shard
    written: list[int] = []

    def dies_on_third_shard(out_, k, *args):
        if len(written) == 2:
            raise KeyboardInterrupt  # as if the job were killed
        written.append(k)
        real_write(out_, k, *args)

    monkeypatch.setattr(emb_module, "_write_shard", dies_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        export_embeddings(model, corpus, out, shard_size=2, batch_size=3, progress=False)
    assert written == [0, 1]
    assert not (out / "manifest.json").exists() and not (out / "meta" / "000002.parquet").exists()
    with pytest.raises(FileNotFoundError) as e:
        EmbeddingSet.open(out)
    assert str(e.value) == (f"{out} has no manifest.json: the export is unfinished; rerun `vlp embed` with the "
                            f"same arguments to resume")
    before = shard_files(out)
    # A temp file left behind by the kill, mid-write: removed, never read.
    (out / "image" / ".000002.npy.abc.tmp").write_bytes(b"partial")

    def counting(out_, k, *args):
        written.append(k)
        real_write(out_, k, *args)

    monkeypatch.setattr(emb_module, "_write_shard", counting)
    with caplog.at_level(logging.INFO, logger="vlpretrain"):
        resumed = export_embeddings(model, corpus, out, shard_size=2, batch_size=3, progress=False)
    assert "resuming: 2 of 4 shards already done" in caplog.messages
    assert written == [0, 1, 2, 3]  # shards 0 and 1 were not encoded again
    after = shard_files(out)
    assert {f: t for f, t in after.items() if f in before} == before  # and not rewritten
    assert not list(out.rglob("*.tmp"))

    clean = export_embeddings(model, corpus, tmp_path / "clean", shard_size=2, batch_size=3, progress=False)
    np.testing.assert_array_equal(resumed.image_embeddings(), clean.image_embeddings())
    np.testing.assert_array_equal(resumed.text_embeddings(), clean.text_embeddings())
    pd.testing.assert_frame_equal(resumed.metadata(), clean.metadata())
    pd.testing.assert_frame_equal(resumed.text_metadata(), clean.text_metadata())
    assert {k: v for k, v in resumed.manifest.items() if k != "created"} == \
           {k: v for k, v in clean.manifest.items() if k != "created"}

    # A finished export rerun does nothing and says so.
    caplog.clear()
    written.clear()
    with caplog.at_level(logging.INFO, logger="vlpretrain"):
        again = export_embeddings(model, corpus, out, shard_size=2, batch_size=3, progress=False)
    assert written == []
    assert shard_files(out) == after
    assert again.manifest == resumed.manifest
    assert f"{out}: export already finished (7 rows, 4 shards, same model and arguments); nothing to do" \
        in caplog.messages


def test_another_model_or_other_arguments_into_the_same_folder_is_an_error(tmp_path, checkpoint, model):
    corpus = open_corpus(write_corpus(tmp_path, 5))
    out = tmp_path / "emb"
    export_embeddings(model, corpus, out, spec=str(checkpoint), data_spec="corpus.csv", shard_size=2, progress=False)
    smaller = build_model(tiny_model_config(embed_dim=8))
    with pytest.raises(ValueError) as e:
        export_embeddings(smaller, corpus, out, spec="other", data_spec="corpus.csv", shard_size=2, progress=False)
    assert str(e.value) == (f"{out} holds embeddings of model {checkpoint} (dim 16); the given model other has "
                            f"dim 8: pick another --out or delete {out}")
    torch.manual_seed(1)
    same_shape = build_model(tiny_model_config())
    with pytest.raises(ValueError, match=rf"^{re.escape(f'{out} holds embeddings of model {checkpoint} (dim 16); the given model other embeds text differently (probe cosine ')}"
                                         rf"-?[0-9.]+ < 0\.99\): pick another --out or delete {re.escape(str(out))}$"):
        export_embeddings(same_shape, corpus, out, spec="other", data_spec="corpus.csv", shard_size=2, progress=False)
    for kwargs, what in ((dict(shard_size=3), "shard size 2, not shard size 3"),
                         (dict(dtype="float32"), "dtype float16, not dtype float32"),
                         (dict(data_spec="other.csv"), "data 'corpus.csv', not data 'other.csv'"),
                         (dict(modalities=("text",)), "modality image+text, not modality text")):
        args = {**dict(spec=str(checkpoint), data_spec="corpus.csv", shard_size=2, progress=False), **kwargs}
        with pytest.raises(ValueError) as e:
            export_embeddings(model, corpus, out, **args)
        assert str(e.value) == f"{out} holds an export made with {what}: pick another --out or delete {out}"

    # An unfinished export is checked the same way, through .export.json.
    (out / "manifest.json").unlink()
    with pytest.raises(ValueError) as e:
        export_embeddings(smaller, corpus, out, spec="other", data_spec="corpus.csv", shard_size=2, progress=False)
    assert str(e.value).endswith(f"has dim 8: pick another --out or delete {out}")

    # Shards of unknown origin.
    (tmp_path / "stray" / "meta").mkdir(parents=True)
    with pytest.raises(ValueError) as e:
        export_embeddings(model, corpus, tmp_path / "stray", progress=False)
    assert str(e.value) == (f"{tmp_path / 'stray'} holds shards of an unknown export (no manifest.json or "
                            f".export.json): pick another --out or delete {tmp_path / 'stray'}")
    with pytest.raises(FileNotFoundError) as e:
        EmbeddingSet.open(tmp_path / "stray")
    assert str(e.value) == (f"{tmp_path / 'stray'} has no manifest.json: the export is unfinished; rerun "
                            f"`vlp embed` with the same arguments to resume")


def test_bad_image_keeps_its_row_with_a_zero_vector(tmp_path, model, caplog):
    csv_path = write_corpus(tmp_path, 5, bad=(2,))
    corpus = open_corpus(csv_path)
    with caplog.at_level(logging.WARNING, logger="vlpretrain"):
        result = export_embeddings(model, corpus, tmp_path / "emb", dtype="float32", shard_size=2, batch_size=4,
                                   progress=False)
    assert result.manifest["counts"] == {"rows": 5, "image": 5, "text": 1 + 2 + 3 + 1 + 2, "bad_images": 1}
    meta = result.metadata()
    assert meta["ok"].tolist() == [True, True, False, True, True]
    images, texts, _, _ = reference(model, corpus)
    got = result.image_embeddings()
    assert not got[2].any()
    np.testing.assert_allclose(got, images, atol=1e-5, rtol=0)
    np.testing.assert_allclose(result.text_embeddings(), texts, atol=1e-5, rtol=0)  # its captions are kept
    [message] = [m for m in caplog.messages if "bad image" in m]
    assert message.startswith(f"bad image, kept as a zero vector (ok=False): {csv_path}:row 3: ")
    assert str(tmp_path / "images" / "img2.png") in message


@pytest.mark.slow
def test_two_processes_export_like_one(tmp_path, checkpoint, reset_accelerate):
    csv_path = write_corpus(tmp_path, 9, bad=(2,))
    common = ["--model", str(checkpoint), "--data", str(csv_path), "--shard-size", "2", "--batch-size", "2",
              "--num-workers", "0", "--dtype", "float32", "--no-progress"]
    proc = launch_two_processes("embed", "--out", str(tmp_path / "two"), *common)
    # Row 2 is in shard 1, so process 1 decoded it: there really were two processes, sharing by k % 2.
    assert f"vlp embed [rank 1]: bad image, kept as a zero vector (ok=False): {csv_path}:row 3: " in proc.stderr
    assert proc.stdout.count("embedded 9 rows") == 1  # the summary comes from the main process only

    assert main(["embed", "--out", str(tmp_path / "one"), *common]) == 0
    two, one = EmbeddingSet.open(tmp_path / "two"), EmbeddingSet.open(tmp_path / "one")
    np.testing.assert_allclose(two.image_embeddings(), one.image_embeddings(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(two.text_embeddings(), one.text_embeddings(), atol=1e-6, rtol=0)
    pd.testing.assert_frame_equal(two.metadata(), one.metadata())
    pd.testing.assert_frame_equal(two.text_metadata(), one.text_metadata())
    assert two.manifest["counts"] == one.manifest["counts"] == {"rows": 9, "image": 9, "text": 18, "bad_images": 1}
    assert two.manifest["num_shards"] == 5


def test_cli_end_to_end(tmp_path, checkpoint, model, capsys, reset_accelerate):
    csv_path = write_corpus(tmp_path, 5, two_columns=True)
    out = tmp_path / "emb"
    argv = ["embed", "--model", str(checkpoint), "--data", str(csv_path), "--out", str(out),
            "--caption-column", "caption_1,caption_2", "--shard-size", "4", "--batch-size", "3",
            "--num-workers", "1", "--no-progress"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    summary = f"5 rows of {csv_path}: 5 images (0 bad), 8 captions; dim 16, float16, 2 shards in {out}"
    assert captured.out == f"embedded {summary}\n"
    result = EmbeddingSet.open(out)
    corpus = open_corpus(csv_path, caption_column=["caption_1", "caption_2"])
    images, texts, rows, captions = reference(model, corpus)
    np.testing.assert_allclose(result.image_embeddings(), images, atol=1e-3, rtol=0)
    np.testing.assert_allclose(result.text_embeddings(), texts, atol=1e-3, rtol=0)
    assert result.text_metadata()["caption"].tolist() == captions
    assert result.metadata().columns.tolist() == ["row", "image", "captions", "ok", "label", "score"]
    assert result.signature["model"] == str(checkpoint)
    # The data and how it was read: another caption column or split must not resume these shards.
    assert result.manifest["data"] == f"{csv_path}|split=None|image_column=image|caption_column=['caption_1', 'caption_2']"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.csv", "emb", "images"]  # nothing else written

    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out == f"already finished, nothing to do: embedded {summary}\n"
    assert "nothing to do" in captured.err

    other_columns = [a if a != "caption_1,caption_2" else "caption_1" for a in argv]
    assert main(other_columns) == 2
    assert "holds an export made with data" in capsys.readouterr().err.splitlines()[-1]

    assert main(argv + ["--dtype", "float32"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"vlp embed: error: {out} holds an export made with dtype float16, not dtype float32: pick another --out "
        f"or delete {out}")
    assert main(["embed", "--model", str(checkpoint), "--data", str(tmp_path / "missing.csv"), "--out",
                 str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"vlp embed: error: {tmp_path / 'missing.csv'}: no such file"

    with pytest.raises(SystemExit) as e:
        main(["embed", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for option in ("--model", "--data", "--out", "--modality", "--dtype", "--shard-size", "--batch-size",
                   "--num-workers", "--image-column", "--caption-column", "--no-progress", "accelerate launch"):
        assert option in text
