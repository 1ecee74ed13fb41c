"""Torch side of the data path: corpus rows -> (image tensor, caption tokens) samples and batches.

Example:
    >>> from torch.utils.data import DataLoader
    >>> ds = ImageTextDataset(open_corpus("pairs.csv"), model.preprocess, model.tokenizer)
    >>> sampler = EpochPermutationSampler(len(ds), seed=0)
    >>> loader = DataLoader(ds, batch_size=64, sampler=sampler, collate_fn=collate_image_text)
    >>> for epoch in range(3):
    ...     sampler.set_epoch(epoch); ds.set_epoch(epoch)
    ...     for batch in loader: ...     # batch["skipped"]: [(source, reason), ...] to count / log
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .corpus import ImageCaptionCorpus
from .images import DEFAULT_MAX_PIXELS, BadImageError, load_rgb

__all__ = ["ImageTextDataset", "collate_image_text", "EpochPermutationSampler", "CAPTION_CHOICES"]

CAPTION_CHOICES = ("random", "first", "all")


def _mix(*keys: int) -> int:
    """A well-mixed 63-bit integer from non-negative ints; same on every machine and process
    (unlike Python's ``hash`` of strings, and without the collisions of ``seed + epoch``)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class ImageTextDataset(Dataset):
    """Map-style dataset of ``{"image", "tokens", "index", "skipped"}`` samples over a corpus.

    ``transform``: PIL image -> FloatTensor[3, H, W] (e.g. the model's ``preprocess``; ``None``
    gives an unresized ``[0, 1]`` tensor). ``tokenizer``: list[str] -> LongTensor[n, ctx].

    ``caption_choice``: "random" picks one caption per sample from (seed, index, epoch), so a run
    is reproducible and a resumed run sees the same captions; "first" takes the first; "all"
    returns every caption, ``tokens`` LongTensor[n_captions, ctx] (for retrieval evaluation).

    A corrupt or missing image is not fatal: the sample is replaced by the next row (i+1, i+2, ...
    modulo len), each failure going into the sample's ``skipped`` list as ``(source, reason)`` so
    the main process can count it (DataLoader workers are separate processes). ``index`` is the
    row actually delivered. After ``max_tries`` failures in a row: RuntimeError. Images over
    ``max_pixels`` pixels by their header (``data.max_pixels``; None: no limit) are skipped the same
    way, without being decoded.

    Note: ``set_epoch`` reaches DataLoader workers only when they are re-created each epoch
    (the default ``persistent_workers=False``).

    Example:
        >>> ds = ImageTextDataset(corpus, preprocess, tokenizer, caption_choice="first")
        >>> ds[0]["tokens"].shape
        torch.Size([77])
    """

    def __init__(
        self,
        corpus: ImageCaptionCorpus,
        transform: Callable[[Any], torch.Tensor] | None,
        tokenizer: Callable[[list[str]], torch.Tensor],
        caption_choice: str = "random",
        seed: int = 0,
        max_tries: int = 50,
        caption_transform: Optional[tuple[re.Pattern, Callable[[Any], torch.Tensor]]] = None,
        max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
        image_view: bool = False,
    ) -> None:
        if caption_choice not in CAPTION_CHOICES:
            raise ValueError(f"caption_choice={caption_choice!r}; choose one of {CAPTION_CHOICES}")
        if len(corpus) == 0:
            raise ValueError(f"{getattr(corpus, 'name', 'corpus')}: the corpus has no usable rows")
        self.corpus = corpus
        self.transform = transform
        self.tokenizer = tokenizer
        self.caption_choice = caption_choice
        self.seed = int(seed)
        self.max_tries = int(max_tries)
        # (pattern, transform): a sample whose caption matches gets this transform instead (colour-safe
        # augmentation for captions that name colours; see data/transforms.py).
        self.caption_transform = caption_transform
        self.max_pixels = max_pixels
        # A second, independently augmented view of each image ("image_view"; SLIP's image-image term).
        self.image_view = image_view
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch that "random" caption choice depends on."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.corpus)

    def _pick_captions(self, captions: Sequence[str], index: int) -> list[str]:
        if self.caption_choice == "all":
            return list(captions)
        if self.caption_choice == "first" or len(captions) == 1:
            return [captions[0]]
        return [captions[_mix(self.seed, self.epoch, index) % len(captions)]]

    def _to_tensor(self, image: Any, index: int, captions: Sequence[str] = (), view: int = 1) -> torch.Tensor:
        transform = self.transform
        if self.caption_transform is not None and any(self.caption_transform[0].search(c) for c in captions):
            transform = self.caption_transform[1]
        if transform is None:
            from torchvision.transforms.functional import to_tensor

            return to_tensor(image)
        # Random augmentations draw from a generator seeded by (seed, epoch, row), not from the
        # process-wide stream: the same sample gets the same crop whatever the worker count, the
        # number of processes, or a resume in the middle of an epoch.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_mix(self.seed, self.epoch, index, view))
            return transform(image)

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self.corpus)
        skipped: list[tuple[str, str]] = []
        for t in range(min(self.max_tries, n)):
            j = (int(i) + t) % n
            row = self.corpus[j]
            try:
                image = load_rgb(row.image, max_pixels=self.max_pixels)
            except BadImageError as e:
                skipped.append((row.source, str(e)))
                continue
            captions = self._pick_captions(row.captions, j)
            tokens = self.tokenizer(captions)
            if self.caption_choice != "all":
                tokens = tokens[0]
            sample = {"image": self._to_tensor(image, j, captions), "tokens": tokens, "index": j, "skipped": skipped}
            if self.image_view:
                sample["image_view"] = self._to_tensor(image, j, captions, view=2)
            return sample
        last = f" (last: {skipped[-1][0]}: {skipped[-1][1]})" if skipped else ""
        raise RuntimeError(
            f"{self.corpus.name}: {len(skipped)} images in a row failed to load, starting at index "
            f"{i}{last}; check the image files"
        )


