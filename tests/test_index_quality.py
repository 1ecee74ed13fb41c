"""Index quality: exact re-scoring of IVF-PQ candidates with float16 vectors, joint image + text indexes,
and model specs stored as absolute paths with a one-line message when the model has moved."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")


# faiss's and torch's OpenMP runtimes spin against each other on a few cores (conftest.py)
pytestmark = pytest.mark.usefixtures("one_faiss_thread")

from helpers import write_image_csv  # noqa: E402
from test_index import models, run_cli, synthetic, write_embedding_folder  # noqa: E402,F401 (fixture)
from vlpretrain.retrieval.faiss_index import (  # noqa: E402
    build_faiss_index, exact_search, get_search_params, index_kind, recall_at_k, set_search_params,
    tune_search_params)
from vlpretrain.retrieval.index import RetrievalIndex  # noqa: E402
from vlpretrain.retrieval.joint_index import JointIndex  # noqa: E402
from vlpretrain.retrieval.signature import model_signature, stored_spec  # noqa: E402

GB = 10 ** 9


@pytest.fixture(scope="module")
def vectors():
    base, _ = synthetic(4000, 32, seed=5, text_noise=0.0)
    queries, _ = synthetic(100, 32, seed=6, text_noise=0.0)
    return base, queries


def test_refine_rescores_candidates_exactly_and_raises_recall(vectors):
    base, queries = vectors
    _, exact = exact_search(base, queries, 10)
    plain = build_faiss_index(base, "ivfpq", memory_budget=GB, factory="IVF16,PQ4x4", progress=False)
    refined = build_faiss_index(base, "ivfpq-refine", memory_budget=GB, factory="IVF16,PQ4x4,Refine(SQfp16)",
                                progress=False)
    assert index_kind(refined) == "ivfpq-refine" and index_kind(plain) == "ivfpq"
    for index in (plain, refined):
        set_search_params(index, {"nprobe": 16})
    set_search_params(refined, {"k_factor": 8})
    assert get_search_params(refined) == {"nprobe": 16, "k_factor": 8}
    _, plain_ids = plain.search(queries, 10)
    scores, ids = refined.search(queries, 10)
    assert recall_at_k(ids, exact, 10) > recall_at_k(plain_ids, exact, 10) + 0.2

    # The re-scored top 10 is the exact order of the 80 PQ candidates by the stored float16 vectors.
    _, candidates = faiss.downcast_index(refined).base_index.search(queries, 80)
    stored = base.astype(np.float16).astype(np.float32)
    for q, row_ids, row_scores, cand in zip(queries, ids, scores, candidates):
        exact_scores = stored[cand] @ q
        order = cand[np.argsort(-exact_scores, kind="stable")[:10]]
        assert (row_ids == order).all()
        assert np.allclose(row_scores, stored[row_ids] @ q, atol=1e-5)


def test_refine_tuning_sets_nprobe_and_smallest_k_factor(vectors):
    base, queries = vectors
    refined = build_faiss_index(base, "ivfpq-refine", memory_budget=GB, factory="IVF16,PQ4x4,Refine(SQfp16)",
                                progress=False)
    params, recall = tune_search_params(refined, base, queries, k=10, target=0.95)
    assert set(params) == {"nprobe", "k_factor"} and get_search_params(refined) == params and recall >= 0.95
    if params["k_factor"] > 1:  # the next smaller factor misses the target at this nprobe
        set_search_params(refined, {"k_factor": params["k_factor"] // 2})
        assert recall_at_k(refined.search(queries, 10)[1], exact_search(base, queries, 10)[1], 10) < 0.95


@pytest.fixture(scope="module")
def signed(tmp_path_factory, models):  # noqa: F811
    path, model = models["a"]
    images, texts = synthetic(300, 16, seed=0)
    folder = write_embedding_folder(tmp_path_factory.mktemp("joint") / "emb", images, texts,
                                    model_signature(model, str(path)), shard_size=100)
    return folder, images, texts


def test_joint_index_searches_either_part(tmp_path, signed, models, capsys):  # noqa: F811
    folder, images, texts = signed
    model_dir, _ = models["a"]
    out = tmp_path / "joint"
    code, stdout, _ = run_cli(capsys, "index", "build", folder, "--out", out, "--modality", "both", "--no-progress")
    assert code == 0 and stdout.count("flat index (Flat)") == 2
    assert sorted(p.name for p in out.iterdir()) == ["image", "joint.json", "text"]
    joint_info = json.loads((out / "joint.json").read_text())
    assert joint_info["parts"] == {"image": "image", "text": "text"} and joint_info["model"] == str(model_dir)
    # Each part is an ordinary index folder.
    assert RetrievalIndex.load(out / "image").ntotal == 300 and RetrievalIndex.load(out / "text").ntotal == 600
    with pytest.raises(FileNotFoundError) as error:
        RetrievalIndex.load(out)
    assert str(error.value) == (f"{out} is a joint index: open {out / 'image'} or {out / 'text'}, or load it with "
                                f"vlpretrain.retrieval.joint_index.JointIndex.load")

    joint = JointIndex.load(out)
    assert joint.search(vectors=texts[4], k=1, part="text")[0][0]["caption"] == "caption 2 a"
    nearest_image = int(np.argmax(images @ texts[4]))  # cross-modal: the exact nearest image
    assert joint.search(vectors=texts[4], k=1, part="image")[0][0]["image"] == f"/data/img{nearest_image}.png"
    by_text = joint.search(texts=["caption 7 b"], k=3, part="image")
    assert by_text == joint.parts["image"].search(texts=["caption 7 b"], k=3)
    joint.search(texts=["caption 7 b"], k=3, part="text")
    assert joint.parts["image"]._model is joint.parts["text"]._model  # loaded once
    with pytest.raises(ValueError, match=r"^part 'audio' is unknown: search part image or text of "):
        joint.search(texts="x", part="audio")
    code, stdout, _ = run_cli(capsys, "index", "query", out, "--text", "caption 7 b", "--part", "text", "-k", "2",
                              "--json")
    hits = json.loads(stdout)
    assert code == 0 and [h["modality"] for h in hits] == ["text", "text"]
    assert hits == json.loads(json.dumps(joint.search(texts=["caption 7 b"], k=2, part="text")[0], default=str))


def test_joint_index_from_model_and_data(tmp_path, models, capsys):  # noqa: F811
    from vlpretrain.retrieval import EmbeddingSet

    model_dir, _ = models["a"]
    csv = write_image_csv(tmp_path / "data", 12)
    out = tmp_path / "joint"
    code, stdout, _ = run_cli(capsys, "index", "build", "--model", model_dir, "--data", csv, "--out", out,
                              "--modality", "both", "--no-progress")
    assert code == 0 and f"{out / 'image'}: flat index (Flat) of 12 image vectors" in stdout
    assert f"{out / 'text'}: flat index (Flat) of 12 text vectors" in stdout
    assert not (tmp_path / "joint.embeddings-partial").exists()  # exported once, kept by both parts
    for part in ("image", "text"):
        assert EmbeddingSet.open(out / part / "embeddings").counts == {"rows": 12, "image": 12, "text": 12,
                                                                      "bad_images": 0}
    image = tmp_path / "data" / "images" / "img5.png"
    code, stdout, _ = run_cli(capsys, "index", "query", out, "--image", image, "--part", "text", "-k", "1")
    emb = EmbeddingSet.open(out / "text" / "embeddings")
    nearest = int(np.argmax(emb.text_embeddings() @ emb.image_embeddings()[5]))  # exact, over the export
    assert code == 0 and stdout.split(maxsplit=3)[3].strip() == emb.text_metadata()["caption"][nearest]


def test_model_spec_stored_absolute_and_moved_model_message(tmp_path, monkeypatch, models):  # noqa: F811
    model_dir, model = models["a"]
    copy = tmp_path / "runs" / "final"
    shutil.copytree(model_dir, copy)
    monkeypatch.chdir(tmp_path)
    assert stored_spec("runs/final") == str(copy) and stored_spec("open_clip:ViT-B-32/openai") == \
        "open_clip:ViT-B-32/openai"
    images, texts = synthetic(50, 16, seed=1)
    folder = write_embedding_folder(tmp_path / "emb", images, texts, model_signature(model, "runs/final"))
    index = RetrievalIndex.build(folder, tmp_path / "idx", progress=False)
    assert index.info["signature"]["model"] == str(copy)
    moved = tmp_path / "elsewhere"
    copy.rename(moved)
    stale = RetrievalIndex.load(tmp_path / "idx")
    with pytest.raises(FileNotFoundError) as error:
        stale.search(texts="caption 1 a", k=1)
    assert str(error.value) == (f"{tmp_path / 'idx'} was built with model {copy}, which is not there any more: "
                                f"pass --model with its new location (or model_spec= in Python)")
    found = RetrievalIndex.load(tmp_path / "idx", model_spec=str(moved)).search(texts="caption 1 a", k=1)
    assert found == RetrievalIndex.load(tmp_path / "idx", model=model).search(texts="caption 1 a", k=1)


def test_build_help_names_the_kinds_auto_picks(capsys):
    """--kind auto's help says what choose_kind returns (flat, then ivfsq8, ivf-ondisk over the budget)."""
    from vlpretrain.cli.main import main
    from vlpretrain.retrieval.faiss_index import choose_kind, parse_memory

    assert choose_kind(2_000_000, 64, parse_memory("4GB")) == "ivfsq8"
    with pytest.raises(SystemExit):
        main(["index", "build", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "flat below 1M vectors, ivfsq8 (IVF over 8-bit scalar codes) above" in help_text
    assert "ivfpq-refine (" not in help_text
    assert "leaves glibc's malloc trim/mmap thresholds at 128 KiB" in help_text
