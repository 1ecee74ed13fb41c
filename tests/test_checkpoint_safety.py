"""Checkpoints hold no pickles we load: trainer state as safetensors + JSON, a SHA-256 manifest checked on
resume, old pickled checkpoints refused, and planted pickles never run."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from vlpretrain.config import recipe_from_dict
from vlpretrain.data.shard_format import sha256_of
from vlpretrain.training import train
from vlpretrain.training.checkpoint import MANIFEST, REFUSE_ADVICE, write_manifest
from vlpretrain.training.checkpoint_state import (_random_states, _set_random_states, load_state_files,
                                                  save_state_files)

from helpers import launch_two_processes, read_metrics, tiny_recipe, vlp, write_image_csv

PICKLE_SUFFIXES = {".pkl", ".bin", ".pt", ".pth", ".ckpt"}
EXPECTED_FILES = {"model.safetensors", "vlp_config.json", "trainer_state.json", "optimizer.json",
                  "optimizer.safetensors", "scheduler.json", "ema.json", "ema.safetensors",
                  "random_states_rank0.json", "random_states_rank0.safetensors", MANIFEST}


class _Planted:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[dict, Path]:
    """A run of 2 epochs of 2 steps with EMA and a checkpoint every 2 steps: (its recipe, its output
    folder). Its image tower drops patches at random (drawn from torch's global generator), so a resume
    only repeats the uninterrupted run if the checkpoint restored that generator."""
    folder = tmp_path_factory.mktemp("trained")
    recipe = tiny_recipe(folder / "run", write_image_csv(folder, 8), epochs=2, checkpoint_every=2, ema_decay=0.9)
    recipe["model"]["vision"]["patch_dropout"] = 0.5
    train(recipe_from_dict(recipe))
    return recipe, folder / "run"


def _copy_checkpoint(trained, tmp_path: Path, step: int = 2) -> tuple[dict, Path]:
    """A copy of the run's step-``step`` checkpoint, and a recipe resuming it into a new output folder."""
    recipe, run = trained
    checkpoint = shutil.copytree(run / "checkpoints" / f"step_{step:08d}", tmp_path / "ckpt")
    resumed = json.loads(json.dumps(recipe))
    resumed["train"].update(output_dir=str(tmp_path / "resumed"), resume=str(checkpoint))
    return resumed, Path(checkpoint)


def test_a_checkpoint_holds_no_pickle_and_lists_every_file(trained):
    _, run = trained
    checkpoint = run / "checkpoints" / "step_00000004"
    files = {p.relative_to(checkpoint).as_posix(): p for p in checkpoint.rglob("*") if p.is_file()}
    assert set(files) == EXPECTED_FILES
    for name, path in files.items():
        assert path.suffix not in PICKLE_SUFFIXES, name
        data = path.read_bytes()
        assert not data.startswith(b"PK"), name  # torch.save's zip archive (a data.pkl inside)
        if path.suffix == ".json":
            assert data[:1] == b"{" and isinstance(json.loads(data), dict), name  # a pickle starts with 0x80
        else:
            # safetensors: an 8-byte little-endian header length (so its first byte may well be 0x80),
            # the JSON header, then raw tensor bytes.
            assert path.suffix == ".safetensors", name
            length = int.from_bytes(data[:8], "little")
            assert data[8:9] == b"{" and isinstance(json.loads(data[8:8 + length]), dict), name
            assert load_file(str(path)), name
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    assert manifest["format"] == "vlpretrain-checkpoint-v1"
    assert manifest["files"] == {name: {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
                                 for name, path in files.items() if name != MANIFEST}
    assert not list((run / "checkpoints").glob(".tmp_*"))


def test_state_round_trips_exactly_through_safetensors_and_json(tmp_path):
    """Optimizer, schedule and fp16 gradient-scaler state: tensors, int keys, tuples and floats all come
    back as they were."""
    from vlpretrain.config import TrainConfig
    from vlpretrain.training.optim import create_scheduler

    layer = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, betas=(0.9, 0.98))
    scheduler = create_scheduler(optimizer, TrainConfig(warmup_steps=2), total_steps=10)
    for _ in range(3):
        layer(torch.randn(4, 3)).sum().backward()
        optimizer.step()
        scheduler.step()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    scaler.scale(torch.ones(()))  # allocates its scale tensor
    scaler.update(2.0 ** 9)
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("grad_scaler", scaler)):
        save_state_files(obj.state_dict(), tmp_path, name)
        loaded, expected = load_state_files(tmp_path, name), obj.state_dict()
        assert repr(loaded) == repr(expected)  # same nesting, types (tuple betas, int keys) and values
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grad_scaler.json", "optimizer.json", "optimizer.safetensors",
                                                          "scheduler.json"]


