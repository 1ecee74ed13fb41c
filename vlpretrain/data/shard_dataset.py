"""Training samples streamed from WebDataset shards: split by process and DataLoader worker, shuffled
through a seeded buffer, decoded as :class:`~vlpretrain.data.dataset.ImageTextDataset` decodes rows.

The stream of one process in one epoch (``set_epoch(epoch)``):

- shard order: a permutation of the shards seeded by (seed, epoch); process ``rank`` takes every
  ``world``-th shard of it and its DataLoader worker ``w`` every ``num_workers``-th of those, so each
  shard (and each sample) belongs to exactly one (process, worker) per epoch;
- ``resampled=True``: each (process, worker) draws shards with replacement instead, seeded by
  (seed, epoch, rank, worker) (open_clip's ``--dataset-resampled``);
- a shuffle buffer of ``shuffle_buffer`` samples (0 = off), seeded by (seed, epoch, rank, worker);
- length: with ``samples_per_epoch`` (open_clip's ``--train-num-samples``) every process yields exactly
  ``steps_per_epoch * batch_size`` samples, ``steps_per_epoch = samples_per_epoch // (batch_size * world)``,
  so every process runs the same number of steps (else DDP waits forever). A worker whose shards run
  out first continues into the next epoch's order of its shards; one with more stops early. Without
  ``samples_per_epoch`` each (process, worker) reads its shards once (evaluation, tests).

"Exactly once per epoch" therefore holds for the shards' samples as a whole only without
``samples_per_epoch``; with it, a sample is seen at most once in an epoch unless its worker ran past
the end of its shards (then some of the next epoch's samples come early and are seen again there), and
samples past a worker's quota wait for a later epoch.

Resume (``set_epoch(epoch, skip_batches=k)``): each worker replays its epoch's shard order and shuffle
buffer over the raw tar samples without decoding them, drops the samples of the ``k`` batches the process
already trained on, and the loader's workers are rotated so that batch ``k`` comes first. The batches
that follow are the ones the uninterrupted run would have drawn, with the buffer too, as long as the
shards, seed, batch size, processes, workers and ``samples_per_epoch`` are the same. Not exact: an image
that failed to decode before the checkpoint (it was replaced by the next sample) shifts the resumed
stream by one sample, since skipped samples are not decoded.

Example:
    >>> stream = ShardStream(resolve_shards("shards/emoji"), model.preprocess_train, model.tokenizer,
    ...                      batch_size=64, samples_per_epoch=3764)
    >>> loader = DataLoader(stream, batch_size=64, num_workers=2, collate_fn=collate_image_text)
    >>> stream.set_epoch(0)
    >>> batches = list(loader)             # stream.steps_per_epoch batches of 64
"""

from __future__ import annotations

import hashlib
import os
import random
import re
from itertools import count, islice
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .dataset import CAPTION_CHOICES, ImageTextDataset, _mix
from .images import DEFAULT_MAX_PIXELS, BadImageError, load_rgb
from .shard_format import ShardInfo, ShardSample, read_shard_samples

__all__ = ["ShardStream", "key_index", "HFStreamReader", "open_hf_stream"]

_MAX_EMPTY_PASSES = 3  # passes over a worker's shards that yield no usable sample before giving up


def key_index(key: str) -> int:
    """A sample's integer id from its key (ITM uses it as the image id): the key itself when it is a
    number of up to 18 digits (img2dataset's keys), else a stable 63-bit hash of it.

    Example:
        >>> key_index("000003017"), key_index("cat-01") == key_index("cat-01")
        (3017, True)
    """
    if key.isdigit() and len(key) <= 18:
        return int(key)
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big") >> 1