def collate_image_text(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of :class:`ImageTextDataset` samples into a batch.

    Returns ``image`` [B, 3, H, W], ``tokens`` [B, ctx], ``index`` LongTensor[B] and ``skipped``
    (all samples' lists joined), plus ``image_view`` [B, 3, H, W] when the samples carry a second view.
    For ``caption_choice="all"`` samples, ``tokens`` is every caption
    [sum n_i, ctx] and ``text_image_index`` LongTensor[sum n_i] gives each caption's image row.

    Example:
        >>> DataLoader(ds, batch_size=32, collate_fn=collate_image_text)
    """
    out: dict[str, Any] = {
        "image": torch.stack([b["image"] for b in batch]),
        "index": torch.tensor([b["index"] for b in batch], dtype=torch.long),
        "skipped": [s for b in batch for s in b["skipped"]],
    }
    if "image_view" in batch[0]:
        out["image_view"] = torch.stack([b["image_view"] for b in batch])
    tokens = [b["tokens"] for b in batch]
    if tokens[0].dim() == 1:
        out["tokens"] = torch.stack(tokens)
    else:
        out["tokens"] = torch.cat(tokens)
        out["text_image_index"] = torch.repeat_interleave(
            torch.arange(len(batch)), torch.tensor([t.shape[0] for t in tokens])
        )
    return out


class EpochPermutationSampler(Sampler[int]):
    """A shuffling sampler whose order depends only on (seed, epoch), so a resumed run replays it.

    Example:
        >>> s = EpochPermutationSampler(10, seed=0); s.set_epoch(3)
        >>> list(s) == list(EpochPermutationSampler(10, seed=0, epoch=3))
        True
    """

    def __init__(self, n: int, seed: int = 0, epoch: int = 0) -> None:
        self.n = int(n)
        self.seed = int(seed)
        self.epoch = int(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation for ``epoch``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(_mix(self.seed, self.epoch))
        return iter(torch.randperm(self.n, generator=g).tolist())
