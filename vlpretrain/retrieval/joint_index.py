"""A joint index: the image and caption embeddings of one corpus, as two ordinary index folders under one.

Layout of a joint index folder ``OUT`` (written into a temporary folder and swapped in whole)::

    OUT/joint.json   format, the parts, the model signature (written last)
    OUT/image/       an index folder (see :mod:`.index_files`) of the image embeddings
    OUT/text/        an index folder of the caption embeddings

Either part answers text, image or vector queries (the towers share one embedding space): search
``part="image"`` to find images, ``part="text"`` to find captions. One model embeds the queries of both.

Example:
    >>> joint = JointIndex.build("emb/pairs", "indexes/pairs-joint")
    >>> joint.search(texts="a red heart", k=3, part="text")[0][0]["caption"]
    'red heart'
"""

from __future__ import annotations

import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Union

from ..io import folder_lock, read_manifest, replace_folder, temp_folder_beside, write_json
from .index import RetrievalIndex, _claim
from .index_files import BUSY_ADVICE, EMBEDDINGS_NAME, JOINT_NAME, link_or_copy
from .index_sources import EmbeddingsLike

__all__ = ["JointIndex", "JOINT_FORMAT", "PARTS", "is_joint", "part_folders", "open_index"]

JOINT_FORMAT = "vlpretrain-joint-index-v1"
PARTS = ("image", "text")


def is_joint(path: Union[str, os.PathLike]) -> bool:
    """Whether ``path`` is a joint index folder (it holds joint.json)."""
    return (Path(path) / JOINT_NAME).is_file()


def part_folders(path: Union[str, os.PathLike]) -> dict[str, Path]:
    """The index folder of each part of the joint index ``path``, from its joint.json (format checked).

    Example:
        >>> part_folders("indexes/emoji-joint")
        {'image': PosixPath('indexes/emoji-joint/image'), 'text': PosixPath('indexes/emoji-joint/text')}
    """
    path = Path(path)
    if not (path / JOINT_NAME).is_file():
        raise FileNotFoundError(f"{path} has no {JOINT_NAME}: not a joint index; build one with "
                                f"`vlp index build ... --modality both`")
    info = read_manifest(path / JOINT_NAME, JOINT_FORMAT, "rebuild it with `vlp index build --modality both`")
    parts = info.get("parts")
    if not isinstance(parts, dict) or any(not isinstance(parts.get(part), str) for part in PARTS):
        raise ValueError(f"{path / JOINT_NAME}: 'parts' must name the {' and '.join(PARTS)} folders; rebuild it "
                         f"with `vlp index build --modality both`")
    return {part: path / parts[part] for part in PARTS}


def open_index(path: Union[str, os.PathLike], model=None, model_spec: Optional[str] = None):
    """A :class:`JointIndex` or a :class:`RetrievalIndex`, whichever ``path`` holds.

    Example:
        >>> open_index("indexes/emoji-joint").parts["text"].ntotal
        3764
    """
    loader = JointIndex if is_joint(path) else RetrievalIndex
    return loader.load(path, model=model, model_spec=model_spec)


