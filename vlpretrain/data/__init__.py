"""Data: corpus readers, image decoding, the torch dataset / collate / sampler, demo corpora.

Example:
    >>> from vlpretrain.data import open_corpus, ImageTextDataset, collate_image_text
    >>> ds = ImageTextDataset(open_corpus("pairs.csv"), preprocess, tokenizer)
"""
from .corpus import CorpusRow, ImageCaptionCorpus
from .corpus_dispatch import open_corpus
from .dataset import CAPTION_CHOICES, EpochPermutationSampler, ImageTextDataset, collate_image_text
from .emoji import EMOJI_CORPUS_VERSION, build_emoji_corpus, default_cache_dir, emoji_records
from .hf_corpus import HFDatasetCorpus
from .images import BadImageError, load_rgb
from .table_corpus import TABLE_EXTENSIONS, TableCorpus

__all__ = [
    "CorpusRow",
    "ImageCaptionCorpus",
    "TableCorpus",
    "HFDatasetCorpus",
    "open_corpus",
    "TABLE_EXTENSIONS",
    "BadImageError",
    "load_rgb",
    "ImageTextDataset",
    "collate_image_text",
    "EpochPermutationSampler",
    "CAPTION_CHOICES",
    "build_emoji_corpus",
    "emoji_records",
    "default_cache_dir",
    "EMOJI_CORPUS_VERSION",
]