def test_random_states_restore_every_generator(tmp_path):
    save_state_files(_random_states(), tmp_path, "random_states_rank0")
    first = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3))
    _set_random_states(load_state_files(tmp_path, "random_states_rank0"))
    again = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3))
    assert first[:3] == again[:3] and torch.equal(first[3], again[3])


def test_a_planted_pickle_is_never_run_and_the_run_resumes_from_our_files(trained, tmp_path, caplog):
    recipe, checkpoint = _copy_checkpoint(trained, tmp_path)
    marker = tmp_path / "marker"
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"):
        (checkpoint / name).write_bytes(pickle.dumps(_Planted(marker)))
    result = train(recipe_from_dict(recipe))
    assert not marker.exists()
    assert result.step == 4
    assert [r["step"] for r in read_metrics(tmp_path / "resumed") if "loss" in r] == [3, 4]  # resumed after step 2
    assert ("ignoring 3 files its manifest does not list (never read): custom_checkpoint_0.pkl, optimizer.bin, "
            "random_states_0.pkl") in caplog.text
    # The resumed run ends where the uninterrupted one did: weights, optimizer, schedule, EMA and generators.
    full = load_file(str(trained[1] / "final" / "model.safetensors"))
    resumed = load_file(str(result.final_dir / "model.safetensors"))
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_a_pickle_in_place_of_our_tensors_is_refused_even_with_a_matching_manifest(trained, tmp_path):
    """The manifest is not what keeps code out (anyone can rewrite it): safetensors and JSON cannot hold any."""
    recipe, checkpoint = _copy_checkpoint(trained, tmp_path)
    marker = tmp_path / "marker"
    (checkpoint / "optimizer.safetensors").write_bytes(pickle.dumps(_Planted(marker)))
    write_manifest(checkpoint)
    with pytest.raises(ValueError, match=rf"^{checkpoint / 'optimizer.safetensors'}: unreadable tensors \(.*\); "
                                         r"the checkpoint is damaged: resume from another checkpoint"):
        train(recipe_from_dict(recipe))
    assert not marker.exists()


def test_a_checkpoint_of_the_old_pickled_format_is_refused_and_never_unpickled(trained, tmp_path):
    """An older version's folder (Accelerate's save_state: pickles, no manifest), its pickles crafted."""
    recipe, checkpoint = _copy_checkpoint(trained, tmp_path)
    marker = tmp_path / "marker"
    for path in checkpoint.iterdir():
        if path.name not in ("model.safetensors", "vlp_config.json", "trainer_state.json"):
            path.unlink()
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin"):
        (checkpoint / name).write_bytes(pickle.dumps(_Planted(marker)))
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    proc = vlp("train", str(tmp_path / "recipe.yaml"), "--resume", str(checkpoint))
    assert not marker.exists()
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"vlp train: error: {checkpoint}: written by an older version of vlpretrain, whose checkpoints hold pickles "
        f"(custom_checkpoint_0.pkl, optimizer.bin, random_states_0.pkl, scheduler.bin), and unpickling a file can "
        f"run any code, so it is not loaded: start a new run from its weights (model.safetensors, which holds no "
        f"code) with model.init_from={checkpoint}, or start over with train.overwrite=true")
    assert not (tmp_path / "resumed" / "final").exists()


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name, damage, expected", [
    ("model.safetensors", _truncate,
     "{path}: {size} bytes, but checkpoint_manifest.json lists {listed} (truncated or changed since it was saved)"),
    ("optimizer.safetensors", _flip_a_byte,
     "{path}: SHA-256 differs from checkpoint_manifest.json (corrupted or changed since it was saved)"),
    ("random_states_rank0.json", _flip_a_byte,
     "{path}: SHA-256 differs from checkpoint_manifest.json (corrupted or changed since it was saved)"),
    ("scheduler.json", Path.unlink, "{path}: missing (listed in checkpoint_manifest.json)"),
    (MANIFEST, Path.unlink,
     "{path}: not found (the checkpoint is incomplete or was not written by vlpretrain)"),
])
def test_a_damaged_checkpoint_is_refused_naming_the_file(trained, tmp_path, name, damage, expected):
    recipe, checkpoint = _copy_checkpoint(trained, tmp_path)
    path = checkpoint / name
    listed = path.stat().st_size
    damage(path)
    size = path.stat().st_size if path.exists() else None
    message = expected.format(path=path, size=size, listed=listed) + f"; {REFUSE_ADVICE}"
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        train(recipe_from_dict(recipe))
    assert str(error.value) == message
    assert not (tmp_path / "resumed" / "final").exists()


