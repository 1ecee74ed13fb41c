"""vlpretrain.io: the guarantees every writer of the toolkit relies on."""

from __future__ import annotations

import json
import math
import os
import re
import stat

import pytest

from vlpretrain.io import (atomic_write, is_our_figure, read_manifest, save_figure, write_folder_atomically, write_json,
                           write_text)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield 0o022
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_keeps_the_old_file_when_write_fails(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old")

    def fail(tmp):
        tmp.write_text("half of the new")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # no temp file behind


def test_atomic_write_replaces_and_creates_parents(tmp_path):
    path = tmp_path / "a" / "b" / "out.txt"
    assert atomic_write(path, lambda tmp: tmp.write_text("one")) == path
    atomic_write(path, lambda tmp: tmp.write_text("two"))
    assert path.read_text() == "two"
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.txt"]


def test_new_files_and_folders_get_the_umask_permissions(tmp_path, umask_022):
    text = write_text(tmp_path / "summary.md", "# hi\n")
    js = write_json({"a": 1}, tmp_path / "r.json")
    png = atomic_write(tmp_path / "plot.png", lambda tmp: tmp.write_bytes(b"\x89PNG"))
    assert _mode(text) == _mode(js) == _mode(png) == 0o666 & ~umask_022 == 0o644  # not mkstemp's 0o600
    folder = write_folder_atomically(tmp_path / "export", lambda tmp: (tmp / "a.txt").write_text("x"))
    assert _mode(folder) == 0o777 & ~umask_022 == 0o755  # not mkdtemp's 0o700


def test_write_json_keeps_nan(tmp_path):
    path = write_json({"metrics": {"acc1": 0.5, "acc5": float("nan")}}, tmp_path / "zs.json")
    assert '"acc5": NaN' in path.read_text()
    data = json.loads(path.read_text())
    assert data["metrics"]["acc1"] == 0.5 and math.isnan(data["metrics"]["acc5"])
    assert path.read_text() == json.dumps(data, indent=2)  # indented, as CLIP_benchmark's files


def test_read_manifest_errors_name_the_file_and_the_fix(tmp_path):
    advice = "export again with `vlp embed`"
    fmt = "vlpretrain-embeddings-v1"
    path = tmp_path / "manifest.json"
    with pytest.raises(FileNotFoundError) as e:
        read_manifest(path, fmt, advice)
    assert str(e.value) == f"{path}: not found: export again with `vlp embed`"

    path.write_text("nope")
    with pytest.raises(ValueError) as e:
        read_manifest(path, fmt, advice)
    assert str(e.value) == (f"{path}: not valid JSON (Expecting value: line 1 column 1 (char 0)): "
                            f"export again with `vlp embed`")

    path.write_text(json.dumps({"format": "vlpretrain-embeddings-v0"}))
    with pytest.raises(ValueError) as e:
        read_manifest(path, fmt, advice)
    assert str(e.value) == (f"{path}: format 'vlpretrain-embeddings-v0' is not 'vlpretrain-embeddings-v1': "
                            f"export again with `vlp embed`")

    path.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError) as e:
        read_manifest(path, fmt, advice)
    assert str(e.value) == f"{path}: format None is not 'vlpretrain-embeddings-v1': export again with `vlp embed`"

    path.write_text(json.dumps({"format": fmt, "rows": 3}))
    assert read_manifest(path, fmt, advice) == {"format": fmt, "rows": 3}


def test_write_folder_atomically_replaces_a_folder(tmp_path):
    out = tmp_path / "exports" / "x"
    out.mkdir(parents=True)
    (out / "stale.txt").write_text("old")
    assert write_folder_atomically(out, lambda tmp: (tmp / "a.txt").write_text("new")) == out
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]
    assert (out / "a.txt").read_text() == "new"
    assert sorted(p.name for p in out.parent.iterdir()) == ["x"]  # no temp or old folder beside it


def test_write_folder_atomically_leaves_the_folder_intact_when_write_fails(tmp_path):
    out = tmp_path / "x"
    out.mkdir()
    (out / "a.txt").write_text("old")

    def fail(tmp):
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        write_folder_atomically(out, fail)
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]
    assert (out / "a.txt").read_text() == "old"
    assert not [p.name for p in tmp_path.iterdir() if re.search(r"\.tmp-", p.name)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def test_our_figures_are_told_from_other_files(tmp_path):
    from matplotlib.figure import Figure
    from PIL import Image

    fig = Figure(figsize=(1, 1))
    fig.add_subplot().plot([0, 1])
    assert is_our_figure(save_figure(fig, tmp_path / "ours.png"))
    fig.savefig(tmp_path / "matplotlib.png")  # the same library, not written by us
    Image.new("RGB", (2, 2)).save(tmp_path / "pil.png")
    (tmp_path / "notes.png").write_text("not an image")
    assert [is_our_figure(tmp_path / n) for n in ("matplotlib.png", "pil.png", "notes.png", "missing.png")] == [
        False, False, False, False]
