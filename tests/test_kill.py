"""Real kills: `vlp train`, `vlp embed`, `vlp index build` and `vlp data shard` run in a subprocess that is
sent SIGKILL at seeded points (once a seeded number of new checkpoints / shards exist, plus a seeded few
milliseconds), three times, and then run to the end; the result equals an uninterrupted run's.

Each command is killed three times in a row, each rerun continuing what the killed one left (so a resume
of a resume is tested too) and making progress before its kill. The last rerun and the reference run go
in this process (no start-up).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from safetensors.torch import load_file

from helpers import tiny_recipe, write_image_csv, write_test_shards
from vlpretrain.cli.main import main

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SEED = 19
KILLS = 3


def kill_plan(seed: int) -> list[tuple[int, float]]:
    """For each of ``KILLS`` kills: how many more units (checkpoints, shards) to wait for, 1 or 2, and
    a delay of up to 50 ms after them."""
    rng = random.Random(seed)
    return [(rng.randint(1, 2), rng.uniform(0, 0.05)) for _ in range(KILLS)]


def kill_when(args: list[str], progress: Callable[[], int], more: int, delay: float, log: Path) -> None:
    """Run ``vlp ARGS`` until ``progress()`` has grown by ``more``, wait ``delay`` s and SIGKILL it; fails
    the test when the command ended by itself (it was not killed mid-way)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    count = progress() + more
    with open(log, "a") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "vlpretrain.cli.main", *args], env=env,
                                stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + 300
        try:
            while progress() < count:
                assert proc.poll() is None, f"`vlp {args[0]}` ended before the kill point: {log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"`vlp {args[0]}` made no progress in 300 s"
                time.sleep(0.002)
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"`vlp {args[0]}` ended by itself: {log.read_text()[-3000:]}"


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def without(record: dict, *keys: str) -> dict:
    return {k: v for k, v in record.items() if k not in keys}


