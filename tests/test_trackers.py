"""train.log_with: the numbers a tracker receives are metrics.jsonl's (TensorBoard read back)."""

from __future__ import annotations

import math

import pytest

from vlpretrain.config import ConfigError, recipe_from_dict
from vlpretrain.training.trackers import check_log_with, tracker_values

from helpers import read_metrics, tiny_recipe, write_image_csv


def test_tensorboard_event_files_hold_the_metrics_jsonl_values(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vlpretrain.training.trainer import train

    csv = write_image_csv(tmp_path / "data", 8)
    recipe = tiny_recipe(tmp_path / "run", csv, val_data=csv, max_steps=3, log_with="tensorboard", monitor_every=3)
    train(recipe_from_dict(recipe))
    folders = [p.parent for p in (tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*")]
    assert len(folders) == 1
    events = EventAccumulator(str(folders[0]), size_guidance={"scalars": 0})
    events.Reload()
    logged = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    records = read_metrics(tmp_path / "run")
    expected = {(tag, r["step"]): value for r in records for tag, value in tracker_values(r).items()}
    assert {"train/loss", "val/image_retrieval_recall@1", "monitor/erank_image"} <= set(logged)
    assert {(tag, step) for tag, steps in logged.items() for step in steps} == set(expected)
    for (tag, step), value in expected.items():
        assert math.isclose(logged[tag][step], value, rel_tol=1e-6, abs_tol=1e-30), (tag, step)
    assert [r["loss"] for r in records if "loss" in r] == pytest.approx(
        [logged["train/loss"][s] for s in (1, 2, 3)], rel=1e-6)


def test_tracker_names_and_one_line_errors():
    assert tracker_values({"step": 2, "epoch": 0, "loss": 1.0, "split": "monitor", "monitor/align": 0.5,
                           "flag": True, "name": "x"}) == {"monitor/epoch": 0.0, "monitor/loss": 1.0,
                                                           "monitor/align": 0.5}
    with pytest.raises(ConfigError, match=r"^train.log_with: 'tensorbord' is not one of tensorboard, wandb, mlflow, "
                                          r"none$"):
        check_log_with("tensorbord")
    import importlib.util

    for name in ("wandb", "mlflow"):
        if importlib.util.find_spec(name) is None:
            with pytest.raises(ConfigError, match=f"needs the {name} package: pip install {name} "):
                check_log_with(name)


def test_unreachable_wandb_logs_offline_without_touching_the_environment(tmp_path, monkeypatch):
    import importlib.machinery
    import os
    import sys
    from types import ModuleType, SimpleNamespace

    from accelerate import PartialState

    from vlpretrain.training import trackers

    PartialState()  # Accelerate's trackers log through its logger, which needs the (one-process) state
    calls = []
    fake = ModuleType("wandb")  # wandb is not installed here: a stand-in that records what the tracker asks
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.config = SimpleNamespace(update=lambda values, **kwargs: None)
    fake.init = lambda **kwargs: calls.append(kwargs) or SimpleNamespace(log=lambda *a, **k: None,
                                                                           finish=lambda: None)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr(trackers, "_reachable", lambda host: False)
    recipe = recipe_from_dict(tiny_recipe(tmp_path / "run", tmp_path / "pairs.csv", log_with="wandb"))
    trackers.open_trackers(recipe, tmp_path / "run").close()
    assert [(c["project"], c["dir"], c["mode"]) for c in calls] == [("run", str(tmp_path / "run"), "offline")]
    assert "WANDB_MODE" not in os.environ
