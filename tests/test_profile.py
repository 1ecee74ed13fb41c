"""train.profile_steps: the per-phase breakdown of a profiled step and its Chrome trace."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass

import pytest
import yaml
from torch.autograd import DeviceType

from vlpretrain.config import ConfigError, recipe_from_dict
from vlpretrain.training import train
from vlpretrain.training.profiling import PHASES, breakdown, phase

from helpers import launch_two_processes, read_metrics, tiny_recipe


def test_profiled_steps_write_a_breakdown_and_a_trace(tmp_path, caplog):
    recipe = tiny_recipe(tmp_path / "run", "synthetic:16", precision="no", profile_steps=2)  # 4 steps
    with caplog.at_level("INFO"):
        result = train(recipe_from_dict(recipe))
    assert result.step == 4
    profile = json.loads((tmp_path / "run" / "profile.json").read_text())
    assert profile["steps"] == 2 and profile["first_step"] == 2  # step 1 (warm-up) is left out
    phases = profile["phases_s"]
    assert set(phases) == {*PHASES, "other"}
    assert all(v >= 0 for v in phases.values())
    assert phases["forward"] > 0 and phases["backward"] > 0 and phases["optimizer"] > 0 and phases["data_wait"] > 0
    assert phases["gather"] == 0  # one process: the loss gathers nothing
    assert sum(phases.values()) <= profile["step_s"] * (1 + 1e-9)
    assert profile["top_ops"] and all(op["self_cpu_s"] >= 0 for op in profile["top_ops"])
    trace = json.loads((tmp_path / "run" / "profile_trace.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert {"vlp/data_wait", "vlp/forward", "vlp/backward", "vlp/optimizer"} <= names
    assert "profiled 2 steps" in caplog.text
    assert len([r for r in read_metrics(tmp_path / "run") if "loss" in r]) == 4  # the run itself is unchanged


@pytest.mark.slow
def test_two_processes_profile_their_gathers(tmp_path):
    recipe = tiny_recipe(tmp_path / "run", "synthetic:32", precision="no", profile_steps=2)  # 4 steps per process
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    launch_two_processes("train", str(tmp_path / "recipe.yaml"))
    profile = json.loads((tmp_path / "run" / "profile.json").read_text())  # the main process's
    phases = profile["phases_s"]
    assert phases["gather"] > 0  # the loss's all-gather, DDP's all-reduce, the loss check's reduce
    assert all(v >= 0 for v in phases.values()) and sum(phases.values()) <= profile["step_s"] * (1 + 1e-9)


def test_a_run_too_short_to_profile_says_so(tmp_path, caplog):
    recipe = tiny_recipe(tmp_path / "run", "synthetic:4", precision="no", profile_steps=3)  # 1 step: warm-up only
    with caplog.at_level("WARNING"):
        train(recipe_from_dict(recipe))
    assert not (tmp_path / "run" / "profile.json").exists()
    assert "train.profile_steps=3: the run ended before a step could be profiled" in caplog.text


def test_profile_steps_must_be_a_count():
    with pytest.raises(ConfigError, match=r"^train.profile_steps must be an integer >= 0 \(0: no profiling\), got -1$"):
        recipe_from_dict({}, ["train.profile_steps=-1"])


def test_phase_marks_are_free_without_a_profiler():
    assert isinstance(phase("forward"), contextlib.nullcontext)


@dataclass
class _Range:
    start: float
    end: float


@dataclass
class _Event:
    name: str
    start: float
    end: float
    thread: int = 1
    is_async: bool = False
    device_type: DeviceType = DeviceType.CPU

    @property
    def time_range(self) -> _Range:
        return _Range(self.start, self.end)


def test_breakdown_counts_each_instant_once_for_the_innermost_phase():
    events = [
        _Event("vlp/data_wait", 0, 10),
        _Event("vlp/forward", 10, 110),
        _Event("aten::broadcast_tensors", 12, 15),     # not a collective
        _Event("c10d::allgather_", 30, 60),            # a gather inside forward
        _Event("gloo:all_gather", 35, 55),             # nested in it: not counted twice
        _Event("vlp/backward", 110, 190),
        _Event("_c10d_functional::wait_tensor", 150, 160),
        _Event("vlp/optimizer", 195, 205),
        _Event("c10d::allreduce_", 0, 500, thread=2),  # another thread (a backend's worker): ignored
        _Event("vlp/forward", 0, 500, is_async=True),  # async ranges do not nest: ignored
        _Event("nccl:all_gather", 0, 500, device_type=DeviceType.CUDA),  # a kernel on a GPU stream: ignored
    ]
    report = breakdown(events, steps=1, window_s=250e-6)
    expected = {"data_wait": 10, "forward": 70, "backward": 70, "gather": 40, "optimizer": 10, "other": 50}
    assert report["phases_s"] == pytest.approx({k: v * 1e-6 for k, v in expected.items()})
    assert report["step_s"] == pytest.approx(250e-6)
    assert sum(report["shares"].values()) == pytest.approx(1.0)
