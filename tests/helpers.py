"""Shared test helpers: tiny models and corpora that build in well under a second, a two-process gloo
runner, a metrics.jsonl reader and a training run cut short at a given step. (Fixtures live in conftest.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from PIL import Image

from vlpretrain.config import ModelConfig, RecipeConfig

TINY_VISION = {"image_size": 32, "width": 32, "layers": 1, "patch_size": 8, "head_width": 16}
TINY_TEXT = {"width": 32, "layers": 1, "heads": 2, "context_length": 16}


def tiny_model_config(**overrides) -> ModelConfig:
    values = dict(arch="ViT-B-32", embed_dim=16, vision=dict(TINY_VISION), text=dict(TINY_TEXT))
    values.update(overrides)
    return ModelConfig(**values)


def tiny_recipe(output_dir, train_data, val_data=None, **train_overrides) -> dict:
    train = {"output_dir": str(output_dir), "batch_size": 4, "epochs": 1, "lr": 1e-3, "warmup_steps": 1,
             "log_every": 1, "progress": False, "threads": 1}
    train.update(train_overrides)
    return {
        "model": {"arch": "ViT-B-32", "embed_dim": 16, "vision": dict(TINY_VISION), "text": dict(TINY_TEXT)},
        "data": {"train": str(train_data), "val": str(val_data) if val_data else None, "num_workers": 0},
        "train": train,
    }


def write_image_csv(folder: Path, n: int, name: str = "pairs.csv", seed: int = 0) -> Path:
    """n small coloured PNGs and a CSV of (image, caption) with relative paths."""
    rng = np.random.default_rng(seed)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
    lines = ["image,caption"]
    for i in range(n):
        array = (rng.random((24, 24, 3)) * 255).astype("uint8")
        Image.fromarray(array).save(images / f"img{i}.png")
        lines.append(f"images/img{i}.png,a {colours[i % len(colours)]} square number {i}")
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


def vlp(*args: str) -> subprocess.CompletedProcess:
    """Run the ``vlp`` command line in a fresh Python process and capture its text output.

    Example: ``proc = vlp("eval", "zeroshot", "--model", str(checkpoint), ...); assert proc.returncode == 0``
    """
    return subprocess.run([sys.executable, "-m", "vlpretrain.cli.main", *args], capture_output=True, text=True)


def read_metrics(run_dir: Path) -> list[dict]:
    """The records a training run logged to ``run_dir/metrics.jsonl``, in order.

    Example: ``steps = [r for r in read_metrics(tmp_path / "run") if "loss" in r]``
    """
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


class Interrupted(Exception):
    """Raised by :func:`interrupt_at_step` inside the trainer, as if the job were killed there."""


def interrupt_at_step(recipe: RecipeConfig, step: int) -> None:
    """Train ``recipe`` and raise out of it right after optimizer step ``step``;
    fails the test unless the run really reached that step.

    Example: ``interrupt_at_step(recipe_from_dict(tiny_recipe(out, csv, checkpoint_every=3)), 4)``
    """
    from vlpretrain.training import train  # imported here: most test modules never train

    def stop(at: int) -> None:
        if at == step:
            raise Interrupted

    with pytest.raises(Interrupted):
        train(recipe, on_step=stop)


def spawn_gloo(fn: Callable[..., Any], world_size: int, *args) -> Any:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` CPU processes joined by a gloo process group
    and return what rank 0's call returned (anything torch.save can write).

    ``fn`` must be a module-level function (spawned processes import it by name). Each process uses one
    thread, so two of them fit on 2 cores.

    Example: ``two = spawn_gloo(_worker, 2)`` with ``def _worker(rank, world): ... return {"loss": loss}``
    """
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_gloo_process, args=(world_size, folder, fn, args), nprocs=world_size, join=True)
        return torch.load(Path(folder) / "rank0.pt")


def _gloo_process(rank: int, world_size: int, folder: str, fn: Callable[..., Any], args: tuple) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        if rank == 0:
            torch.save(result, Path(folder) / "rank0.pt")
        dist.barrier()  # rank 0's file is complete before any process leaves the group
    finally:
        dist.destroy_process_group()


def write_test_shards(folder: Path, sizes: list[int], manifest: bool = False, captions_per_sample: int = 1,
                      seed: int = 0) -> list[Path]:
    """A small img2dataset-style shard set: ``{i:05d}.tar`` with ``sizes[i]`` samples, each a 16x16 JPEG
    ``{key}.jpg``, its caption ``{key}.txt`` and ``{key}.json`` (width, height; ``captions`` when
    ``captions_per_sample`` > 1); keys are img2dataset's (``sample_key(i, position, 10000)``), so
    ``int(key)`` is unique. With ``manifest``, also our ``manifest.json`` (sizes, SHA-256).

    Example: ``shards = write_test_shards(tmp_path / "shards", [5, 3, 4], manifest=True)``
    """
    import io
    import tarfile

    from vlpretrain.data.shard_format import MANIFEST_FORMAT, sample_key, sha256_of, shard_name

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
    paths, entries = [], []
    for shard, size in enumerate(sizes):
        path = folder / shard_name(shard)
        with tarfile.open(path, "w") as tar:
            for position in range(size):
                key = sample_key(shard, position, 10000)
                buffer = io.BytesIO()
                Image.fromarray((rng.random((16, 16, 3)) * 255).astype("uint8")).save(buffer, format="JPEG")
                captions = [f"a {colours[(int(key) + c) % len(colours)]} square {key} caption {c}"
                            for c in range(captions_per_sample)]
                meta: dict[str, Any] = {"key": key, "width": 16, "height": 16}
                if captions_per_sample > 1:
                    meta["captions"] = captions
                for ext, data in (("jpg", buffer.getvalue()), ("txt", captions[0].encode()),
                                  ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
        entries.append({"name": path.name, "samples": size, "bytes": path.stat().st_size, "sha256": sha256_of(path)})
    if manifest:
        (folder / "manifest.json").write_text(json.dumps(
            {"format": MANIFEST_FORMAT, "samples": sum(sizes), "shards": entries}, indent=1))
    return paths


def launch_two_processes(*vlp_args: str) -> subprocess.CompletedProcess:
    """``accelerate launch --multi_gpu --num_processes 2 -m vlpretrain.cli.main VLP_ARGS`` (gloo on a CPU),
    one thread each; fails the test with the output's tail when it does not exit 0.

    Example: ``proc = launch_two_processes("embed", "--model", str(ckpt), "--data", str(csv), "--out", str(out))``
    """
    import os
    import shutil

    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate"), "launch",
           "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "vlpretrain.cli.main", *vlp_args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def huge_header_png(path: Path, width: int, height: int) -> Path:
    """A valid 1x1 PNG whose IHDR claims ``width`` x ``height`` (decoding it would need width x height x 3
    bytes): for pixel-limit checks that must refuse it from the header alone.

    Example: ``load_rgb(huge_header_png(tmp_path / "huge.png", 20_000, 20_000))`` raises BadImageError
    """
    import io
    import struct
    import zlib

    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    ihdr = 8 + 8  # signature, then length + b"IHDR"
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    path.write_bytes(bytes(data))
    return path
