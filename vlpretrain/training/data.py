"""Turn a recipe's ``data`` section into datasets and loaders for the trainer."""

from __future__ import annotations

from ..config import DataConfig
from ..data.named import open_named_corpus


def build_train_dataset(data: DataConfig, model, seed: int, batch_size: int = 1, rank: int = 0, world: int = 1,
                        loss_name: str = "contrastive"):
    """The training dataset; ``synthetic:N`` gives N copies of one random pair (for benchmarks); WebDataset
    shards (a shard folder, ``manifest.json`` or brace pattern) give a :class:`ShardStream` of this
    process's share (``batch_size``, ``rank`` and ``world`` set its length and split).
    ``loss_name`` decides what each sample carries beyond one caption (SLIP: a second image view; MIL-NCE:
    every caption; see :mod:`vlpretrain.training.objective_inputs`).

    A corpus is read with ``data.encoding`` / ``data.on_bad_lines``, checked once (placeholder captions
    dropped; duplicates and captions longer than the context counted in the log: see
    :mod:`vlpretrain.data.corpus_audit`), and its images decoded under ``data.max_pixels``."""
    from ..data import ImageTextDataset
    from ..data.corpus_audit import audit_training_corpus
    from ..data.shard_format import is_shard_spec
    from ..data.table_corpus import check_reader_options
    from ..data.synthetic import SyntheticPairs

    if not data.train:
        raise ValueError("data.train is not set: give a corpus (CSV/JSONL/parquet, dataset folder, emoji:train)")
    if data.streaming or is_shard_spec(data.train):
        if loss_name in ("slip", "milnce"):
            raise ValueError(f"loss.name={loss_name} reads a corpus table or folder, not WebDataset shards or a "
                             f"stream ({data.train}): train it from a CSV / JSONL / parquet corpus")
        return _shard_stream(data, model, seed, batch_size, rank, world)
    if data.train.startswith("synthetic:"):
        size = int(data.train.split(":", 1)[1])
        image_size = model.open_clip_config["vision_cfg"].get("image_size", 224)
        return SyntheticPairs(size, image_size, model.preprocess_train, model.tokenizer)
    check_reader_options(data.encoding, data.on_bad_lines)
    corpus = open_named_corpus(data.train, data, data.split)
    if len(corpus) == 0:
        raise ValueError(f"data.train: {data.train} holds no usable rows")
    # Every process drops the same placeholder captions; the main one counts and logs (truncation too).
    corpus, _ = audit_training_corpus(corpus, model.tokenizer if rank == 0 else None,
                                      getattr(model, "context_length", None), log=rank == 0)
    if len(corpus) == 0:
        raise ValueError(f"data.train: {data.train} holds no usable rows (every caption is a placeholder)")
    from .objective_inputs import dataset_options

    return ImageTextDataset(corpus, model.preprocess_train, model.tokenizer, seed=seed,
                            caption_transform=_colour_safe_transform(data, model), max_pixels=data.max_pixels,
                            **dataset_options(loss_name))


def _colour_safe_transform(data: DataConfig, model):
    """(pattern, transform without colour augmentation) when ``data.augmentation.protect_colour_captions``."""
    from ..data.transforms import build_transforms, colour_caption_pattern, colour_safe_augmentation
    from ..models.factory import image_settings

    pattern = colour_caption_pattern((data.augmentation or {}).get("protect_colour_captions"))
    if pattern is None:
        return None
    safe, _ = build_transforms(image_settings(model.open_clip_config, model.model_config),
                               colour_safe_augmentation(data.augmentation))
    return pattern, safe


def _shard_stream(data: DataConfig, model, seed: int, batch_size: int, rank: int, world: int):
    """This process's stream over the shards ``data.train`` names, ``data.train_num_samples`` per epoch
    (default: the manifest's count)."""
    from ..data.shard_dataset import ShardStream
    from ..data.shard_format import resolve_shards

    reader = None
    if data.streaming:  # a Hugging Face streaming dataset: its shards are the units
        from ..data.shard_dataset import open_hf_stream

        if data.train_num_samples is None:
            raise ValueError(f"data.train: {data.train} is streamed (data.streaming=true), so its size is unknown; "
                             f"set data.train_num_samples (samples per epoch)")
        ds, reader = open_hf_stream(data.train, data.split, data.image_column, data.caption_column)
        shards = [str(i) for i in range(ds.n_shards)]
    else:
        shards = resolve_shards(data.train)
    samples = data.train_num_samples
    if samples is None:
        if any(s.samples is None for s in shards):
            raise ValueError(f"data.train: {data.train} has no manifest.json giving its sample count; set "
                             f"data.train_num_samples (samples per epoch, e.g. the sum of the shards' counts)")
        samples = sum(s.samples for s in shards)
    if samples < batch_size * world:
        raise ValueError(f"data.train_num_samples: {samples} samples per epoch, fewer than one global batch "
                         f"({batch_size} x {world} processes): lower train.batch_size")
    stream = ShardStream(shards, model.preprocess_train, model.tokenizer, batch_size=batch_size,
                         samples_per_epoch=samples, seed=seed, resampled=data.resampled,
                         shuffle_buffer=data.shuffle_buffer, caption_choice="random",
                         caption_transform=_colour_safe_transform(data, model), rank=rank, world=world,
                         reader=reader, max_pixels=data.max_pixels)
    stream.check_workers(data.num_workers)
    return stream
