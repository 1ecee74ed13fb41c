"""Synthetic pairs for speed benchmarks, built like open_clip_train's ``--dataset-type synthetic``:
one blank image sent through the training transform and one caption tokenized, for every sample,
so both trainers pay the same per-sample data cost and the benchmark measures the loops."""

from __future__ import annotations

from typing import Callable

from PIL import Image
from torch.utils.data import Dataset


class SyntheticPairs(Dataset):
    def __init__(self, size: int, image_size: int, transform: Callable, tokenizer: Callable,
                 caption: str = "Dummy caption"):
        self.size = size
        self.image = Image.new("RGB", (image_size, image_size))
        self.transform = transform
        self.tokenizer = tokenizer
        self.caption = caption

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        return {"image": self.transform(self.image), "tokens": self.tokenizer([self.caption])[0],
                "index": index, "skipped": []}
