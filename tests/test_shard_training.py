"""Training from WebDataset shards: the split by process and worker, resampling, bad members, and a
run from shards that trains, and resumes to the same losses."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from vlpretrain.config import recipe_from_dict
from vlpretrain.data import collate_image_text
from vlpretrain.data.shard_dataset import ShardStream, key_index
from vlpretrain.models import load_model
from vlpretrain.training import train

from helpers import interrupt_at_step, read_metrics, tiny_recipe, write_test_shards

SIZES = [5, 3, 8, 1, 6, 4, 2]  # 7 shards of uneven sizes, 29 samples


def _tokens(captions: list[str]) -> torch.Tensor:
    return torch.zeros(len(captions), 4, dtype=torch.long)


def _batches(stream: ShardStream, epoch: int, skip_batches: int = 0, workers: int = 2, batch: int = 2) -> list:
    """The (index list, skipped list) of every batch a real DataLoader with ``workers`` workers yields."""
    stream.set_epoch(epoch, skip_batches)
    loader = DataLoader(stream, batch_size=batch, num_workers=workers, collate_fn=collate_image_text)
    return [(b["index"].tolist(), b["skipped"]) for b in loader]


def _keys(paths: list[Path]) -> list[int]:
    names = [m.name for p in paths for m in tarfile.open(p) if m.name.endswith(".jpg")]
    return sorted(key_index(n[:-4]) for n in names)


def test_two_processes_two_workers_see_every_sample_once_per_epoch(tmp_path):
    paths = write_test_shards(tmp_path, SIZES)
    orders = []
    for epoch in (0, 1):
        seen: Counter = Counter()
        order = []
        for rank in (0, 1):
            stream = ShardStream(paths, None, _tokens, rank=rank, world=2, seed=5, shuffle_buffer=4)
            indexes = [i for batch, _ in _batches(stream, epoch) for i in batch]
            seen.update(indexes)
            order.append(indexes)
        assert sorted(seen) == _keys(paths) and set(seen.values()) == {1}  # each sample once, by one process
        orders.append(order)
    assert orders[0] != orders[1]  # another epoch, another shard order and buffer


def test_fixed_length_and_resampled_streams_yield_the_requested_count(tmp_path):
    paths = write_test_shards(tmp_path, SIZES)
    for resampled in (False, True):
        per_rank = []
        for rank in (0, 1):
            stream = ShardStream(paths, None, _tokens, batch_size=2, samples_per_epoch=40, rank=rank, world=2,
                                 resampled=resampled, shuffle_buffer=3)
            batches = _batches(stream, epoch=0)
            assert stream.steps_per_epoch == 10 and len(batches) == 10  # 40 // (2 x 2): same on every process
            assert all(len(indexes) == 2 for indexes, _ in batches)
            per_rank.append([i for indexes, _ in batches for i in indexes])
        assert set(per_rank[0] + per_rank[1]) <= set(_keys(paths))


@pytest.mark.parametrize("skip", [3, 4])
def test_a_resumed_epoch_continues_with_the_same_batches(tmp_path, skip):
    """Resume replays the shard order and the shuffle buffer: the batches after ``skip`` are the same."""
    paths = write_test_shards(tmp_path, SIZES)
    stream = ShardStream(paths, None, _tokens, batch_size=2, samples_per_epoch=28, rank=1, world=2,
                         seed=3, shuffle_buffer=5)
    full = _batches(stream, epoch=2)
    resumed = _batches(stream, epoch=2, skip_batches=skip)
    assert len(full) == 7 and [b for b, _ in resumed] == [b for b, _ in full[skip:]]


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


@pytest.mark.timeout(120)
def test_bad_members_are_skipped_counted_and_named(tmp_path):
    paths = write_test_shards(tmp_path, [4, 4, 6])
    first = _members(paths[0])
    first["000000001.jpg"] = b"this is not a jpeg"  # corrupt image
    _tar(paths[0], first)
    second = _members(paths[1])
    del second["000010002.txt"]  # no caption: the .json holds none either
    _tar(paths[1], second)
    data = paths[2].read_bytes()
    paths[2].write_bytes(data[: len(data) // 2])  # a truncated last shard

    stream = ShardStream(paths, None, _tokens, rank=0, world=1, shuffle_buffer=0)
    batches = _batches(stream, epoch=0, workers=0, batch=1)
    indexes = [i for b, _ in batches for i in b]
    skipped = [s for _, s in batches for s in s]
    sources = [source for source, _ in skipped]
    assert 1 not in indexes and 10002 not in indexes and len(set(indexes)) == len(indexes)
    assert any(20000 <= i < 20006 for i in indexes) and len(indexes) < 4 + 4 + 6 - 2  # the tail of shard 2 is lost
    assert f"{paths[0]}:000000001" in sources
    assert (f"{paths[1]}:000010002", 'no caption (.txt member or "captions" in 000010002.json)') in skipped
    assert any(source == str(paths[2]) and reason.startswith("unreadable tar data") for source, reason in skipped)
    reason = dict(skipped)[f"{paths[0]}:000000001"]
    assert "not a readable image" in reason


def _recipe(tmp_path: Path, out: str, shards, **overrides) -> dict:
    keys = ("shuffle_buffer", "train_num_samples", "resampled", "num_workers")
    data = {k: overrides.pop(k) for k in keys if k in overrides}
    recipe = tiny_recipe(tmp_path / out, shards, precision="no", **overrides)
    recipe["data"].update(data)
    return recipe


def test_training_from_shards_writes_a_model(tmp_path):
    write_test_shards(tmp_path / "shards", [6, 5, 7], manifest=True)  # 18 samples: 4 steps of 4
    result = train(recipe_from_dict(_recipe(tmp_path, "run", tmp_path / "shards", epochs=2)))
    steps = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert result.step == len(steps) == 2 * (18 // 4)
    model = load_model(result.final_dir)
    assert model.encode_text(model.tokenizer(["a red square"])).shape == (1, 16)


def test_validation_on_shards_equals_validation_on_a_listed_corpus(tmp_path):
    """data.val may be shards too: the trainer's validation streams them, with the numbers of the same
    samples read as a listed corpus."""
    from vlpretrain.data.shard_corpus import ShardCorpus
    from vlpretrain.data.shard_format import read_shard_samples
    from vlpretrain.data.corpus import CorpusRow
    from vlpretrain.training.validation import validate

    write_test_shards(tmp_path / "shards", [6, 5, 7], manifest=True)
    paths = write_test_shards(tmp_path / "val", [5, 4], manifest=True)
    recipe = _recipe(tmp_path, "run", tmp_path / "shards", epochs=1)
    recipe["data"]["val"] = str(tmp_path / "val")
    result = train(recipe_from_dict(recipe))
    val = [r for r in read_metrics(tmp_path / "run") if r.get("split") == "val"]
    assert len(val) == 1 and val[0]["image_retrieval_recall@1"] == result.val_metrics[0]["image_retrieval_recall@1"]
    model = load_model(result.final_dir)
    listed = [CorpusRow(s.image, s.captions, source=s.source) for p in paths for s in read_shard_samples(p, print)]
    streamed = validate(model, ShardCorpus(tmp_path / "val"), batch_size=4)
    assert streamed == validate(model, listed, batch_size=4)


def test_shards_without_manifest_need_a_sample_count(tmp_path):
    write_test_shards(tmp_path / "shards", [6, 5])
    pattern = str(tmp_path / "shards" / "{00000..00001}.tar")
    with pytest.raises(ValueError, match=r"^data.train: .* has no manifest.json giving its sample count; set "
                                         r"data.train_num_samples \(samples per epoch"):
        train(recipe_from_dict(_recipe(tmp_path, "run", pattern)))
    result = train(recipe_from_dict(_recipe(tmp_path, "run2", pattern, train_num_samples=8)))
    assert result.step == 2


@pytest.mark.parametrize("buffer, workers", [(0, 0), (6, 2)])
def test_resumed_shard_run_repeats_the_uninterrupted_losses(tmp_path, buffer, workers):
    """Resume is exact with a shuffle buffer and DataLoader workers too (see vlpretrain.data.shard_dataset)."""
    write_test_shards(tmp_path / "shards", [6, 5, 7, 4], manifest=True)  # 22 samples: 5 steps of 4 per epoch
    settings = dict(epochs=2, checkpoint_every=3, keep_checkpoints=5, shuffle_buffer=buffer, num_workers=workers)
    full = train(recipe_from_dict(_recipe(tmp_path, "full", tmp_path / "shards", **settings)))
    interrupt_at_step(recipe_from_dict(_recipe(tmp_path, "cut", tmp_path / "shards", **settings)), 4)
    state = json.loads((tmp_path / "cut" / "checkpoints" / "step_00000003" / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (3, 0, 3)
    resumed = train(recipe_from_dict(_recipe(tmp_path, "cut", tmp_path / "shards", resume="latest", **settings)))
    assert resumed.step == full.step == 10
    expected = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "full") if "loss" in r}
    records = [r for r in read_metrics(tmp_path / "cut") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 4, 5, 6, 7, 8, 9, 10]  # step 4 redone after the cut
    assert {r["step"]: r["loss"] for r in records} == expected


def test_training_streams_a_local_parquet_with_datasets_streaming(tmp_path):
    """data.streaming: datasets' load_dataset(..., streaming=True) as a stream source (offline: a parquet)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    images, captions = [], []
    for i in range(10):
        buffer = io.BytesIO()
        Image.new("RGB", (12, 12), (20 * i, 100, 200)).save(buffer, format="PNG")
        images.append(buffer.getvalue())
        captions.append(f"square number {i}" if i != 4 else "")  # row 4: no caption, skipped and named
    pq.write_table(pa.table({"image": images, "caption": captions}), tmp_path / "pairs.parquet")
    recipe = _recipe(tmp_path, "run", tmp_path / "pairs.parquet", train_num_samples=8, shuffle_buffer=0)
    recipe["data"]["streaming"] = True
    result = train(recipe_from_dict(recipe))
    assert result.step == 2 and (result.final_dir / "model.safetensors").is_file()
    assert result.skipped_samples == 1
    with pytest.raises(ValueError, match=r"is streamed \(data.streaming=true\), so its size is unknown; set "
                                         r"data.train_num_samples"):
        del recipe["data"]["train_num_samples"]
        recipe["train"]["output_dir"] = str(tmp_path / "run2")
        train(recipe_from_dict(recipe))


@pytest.mark.slow
def test_two_real_processes_train_from_uneven_shards(tmp_path):
    """accelerate launch, 2 gloo processes x 2 workers over 7 shards of uneven sizes: both processes run the
    same number of steps (none waits forever for the other at the gradient all-reduce) and the run ends
    with a model. Which samples each process reads is tested above with the same ShardStream split."""
    import yaml

    from helpers import launch_two_processes

    write_test_shards(tmp_path / "shards", SIZES, manifest=True)  # 29 samples: 3 steps of 2 x 4 per epoch
    recipe = _recipe(tmp_path, "two", tmp_path / "shards", epochs=2, num_workers=2, shuffle_buffer=4)
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(recipe))
    launch_two_processes("train", str(tmp_path / "two.yaml"))
    assert (tmp_path / "two" / "train.rank1.log").exists()  # really two processes
    steps = [r for r in read_metrics(tmp_path / "two") if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 2 * (29 // 8) + 1))
    model = load_model(tmp_path / "two" / "final")
    assert model.encode_text(model.tokenizer(["a red square"])).shape == (1, 16)
