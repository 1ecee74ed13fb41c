"""The search service behind the HTTP API: indexes and their models loaded once, queries answered.

Each model is loaded once and shared by every index built with it (a joint index's image and text
halves use one model). A model runs on its own single thread: text queries from concurrent requests
are embedded together by a :class:`~.batcher.TextBatcher`; image queries and ITM re-ranking run on
the same thread; faiss searches run on the default thread pool.

A joint index (a folder with ``joint.json`` beside ``image/`` and ``text/``, each an index folder) is
served as two indexes, ``NAME/image`` and ``NAME/text``.

Example:
    >>> service = SearchService.load(["runs/demo-emoji/index", "cats=indexes/cats"])
    >>> hits = await service.search_text("index", "a smiling cat", k=5)
    >>> hits[0]["caption"], hits[0]["image_url"]
    ('smiling cat face with open mouth', '/image/index/118')
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union
from urllib.parse import quote

import numpy as np

from .batcher import TextBatcher
from .errors import ApiError
from .image_files import stored_image

__all__ = ["SearchService", "ServedIndex", "index_folders", "MAX_TEXT_CHARS"]

MAX_TEXT_CHARS = 1000  # far beyond any tokenizer's context; refuses megabyte "queries"

PathLike = Union[str, os.PathLike]


def index_folders(indexes: Union[Sequence[PathLike], Mapping[str, PathLike]]) -> list[tuple[str, Path]]:
    """(name, folder) of every index to serve: ``NAME=PATH`` or a folder (named after it); a joint index
    folder (holding joint.json) gives ``NAME/image`` and ``NAME/text``.

    Example:
        >>> index_folders(["runs/demo/index", "pets=indexes/pets-joint"])
        [('index', PosixPath('runs/demo/index')), ('pets/image', ...), ('pets/text', ...)]
    """
    from ..retrieval.joint_index import is_joint, part_folders

    pairs: list[tuple[str, Path]] = []
    items = indexes.items() if isinstance(indexes, Mapping) else [_name_and_path(p) for p in indexes]
    for name, path in items:
        path = Path(path)
        if is_joint(path):
            pairs += [(f"{name}/{part}", folder) for part, folder in part_folders(path).items()]
        else:
            pairs.append((name, path))
    seen: dict[str, Path] = {}
    for name, path in pairs:
        if name in seen:
            raise ValueError(f"two indexes are named '{name}' ({seen[name]} and {path}): name them, e.g. "
                             f"{name}-2={path}")
        seen[name] = path
    if not pairs:
        raise ValueError("no index to serve: give at least one index folder")
    return pairs


def _name_and_path(item: PathLike) -> tuple[str, Path]:
    text = os.fspath(item)
    name, sep, path = text.partition("=")
    if sep and name and "/" not in name and not Path(text).exists():
        return name, Path(path)
    return Path(text).resolve().name or text, Path(text)


@dataclass
class ServedIndex:
    """One served index: its name, the loaded :class:`RetrievalIndex` and the key of its shared model."""

    name: str
    index: Any
    model_key: str
    info: dict = field(default_factory=dict)


class SearchService:
    """Loaded indexes and models, answering text, image and embedding queries.

    Example:
        >>> service = SearchService.load(["runs/demo-emoji/index"])
        >>> [d["name"] for d in service.describe()]
        ['index']
    """

    def __init__(self, indexes: Sequence[ServedIndex], models: Mapping[str, Any]):
        self.indexes = {served.name: served for served in indexes}
        self.models = dict(models)
        self._executors = {key: ThreadPoolExecutor(1, thread_name_prefix="vlp-model") for key in self.models}
        self.batchers = {key: TextBatcher(self._text_encoder(key), self._executors[key]) for key in self.models}

    @classmethod
    def load(cls, indexes: Union[Sequence[PathLike], Mapping[str, PathLike]],
             models: Optional[Mapping[str, Any]] = None, model_spec: Optional[str] = None) -> "SearchService":
        """Open every index (checked, see :meth:`RetrievalIndex.load`) and load each model once.

        ``models`` maps model specs to models already loaded (tests, notebooks); others are loaded
        from the spec each index stores, or from ``model_spec`` for every index (a model that moved).

        Example:
            >>> SearchService.load({"emoji": "runs/demo-emoji/index"}).indexes["emoji"].index.ntotal
            3764
        """
        from ..models import load_model
        from ..retrieval import RetrievalIndex
        from ..retrieval.index_files import read_info
        from ..retrieval.signature import check_model_present

        loaded = dict(models or {})
        served = []
        for name, path in index_folders(indexes):
            info = read_info(path)
            spec = model_spec or (info.get("signature") or {}).get("model")
            if not spec:
                raise ValueError(f"{path} does not name the model it was built with: serve it with --model")
            key = str(spec)
            if key not in loaded:
                if not model_spec:
                    check_model_present(key, str(path))
                loaded[key] = load_model(key).eval()
            index = RetrievalIndex.load(path, model=loaded[key], model_spec=key)
            served.append(ServedIndex(name, index, key, index.info))
        return cls(served, {key: loaded[key] for key in {s.model_key for s in served}})

    # ------------------------------------------------------------------ lookups

    def get(self, name: Optional[str]) -> ServedIndex:
        """The served index ``name`` (the first one when None), else a 404 listing the names."""
        if name is None:
            return next(iter(self.indexes.values()))
        if name not in self.indexes:
            raise ApiError(404, "unknown_index", f"index '{name}' is not served; served: "
                                                 f"{', '.join(self.indexes)} (GET /indexes)")
        return self.indexes[name]

    def has_itm(self, served: ServedIndex) -> bool:
        return bool(getattr(self.models[served.model_key], "has_itm", False))

    def describe(self) -> list[dict[str, Any]]:
        """What each index holds: name, model, size, kind, modality, measured recall@10, ITM re-ranking."""
        rows = []
        for served in self.indexes.values():
            info = served.info
            rows.append({"name": served.name, "model": (info.get("signature") or {}).get("model"),
                         "modality": info.get("modality"), "kind": info.get("kind"), "factory": info.get("factory"),
                         "size": served.index.ntotal, "dim": served.index.dim,
                         "search_params": info.get("search_params") or {}, "recall@10": info.get("recall@10"),
                         "rerank": self.has_itm(served), "warnings": info.get("warnings") or []})
        return rows

    def image(self, name: str, image_id: str) -> tuple[bytes, str]:
        """Bytes and media type of the image of row ``image_id`` of index ``name`` (404 when there is none)."""
        served = self.get(name)
        if not (image_id.isascii() and image_id.isdigit()) or int(image_id) >= served.index.ntotal:
            raise ApiError(404, "unknown_id", f"index '{name}' has no id {image_id!r} (ids 0..{served.index.ntotal - 1})")
        value = served.index.meta_rows([int(image_id)])["image"].iloc[0]  # on-disk indexes: that row only
        return stored_image(None if value is None else str(value), served.index.path, f"id {image_id} of '{name}'")

    # ------------------------------------------------------------------ queries

    def _text_encoder(self, key: str):
        from ..retrieval.index_search import encode_queries

        return lambda texts: encode_queries(self.models[key], list(texts), None)

    async def _on_model(self, served: ServedIndex, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executors[served.model_key], fn, *args)

    def _hits(self, served: ServedIndex, hits: list[dict]) -> list[dict[str, Any]]:
        """Hits as the API gives them: the server's file paths become image URLs."""
        out = []
        for hit in hits:
            hit = dict(hit)
            image = hit.pop("image", None)
            public = {"rank": hit.pop("rank"), "score": hit.pop("score"), "id": hit.pop("id"),
                      "caption": hit.pop("caption")}
            public["image_url"] = f"/image/{quote(served.name, safe='/')}/{public['id']}" if image else None
            for key in ("itm_score", "rerank_score"):
                if key in hit:
                    public[key] = hit.pop(key)
            public["metadata"] = hit
            out.append(public)
        return out

    def _search(self, served: ServedIndex, **query) -> list[dict]:
        try:
            return served.index.search(**query)[0]
        except NotImplementedError as e:  # re-ranking asked of a model without an ITM head
            raise ApiError(400, "rerank_unavailable", f"index '{served.name}': {e}") from None
        except ValueError as e:
            raise ApiError(400, "bad_query", str(e)) from None

    async def search_text(self, name: Optional[str], text: str, k: int, rerank: Optional[int] = None,
                          rerank_score: str = "itm") -> list[dict[str, Any]]:
        """Top-``k`` hits of a text query; without re-ranking it is embedded with concurrent queries."""
        from ..retrieval.index_search import check_query_texts

        served = self.get(name)
        try:
            check_query_texts([text], where="text")
        except ValueError as e:
            raise ApiError(400, "bad_query", str(e)) from None
        if len(text) > MAX_TEXT_CHARS:
            raise ApiError(400, "bad_query", f"text: {len(text)} characters is over the limit of {MAX_TEXT_CHARS}")
        if rerank is not None:
            hits = await self._on_model(served, lambda: self._search(
                served, texts=[text], k=k, rerank=rerank, rerank_score=rerank_score))
        else:
            vector = await self.batchers[served.model_key].encode(text)
            hits = await asyncio.to_thread(self._search, served, vectors=vector[None], k=k)
        return self._hits(served, hits)

    async def search_image(self, name: Optional[str], image: Any, k: int, rerank: Optional[int] = None,
                           rerank_score: str = "itm") -> list[dict[str, Any]]:
        """Top-``k`` hits of an image query (a decoded PIL image)."""
        served = self.get(name)
        hits = await self._on_model(served, lambda: self._search(
            served, images=[image], k=k, rerank=rerank, rerank_score=rerank_score))
        return self._hits(served, hits)

    async def search_vector(self, name: Optional[str], vector: Sequence[float], k: int) -> list[dict[str, Any]]:
        """Top-``k`` hits of an embedding (scaled to unit length, as the indexed vectors are)."""
        served = self.get(name)
        array = np.asarray(vector, dtype=np.float32).reshape(-1)
        if array.shape[0] != served.index.dim:
            raise ApiError(400, "bad_query", f"embedding has {array.shape[0]} values; index '{served.name}' "
                                             f"holds {served.index.dim}-dimensional vectors")
        norm = float(np.linalg.norm(array))
        if not np.isfinite(norm) or norm == 0.0:
            raise ApiError(400, "bad_query", "embedding must be finite and not all zeros")
        hits = await asyncio.to_thread(self._search, served, vectors=(array / norm)[None], k=k)
        return self._hits(served, hits)

    async def close(self) -> None:
        """Stop the batchers and the model threads."""
        for batcher in self.batchers.values():
            await batcher.close()
        for executor in self._executors.values():
            executor.shutdown(wait=False)
