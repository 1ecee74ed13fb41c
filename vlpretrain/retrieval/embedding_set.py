"""A finished embedding export folder, read back: embeddings and metadata in corpus order.

Layout of an export folder ``OUT`` (shard ``k`` covers corpus rows ``[k*S, min((k+1)*S, N))``)::

    OUT/manifest.json            written last, when every shard is done
    OUT/image/000000.npy         (rows, D) unit-norm float16/float32; an undecodable image gives a zero row
    OUT/text/000000.npy          (captions, D), the captions of the shard's rows in row order
    OUT/meta/000000.parquet      row, image, captions, ok, extra corpus columns; written last per shard
    OUT/text_meta/000000.parquet row, caption
    OUT/.export.json             signature and arguments of the export, so a resume can check them

Exported from WebDataset shards, shard ``k`` holds input shard ``k``'s samples instead; ``row`` is the
sample's running number (a skipped bad sample leaves its number unused), ``image`` its original path
from its ``.json`` (else ``shard.tar:key``), and ``manifest.json``'s ``input`` names the skipped samples.
The files and their reading are the same.

Example:
    >>> emb = EmbeddingSet.open("emb/pairs")
    >>> emb.image_embeddings().shape, emb.text_metadata().columns.tolist()
    ((1000, 256), ['row', 'caption'])
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

import numpy as np

from ..io import read_manifest

__all__ = ["EmbeddingSet", "FORMAT", "MANIFEST_NAME", "STATE_NAME", "shard_name", "unfinished_message"]

FORMAT = "vlpretrain-embeddings-v1"
MANIFEST_NAME = "manifest.json"
STATE_NAME = ".export.json"
# Column names of meta/*.parquet; a corpus extra column with one of these names gets an "extra_" prefix.
META_COLUMNS = ("row", "image", "captions", "ok")


def shard_name(k: int, ext: str) -> str:
    """File name of shard ``k`` (``000003.npy``)."""
    return f"{k:06d}.{ext}"


def unfinished_message(path: Path) -> str:
    """The error for an export folder whose manifest is not written yet."""
    return (f"{path} has no manifest.json: the export is unfinished; rerun `vlp embed` with the same "
            f"arguments to resume")


class EmbeddingSet:
    """A finished embedding export folder (see the module docstring for its layout).

    Example:
        >>> emb = EmbeddingSet.open("emb/pairs")
        >>> emb.dim, emb.manifest["counts"]
        (256, {'rows': 1000, 'image': 1000, 'text': 5000, 'bad_images': 0})
        >>> images, meta = emb.image_embeddings(), emb.metadata()   # (1000, 256) float32, 1000 rows
    """

    def __init__(self, path: Union[str, os.PathLike], manifest: dict[str, Any]):
        self.path = Path(path)
        self.manifest = manifest

    @classmethod
    def open(cls, path: Union[str, os.PathLike]) -> "EmbeddingSet":
        """Open a finished export; a folder without ``manifest.json`` is an unfinished export.

        Example:
            >>> EmbeddingSet.open("emb/pairs").signature["model"]
            'runs/demo-emoji/final'
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such embedding folder (make one with `vlp embed`)")
        if not (path / MANIFEST_NAME).is_file():
            raise FileNotFoundError(unfinished_message(path))
        manifest = read_manifest(path / MANIFEST_NAME, FORMAT, f"delete {path} and export again with `vlp embed`")
        return cls(path, manifest)

    def __repr__(self) -> str:
        return f"EmbeddingSet({str(self.path)!r}, dim={self.dim}, counts={self.counts})"

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def signature(self) -> dict[str, Any]:
        return self.manifest["signature"]

    @property
    def modalities(self) -> list[str]:
        return list(self.manifest["modalities"])

    @property
    def counts(self) -> dict[str, int]:
        return dict(self.manifest["counts"])

    @property
    def num_shards(self) -> int:
        return int(self.manifest["num_shards"])

    def _shard_files(self, folder: str, ext: str) -> list[Path]:
        files = [self.path / folder / shard_name(k, ext) for k in range(self.num_shards)]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{f} is missing: the embedding folder {self.path} is incomplete; "
                                        f"delete it and export again with `vlp embed`")
        return files

    def _embeddings(self, modality: str) -> np.ndarray:
        if modality not in self.modalities:
            raise ValueError(f"{self.path} holds no {modality} embeddings (exported with modalities "
                             f"{self.modalities}): export again with --modality {modality} or both")
        parts = [np.load(f) for f in self._shard_files(modality, "npy")]
        out = np.concatenate(parts).astype(np.float32, copy=False) if parts else np.zeros((0, self.dim), np.float32)
        expected = int(self.counts[modality])
        if out.shape != (expected, self.dim):
            raise ValueError(f"{self.path}/{modality}: shards hold {out.shape} embeddings, the manifest says "
                             f"({expected}, {self.dim}): delete {self.path} and export again")
        return out

    def image_embeddings(self) -> np.ndarray:
        """(N, D) float32 image embeddings in corpus row order (zero rows where ``ok`` is False)."""
        return self._embeddings("image")

    def text_embeddings(self) -> np.ndarray:
        """(M, D) float32 caption embeddings in the order of :meth:`text_metadata`."""
        return self._embeddings("text")

    def metadata(self):
        """One row per corpus row: ``row``, ``image``, ``captions``, ``ok`` and the corpus's extra columns."""
        import pandas as pd

        frames = [pd.read_parquet(f) for f in self._shard_files("meta", "parquet")]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(META_COLUMNS))

    def text_metadata(self):
        """One row per caption: ``row`` (the corpus row it belongs to) and ``caption``."""
        import pandas as pd

        if "text" not in self.modalities:
            raise ValueError(f"{self.path} holds no text embeddings (exported with modalities {self.modalities}): "
                             f"export again with --modality text or both")
        frames = [pd.read_parquet(f) for f in self._shard_files("text_meta", "parquet")]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["row", "caption"])
