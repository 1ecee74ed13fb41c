"""Pre-emption: SIGTERM / SIGUSR1 finish the step, checkpoint, exit 75; ``--resume auto`` continues to the
weights of an uninterrupted run (one process, and two processes with the signal sent to one rank only)."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml
from safetensors.torch import load_file

from helpers import launch_two_processes, tiny_recipe, write_image_csv
from vlpretrain.cli.main import main
from vlpretrain.config import load_recipe
from vlpretrain.training import train
from vlpretrain.training import trainer as trainer_module
from vlpretrain.training.checkpoint import list_checkpoints, verify_checkpoint
from vlpretrain.training.preemption import PREEMPTED_EXIT_CODE

ROOT = Path(__file__).resolve().parents[1]
SEED = 17
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
           OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))


def write_recipes(tmp_path: Path, names: tuple[str, ...], images: int = 32, epochs: int = 6) -> dict[str, Path]:
    """One recipe per name (its own output folder), same data and settings: fp32, no periodic checkpoints."""
    csv = write_image_csv(tmp_path / "data", images)
    recipes = {}
    for name in names:
        recipes[name] = tmp_path / f"{name}.yaml"
        recipes[name].write_text(yaml.safe_dump(tiny_recipe(tmp_path / name, csv, epochs=epochs, precision="no")))
    return recipes


def logged_steps(run_dir: Path) -> int:
    """The newest step with a complete record in ``metrics.jsonl`` (0 before the first)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().split("\n")[:-1] if line.strip()]
    return max(steps, default=0)


def signal_at_step(proc: subprocess.Popen, run_dir: Path, step: int, send) -> None:
    """Wait until ``run_dir`` logged ``step``, then ``send()`` the signal; fails if the run ended before."""
    deadline = time.monotonic() + 300
    while logged_steps(run_dir) < step:
        assert proc.poll() is None, f"the run ended before step {step}"
        assert time.monotonic() < deadline, f"no step {step} in 300 s"
        time.sleep(0.002)
    send()


def assert_same_weights(a: Path, b: Path) -> None:
    one, two = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert one.keys() == two.keys()
    for key in one:
        np.testing.assert_allclose(one[key].numpy(), two[key].numpy(), atol=1e-6, rtol=0, err_msg=key)


def checkpoint_steps(run_dir: Path) -> list[int]:
    return [int(p.name.split("_")[1]) for p in list_checkpoints(run_dir)]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_checkpoints_exits_75_and_resume_auto_ends_on_the_same_weights(tmp_path, signum, reset_accelerate):
    recipes = write_recipes(tmp_path, ("stopped", "full"))
    at = random.Random(SEED + signum).randint(3, 12)  # of 48 steps
    with open(tmp_path / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "vlpretrain.cli.main", "train", str(recipes["stopped"])],
                                env=ENV, stdout=subprocess.PIPE, stderr=stderr, text=True)
        try:
            signal_at_step(proc, tmp_path / "stopped", at, lambda: proc.send_signal(signum))
        finally:
            out, _ = proc.communicate(timeout=300)
    log = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == PREEMPTED_EXIT_CODE, log[-3000:]
    [stopped_at] = checkpoint_steps(tmp_path / "stopped")
    assert at <= stopped_at < 48
    assert f"pre-empted after step {stopped_at}: checkpoint written; rerun with --resume auto" in out
    assert f"stopped by {signal.Signals(signum).name} after step {stopped_at} of 48" in log
    assert not (tmp_path / "stopped" / "final").exists()

    assert main(["train", str(recipes["stopped"]), "--resume", "auto"]) == 0
    assert main(["train", str(recipes["full"])]) == 0
    resumed = (tmp_path / "stopped" / "train.rank0.log").read_text()
    assert re.search(rf"resumed from \S+step_{stopped_at:08d} at step {stopped_at} ", resumed), resumed[-2000:]
    assert_same_weights(tmp_path / "stopped" / "final", tmp_path / "full" / "final")


