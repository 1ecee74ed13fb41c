"""Labelled image sets for classification (zero-shot, linear probe, k-NN): a folder of class
subfolders, a table with a label column, an emoji split, or a Hugging Face dataset."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class LabelledImages:
    """Images (paths, bytes or PIL) with one string label each, plus any extra columns."""

    images: list
    labels: list[str]
    sources: list[str]
    name: str
    extras: dict[str, list] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)


def _from_class_folders(folder: Path) -> LabelledImages:
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    images, labels, empty = [], [], []
    for class_dir in classes:
        before = len(images)
        for root, _, files in sorted(os.walk(class_dir)):
            for name in sorted(files):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    images.append(str(Path(root) / name))
                    labels.append(class_dir.name)
        if len(images) == before:
            empty.append(class_dir.name)
    if not images:
        raise ValueError(f"{folder}: no images found (expected one subfolder of images per class)")
    if empty:
        raise ValueError(f"{folder}: class '{empty[0]}' has no images (empty subfolder {folder / empty[0]})")
    return LabelledImages(images, labels, list(images), folder.name)


def _from_corpus(corpus: Any, label_column: str, name: str) -> LabelledImages:
    images, labels, sources, extras = [], [], [], {}
    for i in range(len(corpus)):
        row = corpus[i]
        if label_column not in row.extras:
            columns = sorted(row.extras)
            raise ValueError(f"{name}: no label column '{label_column}'; other columns are {columns} "
                             f"(set --label-column)")
        label = row.extras[label_column]
        images.append(row.image)
        labels.append(str(label))
        sources.append(row.source)
        for key, value in row.extras.items():
            if key != label_column:
                extras.setdefault(key, []).append(value)
    if not images:
        raise ValueError(f"{name}: no usable rows")
    return LabelledImages(images, labels, sources, name, extras)


def open_labelled_images(spec: str, label_column: str = "label", image_column: str = "image",
                         split: Optional[str] = None) -> LabelledImages:
    """Read a labelled image set.

    - a folder whose subfolders are the classes (``cats/1.jpg``, ``dogs/2.jpg``),
    - a CSV / TSV / JSONL / parquet file with an image column and a label column,
    - ``emoji:SPLIT`` (the demo corpus; label columns ``category``, ``subcategory``, ``skin_tone``),
    - a Hugging Face dataset folder (``save_to_disk`` or ``imagefolder``) or ``hf:NAME`` when online;
      integer ``ClassLabel`` labels are turned into their names.

    Example:
        >>> data = open_labelled_images("emoji:test", label_column="category")
        >>> len(data), sorted(set(data.labels))[:2]
    """
    from .corpus_dispatch import is_dataset_folder, open_corpus
    from .hf_corpus import HFDatasetCorpus
    from .table_corpus import TABLE_EXTENSIONS
    from .named import named_table

    path = Path(spec)
    named = named_table(spec, default_split="test")
    if named is not None:
        table, name = named
        return _from_corpus(open_corpus(str(table)), label_column, name)
    if path.is_dir() and not is_dataset_folder(path):
        return _from_class_folders(path)
    if path.is_file() and path.suffix.lower() in TABLE_EXTENSIONS:
        # The label is read as the "caption" column: the reader's path handling and messages apply.
        try:
            corpus = open_corpus(str(path), image_column=image_column, caption_column=label_column)
        except ValueError as e:
            raise ValueError(str(e).replace("set caption_column=", "set --label-column=")) from None
        return LabelledImages([corpus[i].image for i in range(len(corpus))],
                              [corpus[i].captions[0] for i in range(len(corpus))],
                              [corpus[i].source for i in range(len(corpus))], path.stem)
    if not path.exists() and not spec.startswith("hf:"):
        raise FileNotFoundError(f"{spec}: no such file or folder")
    corpus = open_corpus(spec, split=split, image_column=image_column, caption_column=label_column)
    if isinstance(corpus, HFDatasetCorpus):
        feature = corpus.dataset.features.get(label_column)
        names = getattr(feature, "names", None)
        data = _from_corpus_hf(corpus, label_column, names)
        return data
    return _from_corpus(corpus, label_column, getattr(corpus, "name", spec))


def _from_corpus_hf(corpus: Any, label_column: str, names: Optional[list[str]]) -> LabelledImages:
    images, labels, sources = [], [], []
    for i in range(len(corpus)):
        row = corpus[i]
        value = row.captions[0]
        labels.append(names[int(value)] if names is not None else str(value))
        images.append(row.image)
        sources.append(row.source)
    return LabelledImages(images, labels, sources, getattr(corpus, "name", "dataset"))
