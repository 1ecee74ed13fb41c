"""A searchable FAISS index over an embedding export, with its metadata, model signature and measured recall.

The folder layout is in :mod:`.index_files`; the whole folder is written into a temporary folder beside
``INDEX_DIR`` and swapped in at the end (:func:`vlpretrain.io.replace_folder`), so a crash leaves the
previous index (or none) and never a half-written one. Loading checks the size and SHA-256 of
``index.faiss`` against ``info.json``.

Example:
    >>> index = RetrievalIndex.build("emb/pairs", "indexes/pairs")            # kind chosen from size + budget
    >>> hits = RetrievalIndex.load("indexes/pairs").search(texts="a red heart", k=5)[0]
    >>> [(h["rank"], round(h["score"], 3), h["image"]) for h in hits]
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from ..io import folder_lock, replace_folder, temp_folder_beside
from .faiss_index import KINDS, add_vectors, choose_kind, index_kind, parse_memory, set_search_params
from .index_files import (
    BUSY_ADVICE,
    EMBEDDINGS_NAME,
    FORMAT,
    META_NAME,
    MetaRows,
    check_destination,
    link_or_copy,
    read_faiss,
    read_info,
    remove_stale_temp_folders,
    write_index_folder,
)
from .index_recall import (MEASURE_QUERIES, TUNE_QUERIES, measure, other_modality, query_ids, recall_warnings,
                           sample_other, split_other)
from .index_search import check_rerank, encode_queries, make_hits, rerank_hits
from .index_sources import EmbeddingsLike, check_same_signature, collect, open_sets
from .index_build import build_in_memory
from .ondisk import listed_count, write_ondisk_folder

__all__ = ["RetrievalIndex", "read_info"]

MODALITIES = ("image", "text")


def _claim(out: Path) -> None:
    """Before a build into ``out`` (holding its lock): refuse a destination that is not ours, and remove
    the temporary folders of killed builds."""
    check_destination(out)
    remove_stale_temp_folders(out)


class RetrievalIndex:
    """A loaded index folder: the faiss index, its metadata rows and ``info`` (the parsed info.json).

    Example:
        >>> index = RetrievalIndex.load("indexes/pairs")
        >>> index.ntotal, index.dim, index.info["kind"]
        (1000, 256, 'flat')
        >>> index.search(texts=["a red heart", "a cat"], k=3)[1][0]["image"]
        '/data/images/cat.png'
    """

    def __init__(self, path: Union[str, os.PathLike], index, meta, info: dict[str, Any], model=None,
                 model_spec: Optional[str] = None):
        self.path = Path(path)
        self.index = index
        self._meta = meta  # None: read from meta.parquet when first needed (on-disk indexes)
        self._meta_lock = threading.Lock()
        self._meta_rows = MetaRows(self.path / META_NAME)  # searches of an on-disk index read only their rows
        self.info = info
        self._model = model
        self._model_spec = model_spec
        self._model_checked = False

    def __repr__(self) -> str:
        return (f"RetrievalIndex({str(self.path)!r}, kind={self.info.get('kind')!r}, ntotal={self.ntotal}, "
                f"dim={self.dim})")

    @property
    def meta(self):
        """meta.parquet as a DataFrame, one row per vector in id order (an on-disk index reads it whole
        here, once; its searches read only the rows of their hits, see :meth:`meta_rows`)."""
        if self._meta is None:
            import pandas as pd

            with self._meta_lock:  # two threads' first searches read it once
                if self._meta is None:
                    self._meta = pd.read_parquet(self.path / META_NAME)
        return self._meta

    def meta_rows(self, ids) -> Any:
        """The meta rows of ``ids`` (a DataFrame, in the order given); an on-disk index whose metadata is
        not loaded reads only the parquet row groups that hold them.

        Example:
            >>> index.meta_rows([17])["caption"].iloc[0]
            'red heart'
        """
        meta = self._meta
        return meta.iloc[np.asarray(ids, dtype=np.int64)] if meta is not None else self._meta_rows(ids)

    @meta.setter
    def meta(self, value) -> None:
        self._meta = value
        if value is None:  # the folder was rewritten: row groups are read afresh
            self._meta_rows = MetaRows(self.path / META_NAME)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    # ------------------------------------------------------------------ build

    @classmethod
    def build(cls, embeddings: EmbeddingsLike, out: Union[str, os.PathLike], *, kind: str = "auto",
              memory_budget: Union[str, int] = "4GB", modality: str = "image", seed: int = 0,
              progress: bool = True) -> "RetrievalIndex":
        """Build an index of ``modality`` embeddings from one or more embedding folders into ``out``.

        ``kind="auto"`` picks flat (exact) below a million vectors when they fit ``memory_budget``,
        else IVF-SQ8, and ivf-ondisk (built shard by shard, see :mod:`.ondisk`) when the vectors do
        not fit the budget (see :func:`faiss_index.choose_kind`). Approximate kinds are trained
        on a seeded sample, their nprobe / efSearch tuned to recall@10 >= 0.95 for both query
        modalities, and recall@10 against exact search is measured on up to 1000 held-out queries of
        each modality (image embeddings and caption embeddings) and written to info.json, with a
        warning when cross-modal queries lose recall. ``out`` is replaced atomically; it must be
        missing, empty or an index folder (anything else is refused), and one build or add at a time
        writes it (:func:`vlpretrain.io.folder_lock`). Temporary folders of killed builds of ``out``
        are removed first. An ivf-ondisk build leaves glibc's malloc trim and mmap thresholds at 128 KiB
        for the rest of the process (see :func:`.ondisk.returning_allocators`).

        Example:
            >>> index = RetrievalIndex.build(["emb/part1", "emb/part2"], "indexes/all", kind="auto",
            ...                              memory_budget="8GB")
            >>> index.info["recall@10"]
            {'image_queries': 1.0, 'text_queries': 1.0, 'num_queries': 0, 'exact': True}
        """
        with folder_lock(out, BUSY_ADVICE):
            _claim(Path(out))
            return cls._build(embeddings, out, kind=kind, memory_budget=memory_budget, modality=modality,
                              seed=seed, progress=progress)

    @classmethod
    def _build(cls, embeddings: EmbeddingsLike, out: Union[str, os.PathLike], *, kind: str,
               memory_budget: Union[str, int], modality: str, seed: int, progress: bool, sources: Optional[list[str]] = None,
               move_in: Optional[Path] = None) -> "RetrievalIndex":
        """:meth:`build`; ``sources`` replaces the listed sources, ``move_in`` is an embedding folder
        moved into the index folder as ``embeddings/``."""
        start = time.time()
        out = Path(out)
        if modality not in MODALITIES:
            raise ValueError(f"modality '{modality}' is unknown: use image or text")
        if kind != "auto" and kind not in KINDS:
            raise ValueError(f"index kind '{kind}' is unknown: use one of {', '.join(('auto',) + KINDS)}")
        budget = parse_memory(memory_budget)
        sets = open_sets(embeddings)
        signature = sets[0].signature
        for emb in sets[1:]:
            check_same_signature(signature, emb.signature, f"{sets[0].path}", f"{emb.path}")
        for emb in sets:
            if modality not in emb.manifest.get("modalities", []):
                raise ValueError(f"{emb.path} holds no {modality} embeddings (exported with modalities "
                                 f"{emb.manifest.get('modalities')}): export them, or build with --modality "
                                 f"{other_modality(modality)}")
        listed = sum(listed_count(emb, modality) for emb in sets)
        chosen = choose_kind(listed, int(sets[0].dim), budget) if kind == "auto" else kind
        info = {"format": FORMAT, "signature": signature, "dim": int(sets[0].dim), "modality": modality, "kind": chosen,
                "memory_budget": budget, "index_bytes": 0, "index_sha256": "", "build_seconds": 0.0, "warnings": [],
                "sources": sources if sources is not None else [str(Path(e.path).resolve()) for e in sets],
                "seed": int(seed), "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        built: dict[str, Any] = {"meta": None}
        if chosen == "ivf-ondisk":
            def write(tmp: Path) -> dict[str, Any]:  # built inside the temp folder: its files are the index
                built["index"], done = write_ondisk_folder(sets, tmp, info, start=start, progress=progress)
                return done
        else:
            built["index"], built["meta"], info = build_in_memory(sets, info, budget, progress)

            def write(tmp: Path) -> dict[str, Any]:
                return write_index_folder(tmp, built["index"], built["meta"], dict(
                    info, build_seconds=round(time.time() - start, 3)))
        tmp = temp_folder_beside(out)
        try:
            if move_in is not None:
                os.replace(move_in, tmp / EMBEDDINGS_NAME)
            info = write(tmp)
            replace_folder(tmp, out)
        except BaseException:
            if move_in is not None and (tmp / EMBEDDINGS_NAME).is_dir() and not move_in.exists():
                os.replace(tmp / EMBEDDINGS_NAME, move_in)  # keep the export for a rerun to resume
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return cls(out, built["index"], built["meta"], info)

    @classmethod
    def build_from_corpus(cls, model, corpus, out: Union[str, os.PathLike], *, spec: Optional[str] = None,
                          data_spec: str = "", kind: str = "auto", memory_budget: Union[str, int] = "4GB",
                          modality: str = "image", seed: int = 0, batch_size: int = 256, num_workers: int = 0,
                          progress: bool = True, fresh: bool = False) -> "RetrievalIndex":
        """Embed ``corpus`` with ``model``, then build the index; the embeddings end up in ``out/embeddings``.

        The export goes first into ``OUT.embeddings-partial`` next to ``out`` (a rerun with the same
        arguments resumes it; ``fresh=True`` discards it instead, e.g. when the model was retrained),
        and is moved into the index folder with the finished index, so ``vlp index add`` can
        re-measure recall from it later.

        Example:
            >>> index = RetrievalIndex.build_from_corpus(load_model("runs/demo/final"), corpus, "indexes/emoji",
            ...                                          spec="runs/demo/final", data_spec="emoji:test")
        """
        from .embeddings import export_embeddings

        out = Path(out)
        if modality not in MODALITIES:
            raise ValueError(f"modality '{modality}' is unknown: use image or text")
        budget = parse_memory(memory_budget)  # fail before the (long) export on a bad budget
        staging = out.with_name(f"{out.name}.embeddings-partial")
        with folder_lock(out, BUSY_ADVICE):
            _claim(out)  # before the export, not after it
            if fresh:
                shutil.rmtree(staging, ignore_errors=True)
            emb = export_embeddings(model, corpus, staging, spec=spec, data_spec=data_spec, batch_size=batch_size,
                                    num_workers=num_workers, progress=progress)
            built = cls._build(emb, out, kind=kind, memory_budget=budget, modality=modality, seed=seed,
                               progress=progress, sources=[EMBEDDINGS_NAME], move_in=staging)
        built._model, built._model_spec, built._model_checked = model, spec, True
        return built

    # ------------------------------------------------------------------ load

    @classmethod
    def load(cls, path: Union[str, os.PathLike], model=None, model_spec: Optional[str] = None) -> "RetrievalIndex":
        """Open an index folder, checking ``index.faiss`` against the size and SHA-256 in info.json.

        ``model`` (or ``model_spec``, loaded when first needed; default: the model spec stored in
        the signature) embeds text and image queries; a model other than the one the index was
        built with is refused with a one-line error.

        Example:
            >>> index = RetrievalIndex.load("indexes/pairs", model_spec="runs/demo-emoji/final")
        """
        import pandas as pd
        import pyarrow.parquet as pq

        path = Path(path)
        info = read_info(path)
        index = read_faiss(path, info)
        set_search_params(index, info.get("search_params") or {})
        meta_path = path / META_NAME
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} is missing: rebuild the index with `vlp index build`")
        # An on-disk index can hold more rows than memory: its metadata is read when first searched.
        meta = None if info.get("kind") == "ivf-ondisk" else pd.read_parquet(meta_path)
        rows = pq.read_metadata(meta_path).num_rows if meta is None else len(meta)
        if rows != index.ntotal:
            raise ValueError(f"{meta_path} has {rows} rows but the index holds {index.ntotal} vectors: "
                             f"rebuild it with `vlp index build`")
        loaded = cls(path, index, meta, info, model=model, model_spec=model_spec)
        if model is not None:
            loaded._get_model()  # a wrong model fails now rather than at the first query
        return loaded

    # ------------------------------------------------------------------ add

    def add(self, embeddings: EmbeddingsLike, *, progress: bool = True) -> "RetrievalIndex":
        """Append the vectors of more embedding folders (same model) and rewrite the folder atomically.

        New ids continue after the existing ones; an IVF index keeps its trained quantizer. recall@10
        is measured again (from the sources listed in info.json and the new folders). If writing
        fails, the folder on disk is unchanged and this object is reloaded from it. One build or add
        at a time writes the folder (a second is refused at once); when another one changed it since
        this object was loaded, the vectors are added to the folder as it is now.

        Example:
            >>> RetrievalIndex.load("indexes/pairs").add("emb/more-pairs").ntotal
            1500
        """
        if self.info.get("kind") == "ivf-ondisk":
            raise ValueError(f"{self.path} is an on-disk index (ivf-ondisk): vectors cannot be added to it; rebuild "
                             f"it with `vlp index build` over all the embedding folders")
        with folder_lock(self.path, "wait for it to finish, then add again"):
            on_disk = read_info(self.path)
            if any(on_disk.get(key) != self.info.get(key) for key in ("index_sha256", "created", "ntotal")):
                self._reload()  # another writer changed the folder since this object was loaded
            remove_stale_temp_folders(self.path)
            return self._add(embeddings, progress)

    def _add(self, embeddings: EmbeddingsLike, progress: bool) -> "RetrievalIndex":
        start = time.time()
        sets = open_sets(embeddings)
        modality = self.info["modality"]
        present = {str(self._source_path(source).resolve()) for source in self.info.get("sources", [])}
        for emb in sets:
            if str(Path(emb.path).resolve()) in present:
                raise ValueError(f"{emb.path} is already in the index {self.path} (see its sources): adding it "
                                 f"again would duplicate every vector")
            present.add(str(Path(emb.path).resolve()))
            check_same_signature(self.info["signature"], emb.signature, str(self.path), str(emb.path))
            if modality not in emb.manifest.get("modalities", []):
                raise ValueError(f"{emb.path} holds no {modality} embeddings, and {self.path} is an index of "
                                 f"{modality} embeddings: export them with `vlp embed`")
        vectors, meta, skipped = collect(sets, modality, self.ntotal, len(self.info.get("sources", [])))
        try:
            # In place rather than on a copy (which would double the memory); a failure reloads.
            self._grow(vectors, meta, skipped, sets, start, progress)
        except BaseException:
            try:
                self._reload()
            except Exception:
                pass  # the folder cannot be read either: the original error says more
            raise
        return self

    def _reload(self) -> None:
        fresh = RetrievalIndex.load(self.path)
        self.index, self.meta, self.info = fresh.index, fresh._meta, fresh.info

    def _grow(self, vectors: np.ndarray, meta, skipped: int, sets: list, start: float, progress: bool) -> None:
        import pandas as pd

        modality = self.info["modality"]
        index = self.index
        add_vectors(index, vectors, progress=progress, desc=f"adding to {self.info['factory']}")
        all_meta = pd.concat([self.meta, meta], ignore_index=True)
        info = dict(self.info)
        info["sources"] = list(self.info.get("sources", [])) + [str(Path(e.path).resolve()) for e in sets]
        info["ntotal"] = int(index.ntotal)
        info["skipped_bad_images"] = int(self.info.get("skipped_bad_images", 0)) + skipped
        info["warnings"] = [w for w in self.info.get("warnings", []) if "recall" not in w]
        if not info["recall@10"].get("exact"):
            recall, notes = self._remeasure(index, sets, info)
            info["recall@10"] = recall
            info["warnings"] += notes + recall_warnings(recall, modality, info["kind"])
        info["build_seconds"] = round(float(self.info.get("build_seconds", 0.0)) + time.time() - start, 3)
        tmp = temp_folder_beside(self.path)
        try:
            embedded = self.path / EMBEDDINGS_NAME
            if embedded.is_dir():
                # Embeddings exported at build time belong to the index: hard links carry them over
                # without copying, and leave the current folder whole if this write fails.
                shutil.copytree(embedded, tmp / EMBEDDINGS_NAME, copy_function=link_or_copy)
            info = write_index_folder(tmp, index, all_meta, info)
            replace_folder(tmp, self.path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.meta, self.info = all_meta, info

    def _source_path(self, source: str) -> Path:
        """A source of info.json as a path (relative ones live inside the index folder)."""
        return Path(source) if Path(source).is_absolute() else self.path / source

    def _source_sets(self, info: dict[str, Any]) -> tuple[list, list[str]]:
        from .embeddings import EmbeddingSet

        sets, missing = [], []
        for source in info.get("sources", []):
            folder = self._source_path(source)
            try:
                sets.append(EmbeddingSet.open(folder))
            except (FileNotFoundError, ValueError):
                missing.append(str(folder))
        return sets, missing

    def _remeasure(self, index, new_sets: list, info: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """recall@10 of the grown index; the base vectors come from the index itself where it stores
        them exactly (HNSW, IVF-Flat), else from the source folders."""
        import faiss

        modality = info["modality"]
        old_sets, missing = self._source_sets(dict(info, sources=self.info.get("sources", [])))
        base = None
        kind = index_kind(index)
        if kind == "hnsw":
            base = index.reconstruct_n(0, index.ntotal)
        elif kind == "ivf":
            ivf = faiss.extract_index_ivf(index)
            ivf.make_direct_map(True)
            base = index.reconstruct_n(0, index.ntotal)
            ivf.make_direct_map(False)  # not needed for search; keeps index.faiss as small as before
        elif not missing:
            base, _, _ = collect(old_sets + new_sets, modality, 0, 0)
            if len(base) != index.ntotal:
                base = None
        if base is None:
            stale = dict(info["recall@10"], stale=True)
            return stale, [f"recall@10 was not measured again after adding: the source embeddings "
                           f"{', '.join(missing) or '(changed)'} are not available"]
        rng = np.random.default_rng(int(info.get("seed", 0)))
        measure_ids, _ = query_ids(len(base), rng)
        other = sample_other(old_sets + new_sets, other_modality(modality), MEASURE_QUERIES + TUNE_QUERIES, rng)
        recall = measure(index, base, base[measure_ids], split_other(other)[0], modality)
        return {"image_queries": recall.get("image_queries"), "text_queries": recall.get("text_queries"),
                "num_queries": recall["num_queries"], "exact": False}, []

    # ------------------------------------------------------------------ search

    def _get_model(self):
        from .signature import check_model_present, check_same_model

        if self._model is None:
            from ..models import load_model

            spec = self._model_spec or self.info["signature"].get("model")
            if not spec:
                raise ValueError(f"{self.path} does not name the model it was built with: pass --model "
                                 f"(or model= / model_spec=) to embed queries")
            if not self._model_spec:
                check_model_present(spec, str(self.path))
            self._model, self._model_spec = load_model(spec), str(spec)
        if not self._model_checked:
            check_same_model(self.info["signature"], self._model, str(self.path), self._model_spec)
            self._model_checked = True
        return self._model

    def _encode(self, texts: Optional[Sequence[str]], images: Optional[Sequence[Any]]) -> np.ndarray:
        return encode_queries(self._get_model(), texts, images)

    def search(self, texts: Union[str, Sequence[str], None] = None, images: Any = None,
               vectors: Optional[np.ndarray] = None, k: int = 10, rerank: Optional[int] = None,
               rerank_score: str = "itm") -> list[list[dict]]:
        """Top-``k`` hits per query, given as ``texts``, ``images`` (paths / PIL images) or ``vectors``.

        Each hit is ``{"rank", "score", "id", "image", "caption", "row", "modality", "source", ...extras}``
        (rank from 1, score the inner product).

        ``rerank=K`` (models with an ITM fusion head): the top ``max(k, K)`` hits are found by embedding,
        the first K are re-scored by the image-text matching head (text queries against an image index,
        whose hit images are read from their paths; or image queries against a caption index) and
        re-sorted, best first; ``k`` hits are returned, each with ``"itm_score"`` (the match
        probability; None for hits beyond the first K). ``rerank_score``: ``"itm"`` sorts by that
        probability (ALBEF), ``"itm+itc"`` by ``log itm_score + logit_scale * score`` (the probability
        times the contrastive softmax, with the index's own, possibly quantized, inner product; see :func:`vlpretrain.inference.combined_scores`), given as
        ``"rerank_score"``.

        Example:
            >>> index.search(texts="a red heart", k=2)
            [[{'rank': 1, 'score': 0.31, 'id': 17, 'image': '/data/heart.png', 'caption': 'red heart', ...}, ...]]
        """
        if rerank is not None and (isinstance(rerank, bool) or not isinstance(rerank, (int, np.integer))
                                   or rerank < 1):
            raise ValueError(f"search: rerank must be a positive integer (candidates to re-score), got {rerank!r}")
        from ..inference import RERANK_SCORES

        if rerank_score not in RERANK_SCORES:
            raise ValueError(f"search: rerank_score must be one of {list(RERANK_SCORES)}, got {rerank_score!r}")
        given = [name for name, value in (("texts", texts), ("images", images), ("vectors", vectors))
                 if value is not None]
        if len(given) != 1:
            raise ValueError(f"search: give exactly one of texts, images or vectors (got {', '.join(given) or 'none'})")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"search: k must be a positive integer, got {k!r}")
        if rerank is not None:
            check_rerank(self._get_model, self.info["modality"], texts, images)
        if texts is not None:
            texts = [texts] if isinstance(texts, str) else list(texts)
            queries = self._encode(texts, None) if texts else np.zeros((0, self.dim), np.float32)
        elif images is not None:
            images = list(images) if isinstance(images, (list, tuple)) else [images]
            queries = self._encode(None, images) if images else np.zeros((0, self.dim), np.float32)
        else:
            queries = np.asarray(vectors, dtype=np.float32)
            queries = queries[None] if queries.ndim == 1 else queries
            if queries.ndim != 2 or queries.shape[1] != self.dim:
                raise ValueError(f"search: vectors of shape {tuple(np.shape(vectors))} do not match the index "
                                 f"dimension {self.dim}: give (n, {self.dim}) vectors")
        if len(queries) == 0:
            return []
        wanted = max(int(k), int(rerank or 0))
        scores, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), min(wanted, self.ntotal))
        results = [make_hits(self.meta_rows, row_scores, row_ids) for row_scores, row_ids in zip(scores, ids)]
        if rerank is not None:
            results = [rerank_hits(self._get_model(), query, hits, int(rerank), int(k), rerank_score)
                       for query, hits in zip(texts if texts is not None else images, results)]
        return results
