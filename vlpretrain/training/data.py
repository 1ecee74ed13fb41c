"""Turn a recipe's ``data`` section into datasets and loaders for the trainer."""

from __future__ import annotations

from ..config import DataConfig
from ..data.named import open_named_corpus


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
    from ..data.transforms import build_transforms, colour_caption_pattern, colour_safe_augmentation
    from ..models.factory import image_settings

    pattern = colour_caption_pattern((data.augmentation or {}).get("protect_colour_captions"))
    if pattern is None:
        return None
    safe, _ = build_transforms(image_settings(model.open_clip_config, model.model_config),
                               colour_safe_augmentation(data.augmentation))
    return pattern, safe