class ShardStream(IterableDataset):
    """An IterableDataset of ``{"image", "tokens", "index", "skipped"}`` samples (what
    :func:`~vlpretrain.data.dataset.collate_image_text` batches) read from tar shards.

    ``rank`` / ``world`` default to torch.distributed's. Bad members (no image, no caption, bad JSON, a
    truncated tar) and images that fail to decode are skipped and reported as ``(source, reason)`` in
    the next sample's ``skipped`` list; a worker whose shards hold no usable sample at all raises
    instead of looping. See the module docstring for the order, the length and resume.

    Example:
        >>> ShardStream(shards, preprocess, tokenizer, batch_size=32, samples_per_epoch=10_000).steps_per_epoch
        312
    """

    # ImageTextDataset's caption choice and per-sample seeded transform, reused as they are: they read
    # only transform, tokenizer, caption_choice, caption_transform, seed and epoch from self.
    _pick_captions = ImageTextDataset._pick_captions
    _to_tensor = ImageTextDataset._to_tensor

    def __init__(
        self,
        shards: Sequence[Union[ShardInfo, str, os.PathLike]],
        transform: Optional[Callable[[Any], torch.Tensor]],
        tokenizer: Callable[[list[str]], torch.Tensor],
        batch_size: int = 1,
        samples_per_epoch: Optional[int] = None,
        seed: int = 0,
        resampled: bool = False,
        shuffle_buffer: int = 1000,
        caption_choice: str = "random",
        caption_transform: Optional[tuple[re.Pattern, Callable[[Any], torch.Tensor]]] = None,
        rank: Optional[int] = None,
        world: Optional[int] = None,
        reader: Optional[Callable[[str, Callable[[str, str], None]], Iterator[ShardSample]]] = None,
        max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
    ) -> None:
        if caption_choice not in CAPTION_CHOICES:
            raise ValueError(f"caption_choice={caption_choice!r}; choose one of {CAPTION_CHOICES}")
        if not shards:
            raise ValueError("ShardStream: no shards given")
        if resampled and samples_per_epoch is None:
            raise ValueError("resampled shards need a sample count per epoch (data.train_num_samples)")
        if shuffle_buffer < 0:
            raise ValueError(f"data.shuffle_buffer must be 0 (off) or more samples, got {shuffle_buffer}")
        from ..distributed import get_rank, get_world_size

        self.urls = [os.fspath(s.path if isinstance(s, ShardInfo) else s) for s in shards]
        self.transform, self.tokenizer = transform, tokenizer
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.samples_per_epoch = None if samples_per_epoch is None else int(samples_per_epoch)
        self.resampled, self.shuffle_buffer = bool(resampled), int(shuffle_buffer)
        self.caption_choice, self.caption_transform = caption_choice, caption_transform
        self.rank = get_rank() if rank is None else int(rank)
        self.world = get_world_size() if world is None else int(world)
        self.epoch, self.skip_batches = 0, 0
        # How one unit of ``shards`` becomes samples: a tar by default, a streamed dataset's shard with
        # HFStreamReader (a module-level class, so workers started by spawn can unpickle it).
        self.reader = reader or read_shard_samples
        self.max_pixels = max_pixels  # data.max_pixels: larger images are skipped from their header

    @property
    def steps_per_epoch(self) -> Optional[int]:
        """Batches each process yields per epoch (None without ``samples_per_epoch``)."""
        if self.samples_per_epoch is None:
            return None
        return self.samples_per_epoch // (self.batch_size * self.world)

    def __len__(self) -> int:
        """Samples this process yields per epoch (what DataLoader's ``len`` divides by the batch size)."""
        if self.steps_per_epoch is None:
            raise TypeError("a ShardStream without samples_per_epoch has no length")
        return self.steps_per_epoch * self.batch_size

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch (shard order, buffer and caption seeds) and the batches of it this process
        already trained on (a resumed epoch). Reaches the workers when they are created after it."""
        self.epoch, self.skip_batches = int(epoch), int(skip_batches)

    def check_workers(self, num_workers: int) -> None:
        """A one-line error when some (process, worker) would get no shard at all in the non-resampled mode.

        Example: ``stream.check_workers(cfg.data.num_workers)``
        """
        readers = self.world * max(1, int(num_workers))
        if not self.resampled and len(self.urls) < readers:
            raise ValueError(f"{len(self.urls)} shards for {self.world} processes x {max(1, num_workers)} workers: "
                             f"each needs at least one shard; write smaller shards (vlp data shard --shard-size), "
                             f"lower data.num_workers, or set data.resampled=true")

    # -- the raw (undecoded) stream of one worker ---------------------------------------------------
    def _worker_shards(self, epoch: int, role: int, workers: int) -> list[str]:
        g = torch.Generator()
        g.manual_seed(_mix(self.seed, epoch))
        order = [self.urls[i] for i in torch.randperm(len(self.urls), generator=g).tolist()]
        return order[self.rank::self.world][role::workers]

    def _raw(self, role: int, workers: int, on_bad: Callable[[str, str], None]) -> Iterator[ShardSample]:
        if self.resampled:
            rng = random.Random(_mix(self.seed, self.epoch, self.rank, role, 3))
            epochs: Iterator[list[str]] = ([rng.choice(self.urls) for _ in self.urls] for _ in count())
        elif self.samples_per_epoch is None:
            epochs = iter([self._worker_shards(self.epoch, role, workers)])
        else:  # past the end of its shards, a worker continues into the next epoch's order
            epochs = (self._worker_shards(e, role, workers) for e in count(self.epoch))
        empty = 0
        for urls in epochs:
            found = False
            for url in urls:
                for sample in self.reader(url, on_bad):
                    found = True
                    yield sample
            empty = 0 if found else empty + 1
            if empty >= _MAX_EMPTY_PASSES and self.samples_per_epoch is not None:
                raise RuntimeError(f"no usable sample in the shards of process {self.rank}, worker {role} "
                                   f"({', '.join(urls[:3])}{', ...' if len(urls) > 3 else ''}); check the shards")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The DataLoader asks its workers in turn from worker 0; a resumed epoch starts at batch
        # skip_batches, so worker 0 plays the role of the worker that owns that batch.
        role = (worker + self.skip_batches) % workers
        pending: list[tuple[str, str]] = []
        raw = self._raw(role, workers, lambda source, reason: pending.append((source, reason)))
        if self.shuffle_buffer > 1:
            from webdataset.filters import _shuffle

            rng = random.Random(_mix(self.seed, self.epoch, self.rank, role, 2))
            raw = _shuffle(raw, bufsize=self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)
        steps = self.steps_per_epoch
        quota = None if steps is None else len(range(role, steps, workers)) * self.batch_size
        skip = len(range(role, self.skip_batches, workers)) * self.batch_size
        for _ in islice(raw, skip):  # the samples of batches already trained on, not decoded
            pass
        pending.clear()  # their bad members were reported before the checkpoint
        left = None if quota is None else quota - skip
        while left is None or left > 0:
            sample = next(raw, None)
            if sample is None:
                return
            item = self._decode(sample, pending)
            if item is not None:
                pending = []
                if left is not None:
                    left -= 1
                yield item

    def _decode(self, sample: ShardSample, skipped: list[tuple[str, str]]) -> Optional[dict[str, Any]]:
        """The training sample of a raw one (ImageTextDataset's decoding), or None when its image does not
        decode (reported in ``skipped``); the random choices are seeded by the key, not the position."""
        index = key_index(sample.key)
        try:
            image = load_rgb(sample.image, max_pixels=self.max_pixels)
        except BadImageError as e:
            skipped.append((sample.source, str(e)))
            return None
        captions = self._pick_captions(sample.captions, index)
        tokens = self.tokenizer(captions)
        if self.caption_choice != "all":
            tokens = tokens[0]
        return {"image": self._to_tensor(image, index, captions), "tokens": tokens, "index": index,
                "skipped": skipped}


class HFStreamReader:
    """Shard ``i`` of a streaming Hugging Face dataset (``load_dataset(..., streaming=True)``) as
    :class:`ShardSample` s, so :class:`ShardStream` splits, shuffles, decodes and resumes it as it does
    tar shards. A row without an image or caption is reported to ``on_bad`` and skipped; keys are
    ``{shard:05d}{row:010d}`` (the sample's ``index``).

    Example:
        >>> ds, reader = open_hf_stream("hf:laion/relaion2B-en", "train", "image", "caption")
        >>> stream = ShardStream([str(i) for i in range(ds.n_shards)], preprocess, tokenizer, reader=reader, ...)
    """

    def __init__(self, dataset: Any, image_column: str, caption_columns: list[str], name: str) -> None:
        self.dataset, self.image_column, self.caption_columns, self.name = dataset, image_column, caption_columns, name

    def __call__(self, unit: str, on_bad: Callable[[str, str], None]) -> Iterator[ShardSample]:
        from .corpus_columns import captions_from_cells, image_from_dict

        shard = int(unit)
        rows = self.dataset.shard(num_shards=self.dataset.n_shards, index=shard)
        for position, record in enumerate(rows):
            key, source = f"{shard:05d}{position:010d}", f"{self.name}[shard {shard}]#{position}"
            image = record.get(self.image_column)
            if isinstance(image, dict):
                image = image_from_dict(image)
            captions = captions_from_cells(record.get(c) for c in self.caption_columns)
            if image is None or not captions:
                on_bad(source, "no image" if image is None else "no caption")
                continue
            yield ShardSample(key, image, "", captions, {}, source)


def open_hf_stream(spec: str, split: Optional[str], image_column: str,
                   caption_column: Union[str, list]) -> tuple[Any, HFStreamReader]:
    """A streaming dataset and its reader: ``hf:NAME`` (the hub; online) or a local table file
    (``.parquet`` / ``.csv`` / ``.jsonl`` / ``.json``) read with ``load_dataset(KIND, data_files=...)``.

    Example:
        >>> ds, reader = open_hf_stream("pairs.parquet", None, "image", "caption")
    """
    import datasets

    from .corpus_columns import check_columns

    if spec.startswith("hf:"):
        name = spec[3:]
        ds = datasets.load_dataset(name, split=split or "train", streaming=True)
    else:
        kind = {".parquet": "parquet", ".csv": "csv", ".jsonl": "json", ".json": "json"}.get(os.path.splitext(spec)[1])
        if kind is None:
            raise ValueError(f"data.train: {spec}: data.streaming reads hf:NAME or a .parquet / .csv / .jsonl file")
        name = spec
        ds = datasets.load_dataset(kind, data_files=spec, split="train", streaming=True)
    columns = list(ds.column_names) if ds.column_names else [image_column, *([caption_column]
                                                                            if isinstance(caption_column, str)
                                                                            else caption_column)]
    caption_columns, _ = check_columns(name, columns, image_column, caption_column, None)
    if isinstance((ds.features or {}).get(image_column), datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))  # decoded by load_rgb, in the workers
    return ds, HFStreamReader(ds, image_column, caption_columns, name)