def test_a_signal_in_process_stops_after_the_step_and_handlers_come_back(tmp_path, monkeypatch, reset_accelerate):
    """A second SIGTERM while the checkpoint is written changes nothing: the checkpoint is whole."""
    recipes = write_recipes(tmp_path, ("run",), images=16, epochs=2)
    real_save = trainer_module.save_checkpoint

    def save_while_signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "save_checkpoint", save_while_signalled)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    result = train(load_recipe(str(recipes["run"])),
                   on_step=lambda step: os.kill(os.getpid(), signal.SIGUSR1) if step == 3 else None)
    assert {s: signal.getsignal(s) for s in before} == before
    assert result.preempted and result.final_dir is None and result.step == 3
    assert checkpoint_steps(tmp_path / "run") == [3]
    verify_checkpoint(list_checkpoints(tmp_path / "run")[0])


def test_resume_auto_without_a_checkpoint_starts_fresh(tmp_path, reset_accelerate):
    recipes = write_recipes(tmp_path, ("run",), images=8, epochs=1)
    assert main(["train", str(recipes["run"]), "train.resume=auto"]) == 0
    log = (tmp_path / "run" / "train.rank0.log").read_text()
    assert "no checkpoint in" in log and "starting fresh" in log
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def rank_processes(launcher: psutil.Process, timeout: float = 120) -> dict[int, psutil.Process]:
    """The training processes ``accelerate launch`` started, by their ``RANK``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ranks = {}
        for child in launcher.children(recursive=True):
            try:
                rank = child.environ().get("RANK")
                if rank is not None and "vlpretrain.cli.main" in " ".join(child.cmdline()):
                    ranks[int(rank)] = child
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        if len(ranks) == 2:
            return ranks
        time.sleep(0.05)
    raise AssertionError("accelerate launch did not start 2 training processes")


@pytest.mark.slow
def test_two_processes_stop_together_when_one_rank_gets_sigterm(tmp_path):
    recipes = write_recipes(tmp_path, ("stopped", "full"), images=32, epochs=6)  # 4 steps an epoch, 24 in all
    at = random.Random(SEED).randint(3, 10)
    accelerate = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "vlpretrain.cli.main", "train",
           str(recipes["stopped"])]
    with open(tmp_path / "launch.txt", "w") as output:
        launcher = subprocess.Popen(cmd, env=ENV, stdout=output, stderr=subprocess.STDOUT)
        try:
            ranks = rank_processes(psutil.Process(launcher.pid))
            signal_at_step(launcher, tmp_path / "stopped", at, lambda: ranks[1].send_signal(signal.SIGTERM))
        finally:
            launcher.wait(timeout=300)
    launch_log = (tmp_path / "launch.txt").read_text()
    # Both ranks exit 75; accelerate launch (torch's elastic agent) reports a failed child with its own code.
    assert launcher.returncode != 0, launch_log[-3000:]
    assert re.search(rf"exitcode\s*:\s*{PREEMPTED_EXIT_CODE}\b", launch_log), launch_log[-3000:]
    [stopped_at] = checkpoint_steps(tmp_path / "stopped")
    assert at <= stopped_at < 24
    rank0 = (tmp_path / "stopped" / "train.rank0.log").read_text()
    rank1 = (tmp_path / "stopped" / "train.rank1.log").read_text()
    assert f"stopped by another process's signal after step {stopped_at} of 24" in rank0, rank0[-2000:]
    assert f"stopped by SIGTERM after step {stopped_at} of 24" in rank1, rank1[-2000:]
    assert launch_log.count(f"pre-empted after step {stopped_at}: checkpoint written") == 2, launch_log[-3000:]
    assert not (tmp_path / "stopped" / "final").exists()

    launch_two_processes("train", str(recipes["stopped"]), "--resume", "auto")
    launch_two_processes("train", str(recipes["full"]))
    assert re.search(rf"resumed from \S+step_{stopped_at:08d} at step {stopped_at} ",
                     (tmp_path / "stopped" / "train.rank0.log").read_text())
    assert_same_weights(tmp_path / "stopped" / "final", tmp_path / "full" / "final")