class JointIndex:
    """Image and text index folders of one corpus under one folder, searched with one model.

    Example:
        >>> joint = JointIndex.load("indexes/emoji-joint")
        >>> joint.search(images=["cat.png"], k=5, part="text")[0][0]["caption"]
        'cat face'
    """

    def __init__(self, path: Union[str, os.PathLike], parts: dict[str, RetrievalIndex], info: dict[str, Any]):
        self.path, self.parts, self.info = Path(path), parts, info

    def __repr__(self) -> str:
        return f"JointIndex({str(self.path)!r}, " + ", ".join(f"{p}={self.parts[p].ntotal}" for p in PARTS) + ")"

    @classmethod
    def build(cls, embeddings: EmbeddingsLike, out: Union[str, os.PathLike], *, kind: str = "auto",
              memory_budget: Union[str, int] = "4GB", seed: int = 0, progress: bool = True) -> "JointIndex":
        """Build ``out/image`` and ``out/text`` from the same embedding folders (both modalities needed).

        ``kind`` and ``memory_budget`` apply to each part; ``out`` is replaced atomically, under the
        same rules as :meth:`RetrievalIndex.build`.

        Example:
            >>> JointIndex.build(["emb/part1", "emb/part2"], "indexes/joint", memory_budget="8GB").parts["image"].ntotal
            2000
        """
        out = Path(out)
        with folder_lock(out, BUSY_ADVICE):
            _claim(out)
            return cls._write(out, lambda tmp, part: RetrievalIndex._build(
                embeddings, tmp / part, kind=kind, memory_budget=memory_budget, modality=part, seed=seed,
                progress=progress))

    @classmethod
    def _write(cls, out: Path, build_part) -> "JointIndex":
        tmp = temp_folder_beside(out)
        try:
            parts = {part: build_part(tmp, part) for part in PARTS}
            signature = parts["image"].info["signature"]
            info = {"format": JOINT_FORMAT, "parts": {part: part for part in PARTS},
                    "model": signature.get("model"), "dim": int(signature.get("dim", 0)),
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            write_json(info, tmp / JOINT_NAME)
            replace_folder(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for part, index in parts.items():
            index.path = out / part  # moved there with the folder
        return cls(out, parts, info)

    @classmethod
    def build_from_corpus(cls, model, corpus, out: Union[str, os.PathLike], *, spec: Optional[str] = None,
                          data_spec: str = "", kind: str = "auto", memory_budget: Union[str, int] = "4GB",
                          seed: int = 0, batch_size: int = 256, num_workers: int = 0, progress: bool = True,
                          fresh: bool = False) -> "JointIndex":
        """Embed ``corpus`` once (images and captions), then build both parts; each keeps the export in
        its ``embeddings/`` (hard links, not copies), staged as in :meth:`RetrievalIndex.build_from_corpus`.

        Example:
            >>> JointIndex.build_from_corpus(load_model("runs/demo/final"), corpus, "indexes/emoji-joint",
            ...                              spec="runs/demo/final", data_spec="emoji:test")
        """
        from .embeddings import export_embeddings
        from .faiss_index import parse_memory

        out = Path(out)
        budget = parse_memory(memory_budget)
        staging = out.with_name(f"{out.name}.embeddings-partial")
        options = dict(kind=kind, memory_budget=budget, seed=seed, progress=progress, sources=[EMBEDDINGS_NAME])
        with folder_lock(out, BUSY_ADVICE):
            _claim(out)
            if fresh:
                shutil.rmtree(staging, ignore_errors=True)
            emb = export_embeddings(model, corpus, staging, spec=spec, data_spec=data_spec, batch_size=batch_size,
                                    num_workers=num_workers, progress=progress)

            def build_part(tmp: Path, part: str) -> RetrievalIndex:
                copy = tmp / f"{part}.embeddings"
                shutil.copytree(emb.path, copy, copy_function=link_or_copy)  # each part keeps its own export
                return RetrievalIndex._build(copy, tmp / part, modality=part, move_in=copy, **options)

            joint = cls._write(out, build_part)
            shutil.rmtree(staging, ignore_errors=True)  # both parts hold it now
        for part in joint.parts.values():
            part._model, part._model_spec, part._model_checked = model, spec, True
        return joint

    @classmethod
    def load(cls, path: Union[str, os.PathLike], model=None, model_spec: Optional[str] = None) -> "JointIndex":
        """Open a joint index folder and both of its parts (each checked as :meth:`RetrievalIndex.load` does).

        Example:
            >>> JointIndex.load("indexes/emoji-joint", model_spec="/models/demo/final")
        """
        path = Path(path)
        parts = {part: RetrievalIndex.load(folder, model=model, model_spec=model_spec)
                 for part, folder in part_folders(path).items()}
        return cls(path, parts, read_manifest(path / JOINT_NAME, JOINT_FORMAT,
                                              "rebuild it with `vlp index build --modality both`"))

    def _share_model(self, wanted: RetrievalIndex) -> None:
        """Let ``wanted`` use the model another part has loaded already, so it is loaded once."""
        if wanted._model is None:
            for other in self.parts.values():
                if other._model is not None:
                    wanted._model, wanted._model_spec = other._model, other._model_spec
                    break

    def search(self, texts: Any = None, images: Any = None, vectors: Any = None, k: int = 10, part: str = "image",
               rerank: Optional[int] = None, rerank_score: str = "itm") -> list[list[dict]]:
        """:meth:`RetrievalIndex.search` of part ``"image"`` (find images) or ``"text"`` (find captions).

        Example:
            >>> joint.search(texts=["a red heart"], k=2, part="image")[0][0]["image"]
            '/data/heart.png'
        """
        if part not in self.parts:
            raise ValueError(f"part '{part}' is unknown: search part image or text of {self.path}")
        wanted = self.parts[part]
        self._share_model(wanted)
        return wanted.search(texts=texts, images=images, vectors=vectors, k=k, rerank=rerank, rerank_score=rerank_score)
