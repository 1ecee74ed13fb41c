"""A searchable FAISS index over an embedding export, with its metadata, model signature and measured recall.

Layout of an index folder ``INDEX_DIR``::

    INDEX_DIR/index.faiss   inner-product faiss index over unit-norm float32 vectors
    INDEX_DIR/meta.parquet  one row per vector in id order: id, modality, row, image, caption, source, extras
    INDEX_DIR/info.json     kind, factory string, search parameters, recall@10, signature, ... (written last)
    INDEX_DIR/embeddings/   only when built from a model and data: the embeddings it was built from

The whole folder is written into ``INDEX_DIR.tmp-XXXX`` and swapped in at the end, so a crash leaves
the previous index (or none) and never a half-written one. Loading checks the size and SHA-256 of
``index.faiss`` against ``info.json``.

Example:
    >>> index = RetrievalIndex.build("emb/pairs", "indexes/pairs")            # kind chosen from size + budget
    >>> hits = RetrievalIndex.load("indexes/pairs").search(texts="a red heart", k=5)[0]
    >>> [(h["rank"], round(h["score"], 3), h["image"]) for h in hits]
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from .faiss_index import (
    KINDS,
    add_vectors,
    build_faiss_index,
    choose_kind,
    exact_search,
    factory_string,
    index_kind,
    parse_memory,
    recall_at_k,
    set_search_params,
    tune_search_params,
)

__all__ = ["RetrievalIndex", "read_info", "FORMAT", "INDEX_NAME", "META_NAME", "INFO_NAME", "EMBEDDINGS_NAME"]

FORMAT = "vlpretrain-index-v1"
INDEX_NAME = "index.faiss"
META_NAME = "meta.parquet"
INFO_NAME = "info.json"
EMBEDDINGS_NAME = "embeddings"  # embeddings exported by build_from_corpus live inside the index folder
MODALITIES = ("image", "text")
RECALL_K = 10
MEASURE_QUERIES = 1000  # per modality, for the recall written to info.json
TUNE_QUERIES = 500  # per modality, for tuning; disjoint from the measured ones when the data allows
TUNE_TARGET = 0.95
TEXT_RECALL_FLOOR = 0.9
TEXT_RECALL_GAP = 0.05
# Columns of meta.parquet; corpus extra columns with these names get an "extra_" prefix.
META_COLUMNS = ("id", "modality", "row", "image", "caption", "source")
RERANK_MESSAGE = ("ITM re-ranking needs a model with an ITM fusion head (trained with model.fusion and "
                  "loss.name albef); this index's model has none")

EmbeddingsLike = Union[str, os.PathLike, Any, Sequence[Union[str, os.PathLike, Any]]]


# ----------------------------------------------------------------------------- embedding sets


def _open_sets(embeddings: EmbeddingsLike) -> list:
    from .embeddings import EmbeddingSet

    items = list(embeddings) if isinstance(embeddings, (list, tuple)) else [embeddings]
    if not items:
        raise ValueError("no embedding folders given: pass at least one folder written by `vlp embed`")
    return [item if isinstance(item, EmbeddingSet) else EmbeddingSet.open(item) for item in items]


def _check_same_signature(stored: dict[str, Any], given: dict[str, Any], where: str, what: str) -> None:
    """One-line error unless signature ``given`` (of ``what``) is the model ``stored`` (of ``where``)."""
    from .signature import PROBE_MIN_COSINE, signature_cosine

    made = f"{where} was built with model {stored.get('model') or '(unnamed)'} (dim {stored.get('dim')})"
    other = f"{what} holds embeddings of model {given.get('model') or '(unnamed)'}"
    advice = "use embeddings made with the same model, or rebuild the index from all of them"
    if int(given.get("dim", -1)) != int(stored.get("dim", -2)):
        raise ValueError(f"{made}; {other} with dim {given.get('dim')}: {advice}")
    cosine = signature_cosine(stored, given)
    if cosine is not None and cosine < PROBE_MIN_COSINE:
        raise ValueError(f"{made}; {other}, which embeds text differently (probe cosine {cosine:.3f} < "
                         f"{PROBE_MIN_COSINE}): {advice}")


def _shard_arrays(emb, modality: str) -> list[np.ndarray]:
    """Memory-mapped shard arrays of one modality (so sampling queries reads only the rows it needs)."""
    shards = range(int(emb.manifest["num_shards"]))
    return [np.load(emb.path / modality / f"{k:06d}.npy", mmap_mode="r") for k in shards]


def _meta_frame(emb, modality: str):
    """meta.parquet rows for the vectors this set contributes to a ``modality`` index, and their keep-mask."""
    import pandas as pd

    meta = emb.metadata()
    extras = [c for c in meta.columns if c not in ("row", "image", "captions", "ok")]
    renamed = {c: f"extra_{c}" if c in META_COLUMNS else c for c in extras}
    if modality == "image":
        keep = meta["ok"].to_numpy(dtype=bool)  # undecodable images are zero vectors: not searchable
        first = [list(c)[0] if c is not None and len(c) else "" for c in meta["captions"]]
        frame = pd.DataFrame({"modality": "image", "row": meta["row"].to_numpy(np.int64),
                              "image": meta["image"].astype(str).to_numpy(), "caption": first})
        for c in extras:
            frame[renamed[c]] = meta[c].to_numpy()
        return frame[keep].reset_index(drop=True), keep
    text = emb.text_metadata()
    by_row = meta.set_index("row")
    frame = pd.DataFrame({"modality": "text", "row": text["row"].to_numpy(np.int64),
                          "image": by_row["image"].reindex(text["row"]).astype(str).to_numpy(),
                          "caption": text["caption"].astype(str).to_numpy()})
    for c in extras:
        frame[renamed[c]] = by_row[c].reindex(text["row"]).to_numpy()
    return frame, np.ones(len(frame), dtype=bool)


def _collect(sets: list, modality: str, first_id: int, first_source: int):
    """Base vectors (float32) and their meta rows, ids numbered from ``first_id``."""
    import pandas as pd

    vectors, frames, skipped = [], [], 0
    for i, emb in enumerate(sets):
        x = emb.image_embeddings() if modality == "image" else emb.text_embeddings()
        frame, keep = _meta_frame(emb, modality)
        if len(keep) != len(x):
            raise ValueError(f"{emb.path}: {len(x)} {modality} embeddings but {len(keep)} metadata rows: "
                             f"delete {emb.path} and export again")
        frame.insert(4, "source", first_source + i)
        vectors.append(x[keep])
        frames.append(frame)
        skipped += int((~keep).sum())
    meta = pd.concat(frames, ignore_index=True)
    meta.insert(0, "id", np.arange(first_id, first_id + len(meta), dtype=np.int64))
    return np.ascontiguousarray(np.concatenate(vectors), dtype=np.float32), meta, skipped


def _sample_other(sets: list, modality: str, count: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``count`` random non-zero ``modality`` embeddings of ``sets`` (cross-modal queries)."""
    arrays = [a for emb in sets if modality in emb.manifest.get("modalities", []) for a in _shard_arrays(emb, modality)]
    sizes = np.array([len(a) for a in arrays], dtype=np.int64)
    total = int(sizes.sum())
    if total == 0:
        return np.zeros((0, 0), np.float32)
    # A few extra draws make up for zero vectors (undecodable images) that are dropped.
    picks = np.sort(rng.choice(total, size=min(total, count + count // 10 + 8), replace=False))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    which = np.searchsorted(starts, picks, side="right") - 1
    rows = np.stack([np.asarray(arrays[w][p - starts[w]], dtype=np.float32) for w, p in zip(which, picks)])
    rows = rows[np.linalg.norm(rows, axis=1) > 0]
    return np.ascontiguousarray(rng.permutation(rows)[:count])


# ----------------------------------------------------------------------------- recall


def _query_ids(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint (measure, tune) samples of base ids; with too few vectors, tuning reuses measured ids."""
    order = rng.permutation(n)
    measure = order[:MEASURE_QUERIES]
    tune = order[MEASURE_QUERIES:MEASURE_QUERIES + TUNE_QUERIES]
    if len(tune) < min(TUNE_QUERIES, n):
        tune = order[:TUNE_QUERIES]
    return measure, tune


def _split_other(queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    measure = queries[:MEASURE_QUERIES]
    tune = queries[MEASURE_QUERIES:]
    return measure, (tune if len(tune) >= min(TUNE_QUERIES, len(queries)) else queries[:TUNE_QUERIES])


def _measure(index, base: np.ndarray, same: np.ndarray, other: np.ndarray, modality: str) -> dict[str, Any]:
    """recall@10 against exact search for same-modality and cross-modal queries."""
    result: dict[str, Any] = {}
    for name, queries in ((modality, same), (_other(modality), other)):
        key = f"{name}_queries"
        if len(queries) == 0:
            result[key] = None
            continue
        _, exact = exact_search(base, queries, RECALL_K)
        _, found = index.search(queries, exact.shape[1])
        result[key] = round(recall_at_k(found, exact, RECALL_K), 4)
    result["num_queries"] = int(len(same) + len(other))
    result["exact"] = False
    return result


def _other(modality: str) -> str:
    return "text" if modality == "image" else "image"


def _tune(index, base: np.ndarray, tune_sets: list[np.ndarray]) -> dict[str, int]:
    """The larger of the parameters each query modality needs to reach the target recall."""
    chosen: dict[str, int] = {}
    for queries in tune_sets:
        if len(queries):
            params, _ = tune_search_params(index, base, queries, k=RECALL_K, target=TUNE_TARGET)
            for name, value in params.items():
                chosen[name] = max(chosen.get(name, 0), int(value))
    set_search_params(index, chosen)
    return chosen


def _recall_warnings(recall: dict[str, Any], modality: str, kind: str) -> list[str]:
    """Warn when cross-modal queries lose recall (quantization hurts them more than same-modality ones)."""
    if recall.get("exact"):
        return []
    same, cross = recall.get(f"{modality}_queries"), recall.get(f"{_other(modality)}_queries")
    if cross is None or same is None:
        return []
    if cross < TEXT_RECALL_FLOOR or cross < same - TEXT_RECALL_GAP:
        other = _other(modality)
        return [f"{other}-query recall@10 is {cross:.3f} ({modality} queries {same:.3f}) on this {kind} index: "
                f"{other} queries lose recall with approximate search; rebuild with --kind flat or hnsw, or a "
                f"larger --memory-budget"]
    return []


# ----------------------------------------------------------------------------- files


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _temp_folder(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))


def _write_folder(tmp: Path, index, meta, info: dict[str, Any]) -> dict[str, Any]:
    """Write index.faiss, meta.parquet and (last) info.json into the temp folder ``tmp``."""
    import faiss

    from ..evaluation.tasks import write_json

    faiss.write_index(index, str(tmp / INDEX_NAME))
    meta.to_parquet(tmp / META_NAME, index=False)
    size = (tmp / INDEX_NAME).stat().st_size
    info = dict(info, index_bytes=size, index_sha256=_sha256(tmp / INDEX_NAME))
    warnings = [w for w in info.get("warnings", []) if not w.startswith(f"{INDEX_NAME} is ")]
    if size > int(info["memory_budget"]):
        # The budget steers the choice of kind; an index over it is still written, with a note.
        warnings.append(f"{INDEX_NAME} is {size} bytes, above the memory budget of {info['memory_budget']} "
                        f"bytes: rebuild with --kind ivfpq or a larger --memory-budget")
    info["warnings"] = warnings
    write_json(info, tmp / INFO_NAME)
    return info


def _rename_exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    import ctypes
    import errno

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
        return False  # kernel or file system without exchange
    raise OSError(code, f"cannot swap {a} into {b}: {os.strerror(code)}")


def _old_sibling(out: Path) -> Path:
    return out.with_name(f".{out.name}.old")


def _swap_in(tmp: Path, out: Path) -> None:
    """Put the finished folder ``tmp`` in place of ``out`` and remove the old one.

    With an atomic exchange there is no moment without a complete ``out``. Elsewhere the old folder
    is moved aside to ``.OUT.old`` first and moved back if the second rename fails.
    """
    if not out.exists():
        os.replace(tmp, out)
        return
    if _rename_exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old index
        return
    old = _old_sibling(out)
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def read_info(path: Union[str, os.PathLike]) -> dict[str, Any]:
    """The parsed info.json of an index folder, with a clear error when it is missing or not an index.

    Example:
        >>> read_info("indexes/pairs")["kind"]
        'flat'
    """
    import json

    path = Path(path)
    if not path.is_dir():
        if (_old_sibling(path) / INFO_NAME).is_file():
            raise FileNotFoundError(f"{path}: no such index folder, but {_old_sibling(path)} holds the index an "
                                    f"interrupted write moved aside: rename it back to {path}")
        raise FileNotFoundError(f"{path}: no such index folder (make one with `vlp index build`)")
    info_path = path / INFO_NAME
    if not info_path.is_file():
        raise FileNotFoundError(f"{path} has no {INFO_NAME}: not a finished index; rebuild it with `vlp index build`")
    try:
        info = json.loads(info_path.read_text())
    except ValueError as e:
        raise ValueError(f"{info_path}: not valid JSON ({e}): rebuild it with `vlp index build`") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        found = info.get("format") if isinstance(info, dict) else None
        raise ValueError(f"{info_path}: format {found!r} is not {FORMAT!r}: rebuild it with `vlp index build`")
    return info


def _plain(value: Any) -> Any:
    """numpy / pandas values as JSON-friendly Python values (NaN -> None)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    return value


# ----------------------------------------------------------------------------- the index


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
        self.meta = meta
        self.info = info
        self._model = model
        self._model_spec = model_spec
        self._model_checked = False

    def __repr__(self) -> str:
        return (f"RetrievalIndex({str(self.path)!r}, kind={self.info.get('kind')!r}, ntotal={self.ntotal}, "
                f"dim={self.dim})")

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
        else HNSW, else IVF-PQ (see :func:`faiss_index.choose_kind`). Approximate kinds are trained
        on a seeded sample, their nprobe / efSearch tuned to recall@10 >= 0.95 for both query
        modalities, and recall@10 against exact search is measured on up to 1000 held-out queries of
        each modality (image embeddings and caption embeddings) and written to info.json, with a
        warning when cross-modal queries lose recall. ``out`` is replaced atomically.

        Example:
            >>> index = RetrievalIndex.build(["emb/part1", "emb/part2"], "indexes/all", kind="auto",
            ...                              memory_budget="8GB")
            >>> index.info["recall@10"]
            {'image_queries': 1.0, 'text_queries': 1.0, 'num_queries': 0, 'exact': True}
        """
        return cls._build(embeddings, out, kind=kind, memory_budget=memory_budget, modality=modality, seed=seed,
                          progress=progress)

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
        sets = _open_sets(embeddings)
        signature = sets[0].signature
        for emb in sets[1:]:
            _check_same_signature(signature, emb.signature, f"{sets[0].path}", f"{emb.path}")
        for emb in sets:
            if modality not in emb.manifest.get("modalities", []):
                raise ValueError(f"{emb.path} holds no {modality} embeddings (exported with modalities "
                                 f"{emb.manifest.get('modalities')}): export them, or build with --modality "
                                 f"{_other(modality)}")
        base, meta, skipped = _collect(sets, modality, 0, 0)
        n, dim = base.shape
        if n == 0:
            raise ValueError(f"{', '.join(str(e.path) for e in sets)}: no {modality} embeddings to index "
                             f"(all {skipped} images were undecodable)")
        chosen = choose_kind(n, dim, budget) if kind == "auto" else kind
        rng = np.random.default_rng(seed)
        measure_ids, tune_ids = _query_ids(n, rng)
        other = _sample_other(sets, _other(modality), MEASURE_QUERIES + TUNE_QUERIES, rng)
        index = build_faiss_index(base, chosen, memory_budget=budget, seed=seed, progress=progress,
                                  holdout=np.union1d(measure_ids, tune_ids))
        warnings: list[str] = []
        if chosen == "flat":
            params: dict[str, int] = {}
            recall = {f"{modality}_queries": 1.0, f"{_other(modality)}_queries": 1.0 if len(other) else None,
                      "num_queries": 0, "exact": True}
        else:
            other_measure, other_tune = _split_other(other)
            params = _tune(index, base, [base[tune_ids], other_tune])
            recall = _measure(index, base, base[measure_ids], other_measure, modality)
            warnings += _recall_warnings(recall, modality, chosen)
        if not len(other):
            warnings.append(f"no {_other(modality)} embeddings in the sources: {_other(modality)}-query recall "
                            f"was not measured")
        recall = {"image_queries": recall.get("image_queries"), "text_queries": recall.get("text_queries"),
                  "num_queries": recall["num_queries"], "exact": recall["exact"]}
        info = {
            "format": FORMAT, "signature": signature, "dim": int(dim), "modality": modality, "kind": chosen,
            "factory": factory_string(chosen, n, dim, budget), "ntotal": int(index.ntotal), "search_params": params,
            "memory_budget": budget, "index_bytes": 0, "index_sha256": "", "build_seconds": 0.0,
            "recall@10": recall, "warnings": warnings,
            "sources": sources if sources is not None else [str(Path(e.path).resolve()) for e in sets],
            "seed": int(seed), "skipped_bad_images": int(skipped),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        tmp = _temp_folder(out)
        try:
            if move_in is not None:
                os.replace(move_in, tmp / EMBEDDINGS_NAME)
            info["build_seconds"] = round(time.time() - start, 3)
            info = _write_folder(tmp, index, meta, info)
            _swap_in(tmp, out)
        except BaseException:
            if move_in is not None and (tmp / EMBEDDINGS_NAME).is_dir() and not move_in.exists():
                os.replace(tmp / EMBEDDINGS_NAME, move_in)  # keep the export for a rerun to resume
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return cls(out, index, meta, info)

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
        import faiss
        import pandas as pd

        path = Path(path)
        info = read_info(path)
        index_path = path / INDEX_NAME
        expected = int(info.get("index_bytes", -1))
        size = index_path.stat().st_size if index_path.is_file() else 0
        corrupt = (f"{index_path} is truncated or corrupt ({size} bytes, expected {expected}): "
                   f"rebuild it with `vlp index build`")
        if size != expected:
            raise ValueError(corrupt)
        data = index_path.read_bytes()  # read once: hashed, then deserialized from memory
        if hashlib.sha256(data).hexdigest() != info.get("index_sha256"):
            raise ValueError(corrupt)
        try:
            index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        except RuntimeError:
            raise ValueError(corrupt) from None
        del data
        set_search_params(index, info.get("search_params") or {})
        meta_path = path / META_NAME
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} is missing: rebuild the index with `vlp index build`")
        meta = pd.read_parquet(meta_path)
        if len(meta) != index.ntotal:
            raise ValueError(f"{meta_path} has {len(meta)} rows but the index holds {index.ntotal} vectors: "
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
        fails, the folder on disk is unchanged and this object is reloaded from it.

        Example:
            >>> RetrievalIndex.load("indexes/pairs").add("emb/more-pairs").ntotal
            1500
        """
        start = time.time()
        sets = _open_sets(embeddings)
        modality = self.info["modality"]
        present = {str(self._source_path(source).resolve()) for source in self.info.get("sources", [])}
        for emb in sets:
            if str(Path(emb.path).resolve()) in present:
                raise ValueError(f"{emb.path} is already in the index {self.path} (see its sources): adding it "
                                 f"again would duplicate every vector")
            present.add(str(Path(emb.path).resolve()))
            _check_same_signature(self.info["signature"], emb.signature, str(self.path), str(emb.path))
            if modality not in emb.manifest.get("modalities", []):
                raise ValueError(f"{emb.path} holds no {modality} embeddings, and {self.path} is an index of "
                                 f"{modality} embeddings: export them with `vlp embed`")
        vectors, meta, skipped = _collect(sets, modality, self.ntotal, len(self.info.get("sources", [])))
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
        self.index, self.meta, self.info = fresh.index, fresh.meta, fresh.info

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
            info["warnings"] += notes + _recall_warnings(recall, modality, info["kind"])
        info["build_seconds"] = round(float(self.info.get("build_seconds", 0.0)) + time.time() - start, 3)
        tmp = _temp_folder(self.path)
        try:
            embedded = self.path / EMBEDDINGS_NAME
            if embedded.is_dir():
                # Embeddings exported at build time belong to the index: hard links carry them over
                # without copying, and leave the current folder whole if this write fails.
                shutil.copytree(embedded, tmp / EMBEDDINGS_NAME, copy_function=_link_or_copy)
            info = _write_folder(tmp, index, all_meta, info)
            _swap_in(tmp, self.path)
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
            base, _, _ = _collect(old_sets + new_sets, modality, 0, 0)
            if len(base) != index.ntotal:
                base = None
        if base is None:
            stale = dict(info["recall@10"], stale=True)
            return stale, [f"recall@10 was not measured again after adding: the source embeddings "
                           f"{', '.join(missing) or '(changed)'} are not available"]
        rng = np.random.default_rng(int(info.get("seed", 0)))
        measure_ids, _ = _query_ids(len(base), rng)
        other = _sample_other(old_sets + new_sets, _other(modality), MEASURE_QUERIES + TUNE_QUERIES, rng)
        recall = _measure(index, base, base[measure_ids], _split_other(other)[0], modality)
        return {"image_queries": recall.get("image_queries"), "text_queries": recall.get("text_queries"),
                "num_queries": recall["num_queries"], "exact": False}, []

    # ------------------------------------------------------------------ search

    def _get_model(self):
        from .signature import check_same_model

        if self._model is None:
            from ..models import load_model

            spec = self._model_spec or self.info["signature"].get("model")
            if not spec:
                raise ValueError(f"{self.path} does not name the model it was built with: pass --model "
                                 f"(or model= / model_spec=) to embed queries")
            self._model, self._model_spec = load_model(spec), str(spec)
        if not self._model_checked:
            check_same_model(self.info["signature"], self._model, str(self.path), self._model_spec)
            self._model_checked = True
        return self._model

    def _encode(self, texts: Optional[Sequence[str]], images: Optional[Sequence[Any]]) -> np.ndarray:
        import torch

        from ..data.images import load_rgb

        model = self._get_model()
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                if texts is not None:
                    features = [model.encode_text(model.tokenizer(list(texts[i:i + 256])).to(device))
                                for i in range(0, len(texts), 256)]
                else:
                    features = [model.encode_image(torch.stack([model.preprocess(load_rgb(im))
                                                                for im in images[i:i + 64]]).to(device))
                                for i in range(0, len(images), 64)]
        finally:
            model.train(was_training)
        return torch.cat(features).float().cpu().numpy()

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
        times the contrastive softmax, with the index's own, possibly quantized, inner product; see :func:`vlpretrain.evaluation.rerank.combined_scores`), given as
        ``"rerank_score"``.

        Example:
            >>> index.search(texts="a red heart", k=2)
            [[{'rank': 1, 'score': 0.31, 'id': 17, 'image': '/data/heart.png', 'caption': 'red heart', ...}, ...]]
        """
        if rerank is not None and (isinstance(rerank, bool) or not isinstance(rerank, (int, np.integer))
                                   or rerank < 1):
            raise ValueError(f"search: rerank must be a positive integer (candidates to re-score), got {rerank!r}")
        from ..evaluation.rerank import RERANK_SCORES

        if rerank_score not in RERANK_SCORES:
            raise ValueError(f"search: rerank_score must be one of {list(RERANK_SCORES)}, got {rerank_score!r}")
        given = [name for name, value in (("texts", texts), ("images", images), ("vectors", vectors))
                 if value is not None]
        if len(given) != 1:
            raise ValueError(f"search: give exactly one of texts, images or vectors (got {', '.join(given) or 'none'})")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"search: k must be a positive integer, got {k!r}")
        if rerank is not None:
            self._check_rerank(texts, images)
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
        results = []
        for row_scores, row_ids in zip(scores, ids):
            found = row_ids >= 0  # fewer than k reachable vectors (IVF with small nprobe) give -1
            hits = []
            # One frame lookup per query, not per hit: row-wise iloc on a mixed-type frame is slow.
            for score, i, values in zip(row_scores[found], row_ids[found],
                                        self.meta.iloc[row_ids[found]].to_dict("records")):
                values = {c: _plain(v) for c, v in values.items()}
                hit = {"rank": len(hits) + 1, "score": float(score), "id": int(i), "image": values.pop("image"),
                       "caption": values.pop("caption"), "row": int(values.pop("row"))}
                values.pop("id", None)
                hit.update(values)
                hits.append(hit)
            results.append(hits)
        if rerank is not None:
            results = [self._rerank(query, hits, int(rerank), int(k), rerank_score)
                       for query, hits in zip(texts if texts is not None else images, results)]
        return results

    def _check_rerank(self, texts, images) -> None:
        """One-line errors for re-ranking requests that cannot work, before any search."""
        if texts is None and images is None:
            raise ValueError("search: rerank needs the queries themselves (texts or images), not vectors: "
                             "the ITM head scores the query with each hit")
        modality = self.info["modality"]
        if (texts is not None) == (modality == "text"):
            raise ValueError(f"search: rerank scores image-text pairs: give texts for an index of images or images "
                             f"for an index of captions (this index holds {modality} embeddings)")
        if not getattr(self._get_model(), "has_itm", False):
            raise NotImplementedError(RERANK_MESSAGE)

    def _rerank(self, query: Any, hits: list[dict], rerank: int, k: int, rerank_score: str = "itm") -> list[dict]:
        """Re-sort the first ``rerank`` hits of one query by ITM score (``rerank_score``); keep the rest;
        cut to ``k``."""
        import torch

        from ..data.images import BadImageError, load_rgb
        from ..evaluation.rerank import combined_scores, model_logit_scale

        model = self._get_model()
        device = next(model.parameters()).device
        head, tail = hits[:rerank], hits[rerank:]
        if not head:
            return hits[:k]
        try:
            if isinstance(query, str):  # a caption against the hit images
                pictures = []
                for hit in head:
                    if not hit["image"]:
                        raise ValueError(f"search: cannot re-rank hit {hit['id']}: the index stores no image path "
                                         f"for it (images held inside the data set); rerank needs image files")
                    try:
                        pictures.append(model.preprocess(load_rgb(hit["image"])))
                    except BadImageError as e:
                        raise ValueError(f"search: cannot re-rank hit {hit['id']}: {e}; rerank reads the indexed "
                                         f"images from their paths") from None
                images = torch.stack(pictures).to(device)
                tokens = model.tokenizer([query] * len(head)).to(device)
            else:  # an image against the hit captions
                picture = model.preprocess(load_rgb(query))
                images = picture[None].expand(len(head), *picture.shape).to(device)
                tokens = model.tokenizer([hit["caption"] for hit in head]).to(device)
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad():
                    scores = model.itm_scores(images, tokens).float().cpu().tolist()
            finally:
                model.train(was_training)
        except BadImageError as e:
            raise ValueError(f"search: cannot read the query image: {e}") from None
        if rerank_score == "itm":
            ranking = scores
        else:
            ranking = combined_scores(torch.tensor(scores), torch.tensor([hit["score"] for hit in head]),
                                      model_logit_scale(model)).tolist()
        for hit, score, value in zip(head, scores, ranking):
            hit["itm_score"] = float(score)
            if rerank_score != "itm":
                hit["rerank_score"] = float(value)
        for hit in tail:
            hit["itm_score"] = None
            if rerank_score != "itm":
                hit["rerank_score"] = None
        # A stable sort: equal scores keep the embedding order.
        order = sorted(range(len(head)), key=lambda i: -ranking[i])
        ranked = [head[i] for i in order] + tail
        for rank, hit in enumerate(ranked, 1):
            hit["rank"] = rank
        return ranked[:k]
