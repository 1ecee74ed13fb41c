"""Where index and embedding writes may go: a user's folder or file is refused, stale temporary folders of
killed builds are removed, and one writer at a time (a lock that a SIGKILL cannot leave behind)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("faiss")

from helpers import vlp, write_image_csv  # noqa: E402
from vlpretrain.cli.main import main  # noqa: E402
from vlpretrain.data import open_corpus  # noqa: E402
from vlpretrain.io import folder_lock  # noqa: E402
from vlpretrain.retrieval import export_embeddings  # noqa: E402
from vlpretrain.retrieval.index import RetrievalIndex, read_info  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _export(model, checkpoint, folder: Path, n: int, seed: int):
    corpus = open_corpus(str(write_image_csv(folder / "data", n, seed=seed)))
    return export_embeddings(model, corpus, folder / "emb", spec=str(checkpoint), progress=False).path


@pytest.fixture(scope="module")
def embs(tmp_path_factory, model, checkpoint) -> list[Path]:
    """Three embedding folders of the session model: 6, 3 and 2 rows."""
    root = tmp_path_factory.mktemp("embs")
    return [_export(model, checkpoint, root / f"part{i}", n, seed=i) for i, n in enumerate((6, 3, 2))]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _build(capsys, *args) -> tuple[int, str]:
    code = main(["index", "build", *map(str, args), "--no-progress"])
    return code, capsys.readouterr().err


# ----------------------------------------------------------------------------- destinations


def test_build_refuses_a_folder_that_is_not_an_index(tmp_path, embs, capsys):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.txt").write_text("keep me")
    code, err = _build(capsys, embs[0], "--out", out)
    assert code == 2 and err == (f"vlp index: error: --out {out}: exists and is not a vlpretrain index folder (it has "
                                 f"no info.json); choose another --out, or delete it to build there\n")
    assert _snapshot(out) == {"holiday.txt": b"keep me"}
    assert sorted(os.listdir(tmp_path)) == ["photos"]  # nothing beside it either


def test_build_refuses_a_file_and_leaves_it_where_it_is(tmp_path, embs, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("my notes")
    code, err = _build(capsys, embs[0], "--out", out)
    assert code == 2 and err == (f"vlp index: error: --out {out}: exists and is not a folder; choose another --out, "
                                 f"or delete it to build there\n")
    assert out.read_text() == "my notes" and sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_build_from_a_model_refuses_before_exporting(tmp_path, checkpoint, capsys):
    csv = write_image_csv(tmp_path / "data", 4)
    out = tmp_path / "photos"
    out.mkdir()
    (out / "a.jpg").write_bytes(b"jpeg")
    code, err = _build(capsys, "--model", checkpoint, "--data", csv, "--out", out)
    assert code == 2 and err.startswith(f"vlp index: error: --out {out}: exists and is not a vlpretrain index folder")
    assert _snapshot(out) == {"a.jpg": b"jpeg"} and sorted(os.listdir(tmp_path)) == ["data", "photos"]


def test_empty_folder_and_earlier_index_are_replaced(tmp_path, embs, capsys):
    out = tmp_path / "idx"
    out.mkdir()
    assert _build(capsys, embs[0], "--out", out)[0] == 0
    assert read_info(out)["ntotal"] == 6
    assert _build(capsys, embs[1], "--out", out)[0] == 0  # our own index: rebuilt in place
    assert read_info(out)["ntotal"] == 3 and sorted(os.listdir(tmp_path)) == ["idx"]


STALE = ".idx.tmp-k2x_9qa1"  # exactly as io.temp_folder_beside names them
NOT_OURS = [".idx.tmp-K2X_9QA1", ".idx.tmp-k2x_9qa", ".idx.tmp-k2x_9qa12", "idx.tmp-k2x_9qa1", ".idx2.tmp-k2x_9qa1",
            ".idx.tmp-k2x_9qa1.bak"]


def _plant(parent: Path, names: list[str]) -> None:
    for name in names:
        (parent / name).mkdir()
        (parent / name / "index.faiss").write_bytes(b"half")


def test_stale_temp_folders_of_killed_builds_are_removed_and_only_those(tmp_path, embs, capsys):
    _plant(tmp_path, [STALE] + NOT_OURS)
    (tmp_path / ".idx.tmp-file1234").write_text("a file, not a folder of ours")
    assert _build(capsys, embs[0], "--out", tmp_path / "idx")[0] == 0
    assert sorted(os.listdir(tmp_path)) == sorted(["idx", ".idx.tmp-file1234"] + NOT_OURS)
    # `vlp index add` rewrites the folder the same way, so it clears them too.
    _plant(tmp_path, [STALE, ".idx.tmp-00000000"])
    assert main(["index", "add", str(tmp_path / "idx"), str(embs[1]), "--no-progress"]) == 0
    assert sorted(os.listdir(tmp_path)) == sorted(["idx", ".idx.tmp-file1234"] + NOT_OURS)
    assert read_info(tmp_path / "idx")["ntotal"] == 9


# ----------------------------------------------------------------------------- one writer


def test_lock_refuses_a_second_holder_and_is_removed_on_release(tmp_path):
    folder = tmp_path / "out"
    lock_file = tmp_path / ".out.lock"
    with folder_lock(folder, "wait for it") as held:
        assert held == lock_file and lock_file.read_text() == f"{os.getpid()}\n"
        umask = os.umask(0)
        os.umask(umask)
        assert lock_file.stat().st_mode & 0o777 == 0o666 & ~umask  # the umask's mode, like any new file
        with pytest.raises(BlockingIOError) as e:
            with folder_lock(folder):
                pass
        assert str(e.value) == (f"{folder} is being written by another vlp process (pid {os.getpid()}); wait for it, "
                                f"or choose another folder")  # the default advice
    assert not lock_file.exists() and not folder.exists()  # the lock creates nothing else
    with folder_lock(folder):  # free again
        pass


HOLD = """
import sys, time
from vlpretrain.io import folder_lock
with folder_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


