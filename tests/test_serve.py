"""`vlp index serve`: every endpoint and every bad input through FastAPI's test client, the micro-batcher,
API keys and limits, the command line, and one real uvicorn server on a free 127.0.0.1 port."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("faiss")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from helpers import tiny_model_config, write_image_csv  # noqa: E402
from vlpretrain.cli.main import main  # noqa: E402
from vlpretrain.data import open_corpus  # noqa: E402
from vlpretrain.models import build_model, load_model  # noqa: E402
from vlpretrain.retrieval import RetrievalIndex, export_embeddings  # noqa: E402
from vlpretrain.retrieval.joint_index import JointIndex  # noqa: E402
from vlpretrain.serve import create_app  # noqa: E402
from vlpretrain.serve.batcher import TextBatcher  # noqa: E402
from vlpretrain.serve.errors import ApiError  # noqa: E402
from vlpretrain.serve.image_files import stored_image  # noqa: E402
from vlpretrain.serve.service import SearchService  # noqa: E402

N = 12


@pytest.fixture(scope="module")
def built(tmp_path_factory, checkpoint):
    """A tiny image index ('pairs'), a joint index folder ('joint': image/ and text/ over the same
    embeddings) and an image index of a model with an ITM head ('itm'), all over 12 coloured squares."""
    root = tmp_path_factory.mktemp("serve")
    csv = write_image_csv(root, N)
    model = load_model(checkpoint).eval()
    emb = export_embeddings(model, open_corpus(csv), root / "emb", spec=str(checkpoint), progress=False)
    RetrievalIndex.build(emb, root / "pairs", progress=False)
    JointIndex.build(emb, root / "joint", progress=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        build_model(tiny_model_config(fusion={"layers": 1})).save_pretrained(root / "itm_model")
    itm_model = load_model(root / "itm_model").eval()
    RetrievalIndex.build_from_corpus(itm_model, open_corpus(csv), root / "itm", spec=str(root / "itm_model"),
                                     progress=False)
    return root


@pytest.fixture(scope="module")
def service(built):
    service = SearchService.load([built / "pairs", built / "joint", built / "itm"])
    yield service
    asyncio.run(service.close())


@pytest.fixture(scope="module")
def client(service):
    with TestClient(create_app(service, max_k=50)) as c:
        yield c


def error_of(response, status: int, code: str) -> str:
    """The message of a response in the one error shape, checking its status and code."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    return body["error"]["message"]


def png_bytes(path: Path) -> bytes:
    return path.read_bytes()


# ---------------------------------------------------------------------------- endpoints


def test_text_search_matches_the_library(client, built, service):
    got = client.post("/search", json={"text": "a red square", "k": 5, "index": "pairs"})
    assert got.status_code == 200
    body = got.json()
    expected = RetrievalIndex.load(built / "pairs").search(texts="a red square", k=5)[0]
    assert body["index"] == "pairs" and body["query"] == "text" and body["k"] == 5
    assert [h["id"] for h in body["hits"]] == [h["id"] for h in expected]
    assert [h["rank"] for h in body["hits"]] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([h["score"] for h in body["hits"]], [h["score"] for h in expected], atol=1e-5)
    first = body["hits"][0]
    assert first["caption"] == expected[0]["caption"]
    assert first["image_url"] == f"/image/pairs/{first['id']}"
    assert first["metadata"] == {"row": expected[0]["row"], "modality": "image", "source": 0}
    assert "image" not in first  # the server's file paths stay on the server
    # the default index is the first one served
    assert client.post("/search", json={"text": "a red square", "k": 5}).json()["hits"] == body["hits"]


def test_image_upload_base64_and_embedding_queries(client, built, service):
    target = built / "images" / "img3.png"
    upload = client.post("/search", files={"image": ("query.png", png_bytes(target), "image/png")},
                         data={"k": "3", "index": "pairs"})
    assert upload.status_code == 200, upload.text
    assert upload.json()["query"] == "image"
    assert upload.json()["hits"][0]["id"] == 3  # the indexed copy of the same picture comes first
    b64 = base64.b64encode(png_bytes(target)).decode()
    for value in (b64, "data:image/png;base64," + b64):
        as_json = client.post("/search", json={"image": value, "k": 3, "index": "pairs"}).json()
        assert as_json["hits"] == upload.json()["hits"]
    vector = service.indexes["pairs"].index.index.reconstruct(7)
    hits = client.post("/search", json={"embedding": (3 * vector).tolist(), "k": 2}).json()["hits"]
    assert hits[0]["id"] == 7 and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)  # scaled to unit length