def test_the_cli_refuses_a_tampered_checkpoint_in_one_line(trained, tmp_path):
    recipe, checkpoint = _copy_checkpoint(trained, tmp_path)
    _flip_a_byte(checkpoint / "ema.safetensors")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    proc = vlp("train", str(tmp_path / "recipe.yaml"), "--resume", str(checkpoint))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"vlp train: error: {checkpoint / 'ema.safetensors'}: SHA-256 differs from checkpoint_manifest.json "
        f"(corrupted or changed since it was saved); {REFUSE_ADVICE}")
    assert "Traceback" not in proc.stderr


def test_resuming_with_an_object_the_checkpoint_lacks_names_the_file(trained, tmp_path):
    """A run with EMA cannot resume a checkpoint saved without it (and is told which file is missing)."""
    recipe, checkpoint = _copy_checkpoint(trained, tmp_path)
    (checkpoint / "ema.json").unlink()
    (checkpoint / "ema.safetensors").unlink()
    write_manifest(checkpoint)
    with pytest.raises(FileNotFoundError, match=rf"^{checkpoint / 'ema.json'}: not in the checkpoint's manifest, "
                                                r"and the run needs it: resume with the recipe that wrote"):
        train(recipe_from_dict(recipe))


@pytest.mark.slow
def test_two_processes_save_per_rank_random_states_and_resume_exactly(tmp_path):
    """accelerate launch, 2 gloo processes: the shared state once, random states per rank, and a run
    resumed from its step-3 checkpoint ends on the uninterrupted run's weights."""
    from vlpretrain import load_model

    csv = write_image_csv(tmp_path, 24)  # 3 steps of 2 x 4 per epoch, 6 in all
    full = tiny_recipe(tmp_path / "full", csv, epochs=2, checkpoint_every=3, ema_decay=0.9)
    full["model"]["vision"]["patch_dropout"] = 0.5  # draws from torch's generator: its state matters
    (tmp_path / "full.yaml").write_text(yaml.safe_dump(full))
    launch_two_processes("train", str(tmp_path / "full.yaml"))
    checkpoint = tmp_path / "full" / "checkpoints" / "step_00000003"
    names = {p.name for p in checkpoint.iterdir()}
    assert {"random_states_rank0.json", "random_states_rank1.json", "optimizer.safetensors"} <= names
    assert not any(Path(n).suffix in PICKLE_SUFFIXES for n in names)
    load_model(checkpoint)  # the model's own keys (no DDP "module." prefix)

    resumed = dict(full, train=dict(full["train"], output_dir=str(tmp_path / "resumed"), resume=str(checkpoint)))
    (tmp_path / "resumed.yaml").write_text(yaml.safe_dump(resumed))
    launch_two_processes("train", str(tmp_path / "resumed.yaml"))
    a = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    expected = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "full") if "loss" in r}
    assert {r["step"]: r["loss"] for r in read_metrics(tmp_path / "resumed") if "loss" in r} == \
        {step: loss for step, loss in expected.items() if step > 3}


def test_a_resume_in_the_middle_of_an_epoch_repeats_the_random_draws(tmp_path):
    """Patch dropout draws from torch's global generator; the training loader must not draw from it when
    its iterator starts (it has its own generator), else a mid-epoch resume shifts every later draw."""
    from helpers import interrupt_at_step

    def recipe(out: str, **extra) -> dict:
        values = tiny_recipe(tmp_path / out, write_image_csv(tmp_path, 16), epochs=2, checkpoint_every=1, **extra)
        values["model"]["vision"]["patch_dropout"] = 0.5
        return values

    full = train(recipe_from_dict(recipe("full")))
    interrupt_at_step(recipe_from_dict(recipe("cut")), 3)  # 4 steps per epoch: cut after step 2 of epoch 0
    resumed = train(recipe_from_dict(recipe("cut", resume="latest")))
    a = load_file(str(full.final_dir / "model.safetensors"))
    b = load_file(str(resumed.final_dir / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