@pytest.mark.slow
def test_a_killed_holder_leaves_no_lock(tmp_path):
    folder = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(BlockingIOError, match=rf"^{folder} is being written by another vlp process "
                                                  rf"\(pid {holder.pid}\); "):
            with folder_lock(folder):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    assert holder.returncode == -signal.SIGKILL
    assert (tmp_path / ".out.lock").exists()  # the file stays after a kill, but not the lock
    with folder_lock(folder):
        assert (tmp_path / ".out.lock").read_text() == f"{os.getpid()}\n"
    assert not (tmp_path / ".out.lock").exists()


@pytest.mark.slow
def test_index_commands_refuse_a_folder_another_process_writes(tmp_path, embs):
    """Real `vlp` processes started while this test holds the lock (as another vlp command would): each
    refuses at once with one line, and the folder is left as it was."""
    idx = tmp_path / "idx"
    RetrievalIndex.build(embs[0], idx, progress=False)
    before = _snapshot(idx)
    busy = f"is being written by another vlp process (pid {os.getpid()})"
    with folder_lock(idx):
        add = vlp("index", "add", str(idx), str(embs[1]), "--no-progress")
        build = vlp("index", "build", str(embs[1]), "--out", str(idx), "--no-progress")
    assert (add.returncode, add.stderr) == (2, f"vlp index: error: {idx} {busy}; wait for it to finish, then add "
                                               f"again\n")
    assert (build.returncode, build.stderr) == (2, f"vlp index: error: {idx} {busy}; wait for it, or choose another "
                                                   f"--out\n")
    assert _snapshot(idx) == before


@pytest.mark.slow
def test_embed_refuses_a_folder_another_process_writes(tmp_path, checkpoint):
    busy = f"is being written by another vlp process (pid {os.getpid()})"
    out = tmp_path / "emb"
    csv = write_image_csv(tmp_path / "data", 3)
    with folder_lock(out):
        embed = vlp("embed", "--model", str(checkpoint), "--data", str(csv), "--out", str(out), "--num-workers", "0",
                    "--no-progress")
    assert (embed.returncode, embed.stderr.splitlines()[-1]) == (
        2, f"vlp embed: error: {out} {busy}; wait for it, or choose another --out")
    assert not out.exists()


def test_add_after_another_writer_adds_to_the_folder_as_it_is_now(tmp_path, embs):
    idx = tmp_path / "idx"
    RetrievalIndex.build(embs[0], idx, progress=False)
    first, second = RetrievalIndex.load(idx), RetrievalIndex.load(idx)
    first.add(embs[1], progress=False)
    second.add(embs[2], progress=False)  # loaded before first's add: must not drop its vectors
    info = read_info(idx)
    assert info["ntotal"] == second.ntotal == 6 + 3 + 2
    assert info["sources"] == [str(e.resolve()) for e in embs]
    assert RetrievalIndex.load(idx).meta["image"].tolist() == second.meta["image"].tolist()


@pytest.mark.slow
def test_two_process_embed_refused_as_one(tmp_path, checkpoint):
    """Under `accelerate launch`, the main process asks for the lock for both: both stop with its line
    (neither waits for the other at a barrier)."""
    import shutil

    csv = write_image_csv(tmp_path / "data", 4)
    out = tmp_path / "emb"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "vlpretrain.cli.main", "embed", "--model", str(checkpoint), "--data", str(csv), "--out", str(out),
           "--num-workers", "0", "--no-progress"]
    with folder_lock(out):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    line = f"vlp embed: error: {out} is being written by another vlp process (pid {os.getpid()}); wait for it, or " \
           f"choose another --out"
    assert proc.returncode != 0 and proc.stderr.count(line) == 2, proc.stderr[-3000:]
    assert not out.exists()


def test_a_finished_export_from_shards_is_reused(tmp_path, model, checkpoint, caplog):
    """Rerunning an export from WebDataset shards into its own finished --out does nothing (its manifest
    records the input shards as num_shards: it was refused as "made with None input shards")."""
    from helpers import write_test_shards
    from vlpretrain.data.shard_corpus import ShardCorpus

    write_test_shards(tmp_path / "shards", [3, 2], manifest=True)
    corpus = ShardCorpus(str(tmp_path / "shards"))
    first = export_embeddings(model, corpus, tmp_path / "emb", spec=str(checkpoint), progress=False)
    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "emb").rglob("*") if p.is_file()}
    with caplog.at_level("INFO", logger="vlpretrain.retrieval.embeddings"):
        again = export_embeddings(model, corpus, tmp_path / "emb", spec=str(checkpoint), progress=False)
    assert "export already finished" in caplog.text and again.manifest == first.manifest
    assert {p: p.stat().st_mtime_ns for p in written} == written
