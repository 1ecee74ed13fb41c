"""`vlp data shard` / write_shards: layout, resizing, bad images, resume after a kill, processes, errors."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from vlpretrain.cli.main import main
from vlpretrain.data import TableCorpus
from vlpretrain.data.shard_format import read_shard_samples, resolve_shards
from vlpretrain.data.shard_writer import STATE_NAME, write_shards

from helpers import huge_header_png

ROOT = Path(__file__).resolve().parents[1]


def _noise(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    channels = {"RGB": 3, "L": 1}[mode]
    array = (np.random.default_rng(seed).random((height, width, channels)) * 255).astype("uint8")
    return Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode)


def _corpus_csv(folder: Path) -> Path:
    """10 rows: good images of several shapes and modes, an RGBA one, and three bad files."""
    images = folder / "images"
    images.mkdir(parents=True)
    _noise(40, 20, 0).save(images / "wide.png")
    _noise(20, 40, 1).save(images / "tall.png")
    rgba = np.zeros((40, 40, 4), "uint8")
    rgba[:, 20:] = (255, 0, 0, 255)  # left half fully transparent (stored as black), right half red
    Image.fromarray(rgba, "RGBA").save(images / "rgba.png")
    (images / "corrupt.png").write_bytes(b"this is not an image at all" * 10)
    buffer = io.BytesIO()
    _noise(64, 64, 2).save(buffer, "PNG")
    (images / "truncated.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    huge_header_png(images / "huge.png", 100_000, 100_000)  # decoding would need ~30 GB
    _noise(30, 30, 3).save(images / "square.png")
    _noise(10, 12, 4).save(images / "small.png")
    _noise(50, 25, 5, "L").save(images / "gray.png")
    Image.fromarray(np.full((20, 20, 2), 128, "uint8"), "LA").save(images / "la.png")
    rows = [("wide.png", "a wide image", "wide", "w"), ("tall.png", "a tall image", "", "t"),
            ("rgba.png", "half red", "", "r"), ("corrupt.png", "corrupt", "", "c"),
            ("truncated.png", "truncated", "", "x"), ("huge.png", "huge", "", "h"),
            ("square.png", "a square", "square two", "s"), ("small.png", "small", "", "m"),
            ("gray.png", "gray", "", "g"), ("la.png", "grey alpha", "", "l")]
    lines = ["image,caption,caption_2,label"] + [f"images/{a},{b},{c},{d}" for a, b, c, d in rows]
    path = folder / "pairs.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


BAD_ROWS = {3: "unreadable", 4: "decode_failed", 5: "too_large"}


@pytest.fixture()
def corpus(tmp_path):
    return TableCorpus(_corpus_csv(tmp_path / "src"), caption_column=["caption", "caption_2"])


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _members(tar_path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(tar_path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def test_layout_contents_stats_and_manifest(tmp_path, corpus):
    out = tmp_path / "shards"
    manifest = write_shards(corpus, out, image_size=16, shard_size=4, image_format="png", progress=False,
                            source="pairs")
    assert sorted(_files(out)) == [STATE_NAME, "00000.tar", "00000_stats.json", "00001.tar", "00001_stats.json",
                                   "00002.tar", "00002_stats.json", "manifest.json"]
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"rows": 10, "written": 7, "skipped": 3, "dropped_when_read": 0,
                                  "skipped_by_reason": {"unreadable": 1, "decode_failed": 1, "too_large": 1}}
    assert [s["samples"] for s in manifest["shards"]] == [3, 2, 2]

    # Shard 0: rows 0-3, row 3 is the corrupt file; members in key order, image / txt / json.
    members = _members(out / "00000.tar")
    assert [name for name, _ in members] == [f"00000000{k}.{ext}" for k in range(3) for ext in ("png", "txt", "json")]
    with tarfile.open(out / "00000.tar") as tar:
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in tar.getmembers()} == {(0, 0, 0, "", "", 0o644)}
    content = dict(members)
    assert content["000000000.txt"] == b"a wide image"
    meta = json.loads(content["000000000.json"])
    assert meta["captions"] == ["a wide image", "wide"]
    assert meta["source_path"] == str((tmp_path / "src" / "images" / "wide.png").resolve())
    assert (meta["width"], meta["height"], meta["original_width"], meta["original_height"]) == (32, 16, 40, 20)
    assert meta["label"] == "w" and meta["key"] == "000000000"
    assert "captions" not in json.loads(content["000000001.json"])  # one caption: the .txt alone

    stats = [json.loads((out / f"0000{k}_stats.json").read_text()) for k in range(3)]
    assert [(s["written"], s["skipped"]) for s in stats] == [(3, 1), (2, 2), (2, 0)]
    skipped = [item for s in stats for item in s["skipped_samples"]]
    assert [(item["key"], item["kind"]) for item in skipped] == [(f"00000000{r}", kind) for r, kind in BAD_ROWS.items()]
    assert [item["source"] for item in skipped] == [corpus[r].source for r in BAD_ROWS]
    assert "100000x100000" in skipped[2]["reason"] and "not decoded" in skipped[2]["reason"]

    shards = resolve_shards(out, verify=True)
    assert [s.samples for s in shards] == [3, 2, 2]
    bad: list = []
    samples = [s for info in shards for s in read_shard_samples(info.path, lambda src, why: bad.append(src))]
    assert bad == []
    good = [r for r in range(10) if r not in BAD_ROWS]
    assert [s.key for s in samples] == [f"{r:09d}" for r in good]
    assert [s.captions for s in samples] == [corpus[r].captions for r in good]


def test_resize_shorter_side_max_side_and_transparency(tmp_path, corpus):
    def sizes(out: Path) -> dict[str, tuple]:
        found = {}
        for info in resolve_shards(out, verify=True):
            for s in read_shard_samples(info.path, lambda *a: None):
                image = Image.open(io.BytesIO(s.image))
                assert image.size == (s.meta["width"], s.meta["height"]) and image.mode == "RGB"
                found[s.key[-1]] = image.size
        return found

    short = tmp_path / "short"
    write_shards(corpus, short, image_size=16, shard_size=10, image_format="png", progress=False)
    # Shorter side 16, aspect kept; the 10x12 image is not enlarged.
    assert sizes(short) == {"0": (32, 16), "1": (16, 32), "2": (16, 16), "6": (16, 16), "7": (10, 12),
                            "8": (32, 16), "9": (16, 16)}
    longer = tmp_path / "longer"
    write_shards(corpus, longer, max_side=16, shard_size=10, image_format="png", progress=False)
    assert sizes(longer) == {"0": (16, 8), "1": (8, 16), "2": (16, 16), "6": (16, 16), "7": (10, 12),
                             "8": (16, 8), "9": (16, 16)}

    with tarfile.open(short / "00000.tar") as tar:
        rgba = Image.open(io.BytesIO(tar.extractfile("000000002.png").read()))
    assert rgba.getpixel((0, 8)) == (255, 255, 255)  # transparent -> white, not the stored black
    assert rgba.getpixel((15, 8)) == (255, 0, 0)


def test_max_pixels_skips_without_decoding(tmp_path, corpus, monkeypatch):
    decoded: list = []  # the files PIL decodes (ImageFile.load is where pixels are read)
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.filename) or real_load(self))
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL must not warn first
        manifest = write_shards(corpus, tmp_path / "out", max_pixels=1500, shard_size=10, progress=False)
    # 40x40 = 1600, 64x64 (the truncated PNG), 100000x100000 (a header) are over the limit; 50x25 is not.
    names = {Path(p).name for p in decoded}
    assert not names & {"huge.png", "rgba.png", "truncated.png"} and "gray.png" in names
    assert manifest["counts"]["skipped_by_reason"] == {"unreadable": 1, "too_large": 3}
    stats = json.loads((tmp_path / "out" / "00000_stats.json").read_text())
    too_large = [s["source"] for s in stats["skipped_samples"] if s["kind"] == "too_large"]
    assert too_large == [corpus[2].source, corpus[4].source, corpus[5].source]
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # restored after writing


def test_cli_exits_zero_with_bad_images_and_prints_summary(tmp_path, corpus, capsys):
    csv = tmp_path / "src" / "pairs.csv"
    out = tmp_path / "out"
    assert main(["data", "shard", str(csv), "--out", str(out), "--caption-column", "caption,caption_2",
                 "--image-size", "16", "--shard-size", "4", "--format", "webp", "--quality", "80", "--no-progress"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"wrote 7 of 10 rows of {csv}, skipped 3 (1 decode_failed, 1 too_large, "
                                 f"1 unreadable; named in *_stats.json); 3 shards, ")
    assert printed[1] == f"manifest: {out / 'manifest.json'}"
    assert (out / "00000.tar").is_file() and _members(out / "00000.tar")[0][0] == "000000000.webp"


def test_processes_two_gives_the_same_bytes(tmp_path, corpus):
    one, two = tmp_path / "one", tmp_path / "two"
    write_shards(corpus, one, image_size=16, shard_size=3, progress=False, source="pairs")
    write_shards(corpus, two, image_size=16, shard_size=3, processes=2, progress=False, source="pairs")
    assert _files(one) == _files(two) and len(_files(one)) == 2 * 4 + 2


def test_unfinished_shard_is_rewritten_and_finished_set_kept(tmp_path, corpus):
    out, reference = tmp_path / "out", tmp_path / "reference"
    write_shards(corpus, reference, image_size=16, shard_size=4, progress=False, source="pairs")
    write_shards(corpus, out, image_size=16, shard_size=4, progress=False, source="pairs")
    # As a kill leaves it: a tar renamed into place before its stats, a temp file, no manifest.
    (out / "00001_stats.json").unlink()
    (out / "00001.tar").write_bytes((out / "00001.tar").read_bytes()[:700])
    (out / ".00002.tar.x1y2.tmp").write_bytes(b"half")
    (out / "manifest.json").unlink()
    kept = (out / "00000.tar").stat().st_mtime_ns
    manifest = write_shards(corpus, out, image_size=16, shard_size=4, progress=False, source="pairs")
    assert _files(out) == _files(reference) and (out / "00000.tar").stat().st_mtime_ns == kept
    # Finished: a rerun writes nothing and returns the same manifest.
    assert write_shards(corpus, out, image_size=16, shard_size=4, progress=False, source="pairs") == manifest
    assert (out / "00000.tar").stat().st_mtime_ns == kept


def test_killed_run_resumes_to_identical_bytes(tmp_path):
    """A real `vlp data shard` process killed after its first shard, rerun, equals an uninterrupted run."""
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    for i in range(4):
        _noise(400, 300, i).save(src / "images" / f"{i}.png")
    rows = 240
    (src / "pairs.csv").write_text("image,caption\n" + "".join(f"images/{i % 4}.png,picture {i}\n" for i in range(rows)))
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    args = ["data", "shard", str(src / "pairs.csv"), "--image-size", "24", "--shard-size", "8", "--format", "png",
            "--processes", "1", "--no-progress"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "vlpretrain.cli.main", *args, "--out", str(killed)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while not (killed / "00000_stats.json").exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no shard finished in 120 s"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "manifest.json").exists()
    assert len(list(killed.glob("*_stats.json"))) < rows // 8  # really interrupted half-way
    assert (killed / STATE_NAME).is_file()

    assert main([*args, "--out", str(killed)]) == 0
    assert main([*args, "--out", str(reference)]) == 0
    files = _files(killed)
    assert not [name for name in os.listdir(killed) if name.endswith(".tmp")]
    assert files == _files(reference) and len(files) == 2 * (rows // 8) + 2
    resolve_shards(killed, verify=True)


def test_one_line_errors(tmp_path, corpus, capsys):
    csv = str(tmp_path / "src" / "pairs.csv")

    def error(*args: str) -> str:
        assert main(["data", "shard", *args]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]

    assert error(csv, "--out", str(tmp_path / "a"), "--image-size", "0") == \
        "vlp data: error: --image-size: expected a positive number of pixels, got 0"
    assert "give one of them" in error(csv, "--out", str(tmp_path / "a"), "--image-size", "8", "--max-side", "8")
    assert "unknown image format 'gif'" in error(csv, "--out", str(tmp_path / "a"), "--format", "gif")
    assert "--quality: expected a number from 1 to 100, got 0" in error(csv, "--out", str(tmp_path / "a"), "--quality", "0")
    missing = str(tmp_path / "missing.csv")
    assert error(missing, "--out", str(tmp_path / "a")) == f"vlp data: error: {missing}: no such file"
    assert not (tmp_path / "a").exists()

    out = tmp_path / "out"
    assert main(["data", "shard", csv, "--out", str(out), "--image-size", "8", "--no-progress"]) == 0
    before = _files(out)
    assert error(csv, "--out", str(out), "--image-size", "12") == (
        f"vlp data: error: --out {out}: holds shards written with image_size=8, not 12; "
        f"choose another --out, or delete it to write it again")
    other_src = tmp_path / "src" / "other.csv"
    other_src.write_text((tmp_path / "src" / "pairs.csv").read_text())
    assert "holds shards of" in error(str(other_src), "--out", str(out), "--image-size", "8")
    assert _files(out) == before

    embeddings = tmp_path / "emb"
    embeddings.mkdir()
    (embeddings / "manifest.json").write_text(json.dumps({"format": "vlpretrain-embeddings-v1"}))
    assert error(csv, "--out", str(embeddings)) == (
        f"vlp data: error: --out {embeddings}: manifest.json is not a shard set of `vlp data shard`; "
        f"choose another --out, or delete it to write it again")

    user_folder = tmp_path / "mine"
    user_folder.mkdir()
    (user_folder / "notes.txt").write_text("keep me")
    assert "is not a folder of shards written by `vlp data shard`" in error(csv, "--out", str(user_folder))
    assert _files(user_folder) == {"notes.txt": b"keep me"}
