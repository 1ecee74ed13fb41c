"""Synthetic pairs for speed benchmarks: one fixed random image and caption, as open_clip_train's
``--dataset-type synthetic`` uses, so both trainers measure the model and the loop, not decoding."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class SyntheticPairs(Dataset):
    def __init__(self, size: int, image_size: int, tokenizer, caption: str = "dummy caption"):
        self.size = size
        self.image = torch.rand(3, image_size, image_size)
        self.tokens = tokenizer([caption])[0]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        return {"image": self.image, "tokens": self.tokens, "index": index, "skipped": []}
