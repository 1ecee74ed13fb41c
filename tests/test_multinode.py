"""Two "machines" on one box: two ``accelerate launch --num_machines 2 --machine_rank R`` groups joined over
127.0.0.1 (gloo on CPU), one process each, must train like one process with the doubled batch, and resume."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from vlpretrain.config import recipe_from_dict
from vlpretrain.training import train

from helpers import read_metrics, tiny_recipe, write_image_csv

pytestmark = pytest.mark.slow


def _free_port() -> int:
    """A port the kernel just handed out (bind to 0), so parallel test runs do not collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_machines(*vlp_args: str) -> None:
    """Start machine 0 and machine 1 as two ``accelerate launch`` subprocesses (``--num_processes`` is the
    total over all machines, so 2 means one process each) and fail with their output unless both exit 0.

    ``--multi_gpu`` selects DDP; with CUDA hidden, torch falls back to gloo on the CPU.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    accelerate = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    port = str(_free_port())
    groups = [subprocess.Popen(
        [accelerate, "launch", "--multi_gpu", "--num_machines", "2", "--machine_rank", str(rank),
         "--main_process_ip", "127.0.0.1", "--main_process_port", port, "--num_processes", "2",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "vlpretrain.cli.main", *vlp_args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for rank in (0, 1)]
    outputs = []
    try:
        for proc in groups:
            outputs.append(proc.communicate(timeout=300)[0])
    finally:
        for proc in groups:
            if proc.poll() is None:  # one machine failed and the other waits for it forever
                proc.kill()
                proc.wait()
    for rank, (proc, out) in enumerate(zip(groups, outputs)):
        assert proc.returncode == 0, f"machine {rank}:\n{out[-4000:]}"


def _assert_same_weights(a_dir: Path, b_dir: Path) -> None:
    a = load_file(str(a_dir / "model.safetensors"))
    b = load_file(str(b_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        if key.endswith("attn.in_proj_bias"):
            # The key-bias third has an exact gradient of zero (softmax ignores a shift shared by all keys),
            # so Adam divides rounding noise by its own size there: compare the rest.
            width = a[key].shape[0] // 3
            a[key], b[key] = (torch.cat([t[:width], t[2 * width:]]) for t in (a[key], b[key]))
        assert torch.allclose(a[key], b[key], atol=1e-5), key


def test_two_machines_train_like_one_process_with_the_doubled_batch_and_resume(tmp_path):
    csv = write_image_csv(tmp_path, 24)  # global batch 8: 3 steps an epoch, 6 in all
    settings = dict(epochs=2, checkpoint_every=2, keep_checkpoints=5)
    two = tiny_recipe(tmp_path / "two", csv, batch_size=4, **settings)
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(two))
    launch_two_machines("train", str(tmp_path / "two.yaml"))
    assert (tmp_path / "two" / "train.rank1.log").exists()  # really two processes

    single = train(recipe_from_dict(tiny_recipe(tmp_path / "one", csv, batch_size=8, **settings)))
    _assert_same_weights(tmp_path / "two" / "final", single.final_dir)
    losses_two = [r["loss"] for r in read_metrics(tmp_path / "two") if "loss" in r]
    losses_one = [r["loss"] for r in read_metrics(tmp_path / "one") if "loss" in r]
    assert len(losses_two) == len(losses_one) == 6
    assert losses_two == pytest.approx(losses_one, abs=1e-5)

    # Resume both "machines" from the mid-epoch checkpoint of step 2 into a new folder: same end.
    mid = tmp_path / "two" / "checkpoints" / "step_00000002"
    assert mid.is_dir()
    resumed = tiny_recipe(tmp_path / "resumed", csv, batch_size=4, resume=str(mid), **settings)
    (tmp_path / "resumed.yaml").write_text(yaml.safe_dump(resumed))
    launch_two_machines("train", str(tmp_path / "resumed.yaml"))
    assert [r["step"] for r in read_metrics(tmp_path / "resumed") if "loss" in r] == [3, 4, 5, 6]
    _assert_same_weights(tmp_path / "resumed" / "final", single.final_dir)