def no_temp_files(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp-" in p.name]


# ----------------------------------------------------------------------------- train


def test_killed_training_resumes_to_the_same_weights(tmp_path, reset_accelerate):
    csv = write_image_csv(tmp_path / "data", 24)  # 6 steps an epoch, 12 in all, a checkpoint after each
    settings = dict(epochs=2, checkpoint_every=1, keep_checkpoints=100, precision="no")
    recipes = {}
    for name in ("killed", "full"):
        recipes[name] = tmp_path / f"{name}.yaml"
        recipes[name].write_text(yaml.safe_dump(tiny_recipe(tmp_path / name, csv, **settings)))
    checkpoints = tmp_path / "killed" / "checkpoints"

    def done() -> int:
        return len(list(checkpoints.glob("step_*"))) if checkpoints.is_dir() else 0

    args = ["train", str(recipes["killed"]), "train.resume=latest"]
    resumed_at = []
    for more, delay in kill_plan(SEED):
        kill_when(args, done, more, delay, tmp_path / "stderr.txt")
        assert not (tmp_path / "killed" / "final").exists()
        resumed_at.append(max(int(p.name.split("_")[1]) for p in checkpoints.glob("step_*")))
    assert main(args) == 0
    assert main(["train", str(recipes["full"])]) == 0

    log = (tmp_path / "killed" / "train.rank0.log").read_text()
    for step in resumed_at:  # each rerun continued from the newest checkpoint the kill left
        assert f"resumed from {checkpoints / f'step_{step:08d}'} at step {step} " in log, log[-3000:]
    killed = load_file(str(tmp_path / "killed" / "final" / "model.safetensors"))
    full = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    assert killed.keys() == full.keys()
    for key in full:
        np.testing.assert_allclose(killed[key].numpy(), full[key].numpy(), atol=1e-6, rtol=0, err_msg=key)


# ----------------------------------------------------------------------------- embed


def assert_same_export(a: Path, b: Path) -> None:
    from vlpretrain.retrieval import EmbeddingSet

    one, two = EmbeddingSet.open(a), EmbeddingSet.open(b)
    np.testing.assert_array_equal(one.image_embeddings(), two.image_embeddings())
    np.testing.assert_array_equal(one.text_embeddings(), two.text_embeddings())
    pd.testing.assert_frame_equal(one.metadata(), two.metadata())
    pd.testing.assert_frame_equal(one.text_metadata(), two.text_metadata())
    assert without(one.manifest, "created") == without(two.manifest, "created")
    assert sorted(files(a)) == sorted(files(b)) and not no_temp_files(a)


def test_killed_embed_resumes_to_the_same_embeddings(tmp_path, checkpoint, reset_accelerate):
    # 32 shards of a few milliseconds each: a kill may land a few shards past its point, never at the end.
    csv = write_image_csv(tmp_path / "data", 96)
    common = ["--model", str(checkpoint), "--data", str(csv), "--shard-size", "3", "--batch-size", "3",
              "--num-workers", "0", "--dtype", "float32", "--no-progress"]
    out = tmp_path / "killed"

    def done() -> int:
        return len(list((out / "meta").glob("*.parquet"))) if (out / "meta").is_dir() else 0

    for more, delay in kill_plan(SEED + 1):
        kill_when(["embed", "--out", str(out), *common], done, more, delay, tmp_path / "stderr.txt")
        assert not (out / "manifest.json").exists()
    assert (tmp_path / "stderr.txt").read_text().count("resuming:") == KILLS - 1  # reruns start from finished shards
    assert main(["embed", "--out", str(out), *common]) == 0
    assert main(["embed", "--out", str(tmp_path / "full"), *common]) == 0
    assert_same_export(out, tmp_path / "full")


# ----------------------------------------------------------------------------- index build


def test_killed_index_build_keeps_the_old_index_and_rebuilds_the_same(tmp_path, checkpoint, reset_accelerate):
    shards = tmp_path / "shards"
    # One embedding shard per input shard: 24 of a few milliseconds each, so that a kill landing a few
    # shards past its point still lands before the end.
    write_test_shards(shards, [4] * 24, manifest=True)
    write_test_shards(tmp_path / "old", [5], manifest=True, seed=3)
    out, full = tmp_path / "idx", tmp_path / "full"
    common = ["--model", str(checkpoint), "--batch-size", "4", "--num-workers", "0", "--no-progress"]
    assert main(["index", "build", "--data", str(tmp_path / "old"), "--out", str(out), *common]) == 0
    old = files(out)
    staging = tmp_path / "idx.embeddings-partial"  # where the export goes first

    def progress() -> int:
        finished = len(list((staging / "meta").glob("*.parquet"))) if (staging / "meta").is_dir() else 0
        return finished + (100 if (staging / "manifest.json").is_file() else 0)

    args = ["index", "build", "--data", str(shards), "--out", str(out), *common]
    for more, delay in kill_plan(SEED + 2):
        kill_when(args, progress, more, delay, tmp_path / "stderr.txt")
        assert files(out) == old  # the previous index, whole, after every kill
    assert main(args) == 0
    assert main(["index", "build", "--data", str(shards), "--out", str(full), *common]) == 0

    assert (out / "index.faiss").read_bytes() == (full / "index.faiss").read_bytes()
    pd.testing.assert_frame_equal(pd.read_parquet(out / "meta.parquet"), pd.read_parquet(full / "meta.parquet"))
    info = [json.loads((f / "info.json").read_text()) for f in (out, full)]
    assert without(info[0], "created", "build_seconds") == without(info[1], "created", "build_seconds")
    assert info[0]["ntotal"] == 96
    assert_same_export(out / "embeddings", full / "embeddings")
    assert not staging.exists() and not list(tmp_path.glob(".idx.*"))  # no export, temp folder or lock left


# ----------------------------------------------------------------------------- data shard


def test_killed_data_shard_resumes_to_identical_bytes(tmp_path):
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray((rng.random((300, 400, 3)) * 255).astype("uint8")).save(src / "images" / f"{i}.png")
    rows = 160
    (src / "pairs.csv").write_text("image,caption\n" + "".join(f"images/{i % 4}.png,picture {i}\n"
                                                               for i in range(rows)))
    out = tmp_path / "killed"
    common = [str(src / "pairs.csv"), "--image-size", "24", "--shard-size", "8", "--format", "png", "--processes", "1",
              "--no-progress"]

    def done() -> int:
        return len(list(out.glob("*_stats.json"))) if out.is_dir() else 0

    finished: dict[Path, int] = {}  # shards finished before a kill: the reruns keep them as they are
    for more, delay in kill_plan(SEED + 3):
        kill_when(["data", "shard", *common, "--out", str(out)], done, more, delay, tmp_path / "stderr.txt")
        assert not (out / "manifest.json").exists()
        for stats in out.glob("*_stats.json"):
            tar = stats.with_name(stats.name.replace("_stats.json", ".tar"))
            finished.update({f: f.stat().st_mtime_ns for f in (stats, tar) if f not in finished})
    assert main(["data", "shard", *common, "--out", str(out)]) == 0
    assert main(["data", "shard", *common, "--out", str(tmp_path / "full")]) == 0
    assert {f: f.stat().st_mtime_ns for f in finished} == finished
    assert files(out) == files(tmp_path / "full") and len(files(out)) == 2 * (rows // 8) + 2
    assert not no_temp_files(out)