def test_image_by_id_and_joint_index(client, built):
    pairs = RetrievalIndex.load(built / "pairs")
    for i in (0, N - 1):
        got = client.get(f"/image/pairs/{i}")
        assert got.status_code == 200 and got.headers["content-type"] == "image/png"
        assert got.content == Path(pairs.meta["image"].iloc[i]).read_bytes()
    # a joint index is served as NAME/image and NAME/text; a caption hit links to its image
    hits = client.post("/search", json={"text": "a blue square", "k": 4, "index": "joint/text"}).json()["hits"]
    text_index = RetrievalIndex.load(built / "joint" / "text")
    assert [h["id"] for h in hits] == [h["id"] for h in text_index.search(texts="a blue square", k=4)[0]]
    assert all(h["metadata"]["modality"] == "text" for h in hits)
    image = client.get(hits[0]["image_url"])
    assert hits[0]["image_url"] == f"/image/joint/text/{hits[0]['id']}"
    assert image.content == Path(text_index.meta["image"].iloc[hits[0]["id"]]).read_bytes()


def test_indexes_health_docs_and_page(client, service, built, checkpoint):
    listed = client.get("/indexes").json()
    assert [d["name"] for d in listed["indexes"]] == ["pairs", "joint/image", "joint/text", "itm"]
    assert listed["limits"] == {"max_k": 50, "max_upload_bytes": 10_000_000}
    pairs = listed["indexes"][0]
    info = RetrievalIndex.load(built / "pairs").info
    assert pairs["model"] == str(checkpoint) and pairs["size"] == N and pairs["kind"] == "flat"
    assert pairs["modality"] == "image" and pairs["dim"] == 16 and pairs["recall@10"] == info["recall@10"]
    assert [d["rerank"] for d in listed["indexes"]] == [False, False, False, True]
    assert listed["indexes"][2]["modality"] == "text"
    # one model object serves every index built with it
    assert len(service.models) == 2
    assert service.indexes["pairs"].index._model is service.indexes["joint/text"].index._model
    assert client.get("/health").json() == {"status": "ok", "indexes": 4, "api_key_required": False}
    docs = client.get("/docs")
    # Swagger UI from the package, not a CDN, so the docs work offline
    assert docs.status_code == 200 and "/static/swagger-ui-bundle.js" in docs.text and "cdn" not in docs.text.lower()
    assert client.get("/static/swagger-ui-bundle.js").status_code == 200
    search = client.get("/openapi.json").json()["paths"]["/search"]["post"]
    assert set(search["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    page = client.get("/")
    assert page.status_code == 200 and '<script src="/static/app.js">' in page.text
    assert "https://" not in page.text and "http://" not in page.text  # nothing from a CDN
    for name in ("app.js", "style.css"):
        static = client.get(f"/static/{name}")
        assert static.status_code == 200 and "http" not in static.text.replace("https://", "X").split("//")[0]


def test_rerank_with_an_itm_head(client, built):
    got = client.post("/search", json={"text": "a red square", "k": 4, "index": "itm", "rerank": 6,
                                       "rerank_score": "itm+itc"})
    assert got.status_code == 200, got.text
    expected = RetrievalIndex.load(built / "itm").search(texts="a red square", k=4, rerank=6,
                                                         rerank_score="itm+itc")[0]
    hits = got.json()["hits"]
    assert [h["id"] for h in hits] == [h["id"] for h in expected]
    np.testing.assert_allclose([h["itm_score"] for h in hits], [h["itm_score"] for h in expected], atol=1e-5)
    np.testing.assert_allclose([h["rerank_score"] for h in hits], [h["rerank_score"] for h in expected], atol=1e-4)
    message = error_of(client.post("/search", json={"text": "a red square", "index": "pairs", "rerank": 3}),
                       400, "rerank_unavailable")
    assert message.startswith("index 'pairs': ITM re-ranking needs a model with an ITM fusion head")
    assert "not an embedding" in error_of(
        client.post("/search", json={"embedding": [0.1] * 16, "index": "itm", "rerank": 3}), 400, "bad_rerank")


# ---------------------------------------------------------------------------- bad input


def test_bad_queries_get_one_error_shape(client, built):
    post = lambda body: client.post("/search", json=body)  # noqa: E731
    assert error_of(post({"text": "a cat", "k": 51}), 400, "k_too_large") == \
        "k=51 is over the server's limit of 50 (--max-k)"
    assert error_of(post({"text": "a cat", "k": 0}), 400, "bad_k") == "k must be at least 1, got 0"
    assert error_of(post({"text": "a cat", "rerank": 500, "index": "itm"}), 400, "bad_rerank").startswith(
        "rerank must be between 1 and 50")
    assert error_of(post({"text": "a cat", "index": "cats"}), 404, "unknown_index") == \
        "index 'cats' is not served; served: pairs, joint/image, joint/text, itm (GET /indexes)"
    assert error_of(post({"text": "a cat", "k": "many"}), 400, "invalid_request").startswith(
        "k: Input should be a valid integer")
    assert error_of(post({"txt": "a cat"}), 400, "invalid_request") == "txt: Extra inputs are not permitted"
    assert error_of(post({"text": "a cat", "rerank_score": "best"}), 400, "invalid_request").startswith("rerank_score:")
    assert error_of(post({}), 400, "bad_query") == "give exactly one of text, image or embedding (got none)"
    assert error_of(post({"text": "a", "embedding": [1.0]}), 400, "bad_query").endswith("(got text, embedding)")
    assert error_of(post({"text": "   "}), 400, "bad_query") == "text: the text query is empty; give some words to search for"
    assert "over the limit of 1000" in error_of(post({"text": "x" * 1001}), 400, "bad_query")
    assert error_of(post({"embedding": [1.0, 2.0]}), 400, "bad_query") == \
        "embedding has 2 values; index 'pairs' holds 16-dimensional vectors"
    assert error_of(post({"embedding": [0.0] * 16}), 400, "bad_query") == "embedding must be finite and not all zeros"
    assert error_of(post({"image": "not base64!"}), 400, "bad_image").startswith("image: not valid base64")
    assert error_of(post({"image": base64.b64encode(b"plain text").decode()}), 400, "not_an_image") == \
        "upload 'image (base64)' is not an image: not a readable image (unknown or corrupt format)"
    assert error_of(client.post("/search", content=b"{oops", headers={"content-type": "application/json"}),
                    400, "bad_request") == "the request body is not valid JSON"
    assert error_of(client.post("/search", content=b"[1, 2]", headers={"content-type": "application/json"}),
                    400, "bad_request").startswith("send a JSON object")
    assert error_of(client.post("/search", content=b"text=cat", headers={"content-type": "text/plain"}),
                    415, "unsupported_media_type").startswith("content type 'text/plain'")


def test_bad_uploads(client, built):
    assert error_of(client.post("/search", files={"image": ("notes.txt", b"hello, world", "text/plain")}),
                    400, "not_an_image") == \
        "upload 'notes.txt' is not an image: not a readable image (unknown or corrupt format)"
    assert error_of(client.post("/search", files={"image": ("empty.png", b"", "image/png")}), 400, "not_an_image") == \
        "upload 'empty.png' is empty: send an image file"
    assert error_of(client.post("/search", files={"photo": ("a.png", b"x", "image/png")}), 400, "bad_request") == \
        "upload field 'photo': send the image as the field 'image'"
    truncated = png_bytes(built / "images" / "img0.png")[:200]
    assert "is not an image" in error_of(client.post("/search", files={"image": ("cut.png", truncated)}),
                                         400, "not_an_image")


def test_image_ids_and_traversal_attempts_are_404(client, built):
    assert error_of(client.get(f"/image/pairs/{N}"), 404, "unknown_id") == \
        f"index 'pairs' has no id '{N}' (ids 0..{N - 1})"
    for url in ("/image/pairs/-1", "/image/pairs/1.0", "/image/pairs/abc", "/image/pairs/%2e%2e", "/image/pairs/%200",
                "/image/pairs/%D9%A1"):  # a non-ASCII digit
        error_of(client.get(url), 404, "unknown_id")
    for url in ("/image/..%2F..%2Fetc/0", "/image/%2e%2e/0", "/image/pairs%2F..%2F..%2Fetc/0", "/image/nope/0",
                "/image/pairs/..%2F..%2Fetc%2Fpasswd", "/image/pairs/0%2F..%2F..%2Fetc%2Fpasswd"):
        error_of(client.get(url), 404, "unknown_index")  # decoded %2F splits the name from the last part
    for url in ("/image/../../etc/passwd", "/image/pairs", "/nothing"):
        assert error_of(client.get(url), 404, "not_found").startswith("no such endpoint: GET /")
    assert error_of(client.put("/search"), 405, "method_not_allowed") == "PUT is not allowed on /search"
    assert error_of(client.get("/search"), 405, "method_not_allowed") == "GET is not allowed on /search"


def test_stored_image_values(tmp_path):
    """Paths, images inside shards (shard.tar:key), and values that must not be served."""
    data = b"\x89PNG fake"
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for name, payload in (("000001.txt", b"a caption"), ("000001.png", data)):
            member = tarfile.TarInfo(name)
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
    assert stored_image(f"{tmp_path}/00000.tar:000001", tmp_path) == (data, "image/png")
    assert stored_image("00000.tar:000001", tmp_path) == (data, "image/png")  # relative to the index folder
    (tmp_path / "secret.txt").write_text("no")
    (tmp_path / "pic.jpg").write_bytes(b"jpeg")
    assert stored_image(str(tmp_path / "pic.jpg"), tmp_path) == (b"jpeg", "image/jpeg")
    for value, message in ((str(tmp_path / "secret.txt"), "not an image by its name"),
                           (f"{tmp_path}/00000.tar:000002", "holds no image"), ("", "stores no image file"),
                           (str(tmp_path / "gone.png"), "no longer on disk")):
        with pytest.raises(ApiError, match=message) as caught:
            stored_image(value, tmp_path)
        assert caught.value.status == 404


def test_shard_images_resolve_by_the_data_readers_keys(tmp_path):
    """Keys as the data readers give them (webdataset's: up to the first dot of the base name, folders
    kept) find the image: subfolders, dotted folders, a sample with two image members (jpg first, as
    parse_sample picks); a key is looked up in the tar's members only, so '../' finds nothing."""
    from vlpretrain.data.shard_format import read_shard_samples

    members = [("sub/dir/000001.txt", b"one"), ("sub/dir/000001.png", b"png one"),
               ("v1.2/000002.txt", b"two"), ("v1.2/000002.JPG", b"jpg two"),
               ("000003.txt", b"three"), ("000003.png", b"png three"), ("000003.jpg", b"jpg three"),
               ("000004.txt", b"four"), ("000004.meta.webp", b"not its image")]
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for name, payload in members:
            member = tarfile.TarInfo(name)
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
    bad = []
    samples = list(read_shard_samples(tmp_path / "00000.tar", lambda source, why: bad.append(source)))
    assert [s.key for s in samples] == ["sub/dir/000001", "v1.2/000002", "000003"] and len(bad) == 1
    for sample in samples:  # the value an index stores for a shard sample without an original path
        assert stored_image(sample.source, tmp_path) == (sample.image, f"image/{sample.image_ext}".replace(
            "jpg", "jpeg"))
    for key in ("000004", "000004.meta", "../000003", "sub/../sub/dir/000001", "/etc/passwd"):
        with pytest.raises(ApiError, match="holds no image"):
            stored_image(f"{tmp_path}/00000.tar:{key}", tmp_path)


# ---------------------------------------------------------------------------- limits and keys


def test_upload_limit_is_413(service, built):
    with TestClient(create_app(service, max_upload_mb=0.001)) as small:  # 1000 bytes
        image = png_bytes(built / "images" / "img0.png")
        assert len(image) > 1000
        message = error_of(small.post("/search", files={"image": ("big.png", image)}), 413, "payload_too_large")
        assert message == "the request body is over the server's limit of 1000 bytes (--max-upload-mb)"

        def chunks():  # no Content-Length: counted while it arrives
            yield b'{"text": "'
            yield b"a" * 2000
            yield b'"}'

        error_of(small.post("/search", content=chunks(), headers={"content-type": "application/json"}),
                 413, "payload_too_large")
        assert small.post("/search", json={"text": "a red square", "k": 1}).status_code == 200


def test_api_key(service, built):
    with TestClient(create_app(service, api_key="s3cret")) as keyed:
        for path in ("/indexes", "/image/pairs/0"):
            assert error_of(keyed.get(path), 401, "unauthorized").startswith("this server needs its API key")
        error_of(keyed.post("/search", json={"text": "a cat"}), 401, "unauthorized")
        error_of(keyed.get("/indexes", headers={"X-API-Key": "wrong"}), 401, "unauthorized")
        assert keyed.get("/indexes", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert keyed.get("/indexes", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        keyed.cookies.set("vlp_api_key", "s3cret")
        assert keyed.get("/image/pairs/0").status_code == 200
        keyed.cookies.clear()
        # the page, its files, /health and the API docs hold no indexed data: open, so the page can ask for the key
        for path in ("/", "/static/app.js", "/health", "/docs", "/openapi.json"):
            assert keyed.get(path).status_code == 200, path
        assert keyed.get("/health").json()["api_key_required"] is True


def test_api_key_cookie_is_url_decoded(service, built):
    """The page stores encodeURIComponent(key) in the cookie: keys with + / = : still open /image."""
    from urllib.parse import quote

    key = "a+b/c=d:e%f"
    with TestClient(create_app(service, api_key=key)) as keyed:
        keyed.cookies.set("vlp_api_key", quote(key, safe=""))  # what encodeURIComponent writes
        assert keyed.get("/image/pairs/0").status_code == 200
        keyed.cookies.set("vlp_api_key", quote("a+b/c=d:e%g", safe=""))
        error_of(keyed.get("/image/pairs/0"), 401, "unauthorized")
        assert keyed.get("/indexes", headers={"X-API-Key": key}).status_code == 200


def test_batcher_close_fails_waiting_queries():
    """Queries being embedded or still queued when the batcher closes fail with a clear error, not hang."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    started, release = threading.Event(), threading.Event()

    def encode(texts):
        started.set()
        release.wait(10)
        return np.zeros((len(texts), 2), np.float32)

    async def scenario():
        batcher = TextBatcher(encode, ThreadPoolExecutor(1), max_batch=1, max_wait_s=0.0)
        tasks = [asyncio.ensure_future(batcher.encode(f"q{i}")) for i in range(3)]
        while not started.is_set():  # q0 is in the model's thread, q1 and q2 are queued
            await asyncio.sleep(0.001)
        await batcher.close()
        release.set()
        return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)

    results = asyncio.run(scenario())
    assert [str(r) for r in results] == ["the text query was not embedded: the server is shutting down"] * 3
    assert all(isinstance(r, RuntimeError) for r in results)


def test_text_batcher_batches_concurrent_queries():
    """Queries waiting together are embedded in one call; each gets its own vector; a failed batch
    fails its queries only, and the worker goes on."""
    from concurrent.futures import ThreadPoolExecutor

    calls = []

    def encode(texts):
        calls.append(list(texts))
        if "boom" in texts:
            raise RuntimeError("encoder failed")
        return np.array([[len(t), i] for i, t in enumerate(texts)], dtype=np.float32)

    async def scenario():
        batcher = TextBatcher(encode, ThreadPoolExecutor(1), max_batch=4, max_wait_s=5.0)
        texts = [f"query {'x' * i}" for i in range(8)]
        vectors = await asyncio.gather(*(batcher.encode(t) for t in texts))
        failed = await asyncio.gather(batcher.encode("boom"), *(batcher.encode(f"q{i}") for i in range(3)),
                                      return_exceptions=True)
        after = await asyncio.gather(*(batcher.encode(t) for t in texts[:4]))
        await batcher.close()
        return texts, vectors, failed, after, batcher

    texts, vectors, failed, after, batcher = asyncio.run(scenario())
    assert calls[:2] == [texts[:4], texts[4:]]
    assert [v[0] for v in vectors] == [len(t) for t in texts]
    assert all(isinstance(f, RuntimeError) for f in failed)
    assert [v[0] for v in after] == [len(t) for t in texts[:4]]
    assert batcher.batches == 3 and batcher.texts == 12


def test_concurrent_text_queries_share_a_forward_pass(service, built):
    """Through the app: concurrent queries give the same hits as one at a time, in fewer forward passes."""
    app = create_app(service)
    texts = [f"a {c} square" for c in ("red", "green", "blue", "yellow", "purple", "orange")]

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            single = [(await c.post("/search", json={"text": t, "k": 3})).json()["hits"] for t in texts]
            before = service.batchers[service.indexes["pairs"].model_key].batches
            together = await asyncio.gather(*(c.post("/search", json={"text": t, "k": 3}) for t in texts))
            after = service.batchers[service.indexes["pairs"].model_key].batches
        return single, [r.json()["hits"] for r in together], after - before

    single, together, passes = asyncio.run(run())
    for a, b in zip(single, together):
        assert [h["id"] for h in a] == [h["id"] for h in b]
        np.testing.assert_allclose([h["score"] for h in a], [h["score"] for h in b], atol=1e-5)
    assert 1 <= passes <= len(texts)


# ---------------------------------------------------------------------------- command line


def test_cli_refusals(built, capsys, monkeypatch):
    assert main(["index", "serve", str(built / "pairs"), "--host", "0.0.0.0"]) == 2
    assert capsys.readouterr().err.strip() == ("vlp index: error: --host 0.0.0.0 is reachable from other machines: "
                                               "give --api-key KEY (or set VLP_API_KEY), or bind 127.0.0.1")
    assert main(["index", "serve", str(built / "nope")]) == 2
    assert "no such index folder" in capsys.readouterr().err
    assert main(["index", "serve", str(built / "pairs"), str(built / "pairs")]) == 2
    assert "two indexes are named 'pairs'" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["index", "serve", str(built / "pairs"), "--port", str(port)]) == 2
    assert capsys.readouterr().err.strip() == (f"vlp index: error: cannot listen on 127.0.0.1:{port} (Address already "
                                               f"in use): choose another --port or --host")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    assert main(["index", "serve", str(built / "pairs")]) == 2
    assert capsys.readouterr().err.strip() == ("vlp index: error: serving needs the serve extra (no module named "
                                               "'uvicorn'): pip install 'vlpretrain[serve]'")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_real_uvicorn_server(built):
    """`vlp index serve` in its own process on a free 127.0.0.1 port: queried over HTTP, then stopped."""
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([sys.executable, "-m", "vlpretrain.cli.main", "index", "serve", f"emoji={built / 'pairs'}",
                             "--port", str(port), "--max-k", "7"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # up to a minute for torch, the model and the index to load
            if proc.poll() is not None:
                pytest.fail(f"the server exited early:\n{proc.stdout.read()}")
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        with httpx.Client(base_url=base, timeout=30) as c:
            hits = c.post("/search", json={"text": "a red square", "k": 3}).json()["hits"]
            expected = RetrievalIndex.load(built / "pairs").search(texts="a red square", k=3)[0]
            assert [h["id"] for h in hits] == [h["id"] for h in expected]
            assert c.get(hits[0]["image_url"]).content == Path(expected[0]["image"]).read_bytes()
            assert c.post("/search", json={"text": "a", "k": 8}).json()["error"]["code"] == "k_too_large"
            assert [d["name"] for d in c.get("/indexes").json()["indexes"]] == ["emoji"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode == 0, out
    assert f"serving emoji at http://127.0.0.1:{port}/" in out
