"""Feature cache for a locked text tower.

When the text transformer is frozen (LiT), its output for a caption never changes, yet a naive loop
recomputes it every epoch: for a pretrained MiniLM that forward pass costs more than the whole
trainable image tower. The cache keeps the frozen part's output per distinct token sequence and
runs only the trainable head (the projection) each step. The frozen part runs in eval mode (no
dropout), i.e. as the fixed feature extractor LiT describes.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch


class LockedTextCache:
    """Least-recently-used map from a token sequence to the frozen tower's float32 output."""

    def __init__(self, max_entries: int = 1_000_000):
        self.max_entries = max_entries
        self._store: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        self._store.clear()

    def lookup(self, tokens: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Rows of ``compute(tokens)``, computing only the rows not seen before."""
        keys = [row.tobytes() for row in tokens.detach().cpu().numpy()]
        first_seen: dict[bytes, int] = {}
        for i, key in enumerate(keys):
            if key not in self._store:
                first_seen.setdefault(key, i)
        missing = list(first_seen.values())
        if missing:
            fresh = compute(tokens[missing]).detach().float()
            for i, value in zip(missing, fresh):
                self._store[keys[i]] = value
            while len(self._store) > self.max_entries:
                self._store.popitem(last=False)
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        rows = []
        for key in keys:
            self._store.move_to_end(key)
            rows.append(self._store[key])
        return torch.stack(rows).to(tokens.device)


def hf_frozen_output(text_tower) -> Callable[[torch.Tensor], torch.Tensor]:
    """The frozen part of open_clip's HFTextEncoder: transformer + pooler, without the projection."""

    @torch.no_grad()
    def compute(tokens: torch.Tensor) -> torch.Tensor:
        was_training = text_tower.transformer.training
        text_tower.transformer.eval()
        try:
            mask = (tokens != text_tower.config.pad_token_id).long()
            return text_tower.pooler(text_tower.transformer(input_ids=tokens, attention_mask=mask), mask)
        finally:
            text_tower.transformer.train(was_training)

    return compute
