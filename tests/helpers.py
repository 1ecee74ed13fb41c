"""Shared test fixtures: tiny models and corpora that build in well under a second."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vlpretrain.config import ModelConfig

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
