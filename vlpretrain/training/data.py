"""Turn a recipe's ``data`` section into datasets and loaders for the trainer."""

from __future__ import annotations

from typing import Any, Optional

from ..config import DataConfig


def open_named_corpus(spec: str, data: DataConfig, split: Optional[str] = None) -> Any:
    """A corpus from a spec: ``emoji:SPLIT`` (the offline demo corpus, built once), ``tuxpaint:SPLIT``
    (Tux Paint's stamps, when installed: all, train, heldout) or anything
    :func:`vlpretrain.data.open_corpus` reads (table file, saved / imagefolder dataset, ``hf:NAME``)."""
    from ..data import build_emoji_corpus, open_corpus

    if spec.startswith("emoji:"):
        name = spec.split(":", 1)[1] or "train"
        root = build_emoji_corpus()
        path = root / f"{name}.csv"
        if not path.is_file():
            raise ValueError(f"data: emoji split '{name}' does not exist (use train, val, test or all)")
        return open_corpus(str(path))
    if spec.startswith("tuxpaint:"):
        from ..data.rendered import build_tuxpaint_table

        return open_corpus(str(build_tuxpaint_table(split=spec.split(":", 1)[1] or "all")))
    return open_corpus(spec, split=split, image_column=data.image_column, caption_column=data.caption_column)


def build_train_dataset(data: DataConfig, model, seed: int):
    """The training dataset; ``synthetic:N`` gives N copies of one random pair (for benchmarks)."""
    from ..data import ImageTextDataset
    from ..data.synthetic import SyntheticPairs

    if not data.train:
        raise ValueError("data.train is not set: give a corpus (CSV/JSONL/parquet, dataset folder, emoji:train)")
    if data.train.startswith("synthetic:"):
        size = int(data.train.split(":", 1)[1])
        image_size = model.open_clip_config["vision_cfg"].get("image_size", 224)
        return SyntheticPairs(size, image_size, model.preprocess_train, model.tokenizer)
    corpus = open_named_corpus(data.train, data, data.split)
    if len(corpus) == 0:
        raise ValueError(f"data.train: {data.train} holds no usable rows")
    return ImageTextDataset(corpus, model.preprocess_train, model.tokenizer, caption_choice="random", seed=seed,
                            caption_transform=_colour_safe_transform(data, model))


def _colour_safe_transform(data: DataConfig, model):
    """(pattern, transform without colour augmentation) when ``data.augmentation.protect_colour_captions``."""
    from ..data.augment import colour_caption_pattern, colour_safe_augmentation
    from ..models.factory import build_transforms

    pattern = colour_caption_pattern((data.augmentation or {}).get("protect_colour_captions"))
    if pattern is None:
        return None
    safe, _ = build_transforms(model.open_clip_config, model.model_config, colour_safe_augmentation(data.augmentation))
    return pattern, safe
