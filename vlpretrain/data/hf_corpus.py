"""Image-caption pairs from a Hugging Face ``datasets`` dataset: saved to disk, an imagefolder, or the hub.

Example:
    >>> from vlpretrain.data import HFDatasetCorpus
    >>> corpus = HFDatasetCorpus.from_imagefolder("my_images/")   # has metadata.jsonl
    >>> corpus[0].source
    'hf:my_images/[train]#0'
"""
from __future__ import annotations

import os
from typing import Any, Sequence

from .corpus import CorpusRow, ImageCaptionCorpus
from .corpus_columns import ColumnSpec, captions_from_cells, check_columns, image_from_dict, plain

__all__ = ["HFDatasetCorpus"]


def _pick_split(dd: Any, split: str | None, where: str) -> tuple[Any, str]:
    """Choose one split of a DatasetDict; default "train", or the only split there is."""
    names = list(dd.keys())
    if split is None:
        if "train" in names:
            split = "train"
        elif len(names) == 1:
            split = names[0]
        else:
            raise ValueError(f"{where}: several splits {names}; choose one with split=...")
    if split not in names:
        raise ValueError(f"{where}: no split {split!r}; available splits are {names}")
    return dd[split], split


class HFDatasetCorpus(ImageCaptionCorpus):
    """A corpus over a ``datasets.Dataset`` whose image column holds images, ``{"bytes","path"}``
    dicts, or path strings.

    An ``Image`` feature is read undecoded (bytes / path) so that decoding, and the skipping of
    corrupt files, happens in one place: :func:`vlpretrain.data.images.load_rgb`.

    Example:
        >>> corpus = HFDatasetCorpus.from_imagefolder("my_images/")   # has metadata.jsonl
        >>> corpus = HFDatasetCorpus.from_disk("saved_dataset/", split="validation")
        >>> corpus = HFDatasetCorpus.from_hub("nlphuji/flickr30k", split="test")  # online only
    """

    def __init__(
        self,
        dataset: Any,
        image_column: str = "image",
        caption_column: ColumnSpec = "caption",
        extra_columns: Sequence[str] | None = None,
        name: str = "dataset",
        split: str | None = None,
    ) -> None:
        super().__init__()
        import datasets

        self.split = split if split is not None else (str(dataset.split) if dataset.split else "")
        self.name = name
        self._where = f"hf:{name}[{self.split}]" if self.split else f"hf:{name}"
        caption_columns, self.extra_columns = check_columns(
            self._where, list(dataset.column_names), image_column, caption_column, extra_columns)
        if isinstance(dataset.features.get(image_column), datasets.Image):
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.image_column = image_column
        self.caption_columns = caption_columns
        self.dataset = dataset
        # Captions are text only: reading them once is cheap and lets us drop empty ones up front,
        # so len() is exact and no worker ever meets an uncaptioned row.
        cols = [list(dataset[c]) for c in caption_columns]
        self._index: list[int] = []
        empty: list[str] = []
        for i in range(len(dataset)):
            if captions_from_cells(col[i] for col in cols):
                self._index.append(i)
            else:
                empty.append(f"{self._where}#{i}")
        self._record_dropped(self._where, len(dataset), (("empty caption", empty),))

    # -- constructors ------------------------------------------------------------------------
    @classmethod
    def from_imagefolder(cls, data_dir: str | os.PathLike[str], split: str | None = None,
                         **kwargs: Any) -> "HFDatasetCorpus":
        """A local folder of images with ``metadata.jsonl`` / ``metadata.csv`` (``file_name`` column).

        Note: ``datasets`` reads file and folder names containing "train", "test", "val" as
        split markers.

        Example:
            >>> HFDatasetCorpus.from_imagefolder("pets/", caption_column="text")
        """
        import datasets

        dd = datasets.load_dataset("imagefolder", data_dir=str(data_dir))
        ds, split = _pick_split(dd, split, str(data_dir))
        kwargs.setdefault("name", str(data_dir))
        return cls(ds, split=split, **kwargs)

    @classmethod
    def from_disk(cls, path: str | os.PathLike[str], split: str | None = None,
                  **kwargs: Any) -> "HFDatasetCorpus":
        """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``.

        Example:
            >>> HFDatasetCorpus.from_disk("coco_saved/", split="validation")
        """
        import datasets

        obj = datasets.load_from_disk(str(path))
        kwargs.setdefault("name", str(path))
        if isinstance(obj, datasets.DatasetDict):
            obj, split = _pick_split(obj, split, str(path))
        return cls(obj, split=split, **kwargs)

    @classmethod
    def from_hub(cls, name: str, split: str | None = "train", **kwargs: Any) -> "HFDatasetCorpus":
        """A dataset on the Hugging Face hub (downloads, so it needs internet once; cached after).

        Example:
            >>> HFDatasetCorpus.from_hub("nlphuji/flickr30k", split="test", caption_column="caption")
        """
        import datasets

        obj = datasets.load_dataset(name) if split is None else datasets.load_dataset(name, split=split)
        if isinstance(obj, datasets.DatasetDict):
            obj, split = _pick_split(obj, split, f"hf:{name}")
        kwargs.setdefault("name", name)
        return cls(obj, split=split, **kwargs)

    # -- access --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> CorpusRow:
        j = self._index[self._check_index(i)]
        record = self.dataset[j]
        image = record[self.image_column]
        if isinstance(image, dict):
            image = image_from_dict(image)
        return CorpusRow(
            image=image,
            captions=captions_from_cells(record[col] for col in self.caption_columns),
            extras={c: plain(record[c]) for c in self.extra_columns},
            source=f"{self._where}#{j}",
        )
