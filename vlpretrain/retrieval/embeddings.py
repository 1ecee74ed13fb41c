"""Embedding export: a corpus encoded once into numbered shards, resumable, over one or many processes.

Shard ``k`` covers corpus rows ``[k*S, min((k+1)*S, N))``; the folder layout is described in
:mod:`vlpretrain.retrieval.embedding_set`, which reads a finished export back. ``meta/k.parquet`` is
written last per shard and ``manifest.json`` last of all, so a rerun resumes from the finished shards.
From WebDataset shards (a :class:`~vlpretrain.data.shard_corpus.ShardCorpus`) embedding shard ``k``
holds input shard ``k``'s samples instead, streamed (as clip-retrieval does).

Example:
    >>> from vlpretrain.data import open_corpus
    >>> from vlpretrain.models import load_model
    >>> model = load_model("runs/demo-emoji/final")
    >>> emb = export_embeddings(model, open_corpus("data/pairs.csv"), "emb/pairs", spec="runs/demo-emoji/final")
    >>> emb.image_embeddings().shape, emb.text_metadata().columns.tolist()
    ((1000, 256), ['row', 'caption'])
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections import deque
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from ..data.shard_corpus import ShardCorpus, ShardItemStream, original_path
from ..inference import encode_texts, image_feature_batches
from ..inference_shards import shard_feature_batches
from ..io import atomic_write, folder_lock, read_json, write_json
from .embedding_set import FORMAT, MANIFEST_NAME, META_COLUMNS, STATE_NAME, EmbeddingSet, shard_name
from .signature import check_same_model, model_signature

__all__ = ["export_embeddings"]

logger = logging.getLogger(__name__)

STATE_FORMAT = "vlpretrain-embeddings-export-state-v1"
MODALITIES = ("image", "text")
DTYPES = ("float16", "float32")
SHARD_FOLDERS = ("image", "text", "meta", "text_meta")
MAX_BAD_IMAGES_LOGGED = 20
# Parquet schema metadata of meta/k.parquet (input shards only): the bad samples skipped, [[source, reason]].
SKIPPED_KEY = b"vlpretrain.skipped"


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would add ".npy" to a temp name
            np.save(f, array)

    atomic_write(path, write)


def _save_parquet(path: Path, table) -> None:
    import pyarrow.parquet as pq

    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def _describe(index: int, row: Any) -> dict[str, Any]:
    """What meta/*.parquet keeps of a corpus row (read in the loader's workers with the image)."""
    return {"path": row.image if isinstance(row.image, str) else "", "captions": list(row.captions),
            "extras": dict(row.extras), "source": row.source}


def _shard_batches(shards: Sequence[int], n: int, shard_size: int, batch_size: int) -> list[list[int]]:
    """Batches of row indices that never straddle a shard boundary, shards in the given order."""
    batches = []
    for k in shards:
        lo, hi = k * shard_size, min((k + 1) * shard_size, n)
        batches.extend(list(range(b, min(b + batch_size, hi))) for b in range(lo, hi, batch_size))
    return batches


# ----------------------------------------------------------------------------- one shard


def _meta_table(shard: dict[str, list], extra_names: dict[str, str]):
    import pyarrow as pa

    columns = {
        "row": pa.array(shard["row"], pa.int64()),
        "image": pa.array(shard["path"], pa.string()),
        "captions": pa.array(shard["captions"], pa.list_(pa.string())),
        "ok": pa.array(shard["ok"], pa.bool_()),
    }
    for name, column in extra_names.items():
        values = [extras.get(name) for extras in shard["extras"]]
        try:
            columns[column] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
            # Mixed or exotic values (e.g. images in an extra column): keep them readable as text.
            columns[column] = pa.array([None if v is None else str(v) for v in values], pa.string())
    return pa.table(columns)


def _release_freed_memory() -> None:
    """Hand the heap that the finished shard's arrays freed back to the OS (glibc keeps it otherwise, and a
    long export's resident size then wanders ~100 MiB above its working set); a no-op elsewhere."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _write_shard(out: Path, k: int, shard: dict[str, list], image_features: Optional[np.ndarray],
                 text_features: Optional[np.ndarray], dtype: str, extra_names: dict[str, str],
                 skipped: Optional[list[tuple[str, str]]] = None) -> None:
    """Write shard ``k``'s files; ``meta/k.parquet`` goes last, so it alone marks the shard finished."""
    import pyarrow as pa

    if image_features is not None:
        _save_npy(out / "image" / shard_name(k, "npy"), image_features.astype(dtype))
    if text_features is not None:
        rows = [r for r, caps in zip(shard["row"], shard["captions"]) for _ in caps]
        _save_npy(out / "text" / shard_name(k, "npy"), text_features.astype(dtype))
        captions = [c for caps in shard["captions"] for c in caps]
        _save_parquet(out / "text_meta" / shard_name(k, "parquet"),
                      pa.table({"row": pa.array(rows, pa.int64()), "caption": pa.array(captions, pa.string())}))
    meta = _meta_table(shard, extra_names)
    if skipped is not None:
        meta = meta.replace_schema_metadata({**(meta.schema.metadata or {}), SKIPPED_KEY: json.dumps(skipped)})
    _save_parquet(out / "meta" / shard_name(k, "parquet"), meta)


def _extra_columns(corpus: Any, first_extras: dict[str, Any]) -> dict[str, str]:
    """Extra corpus column -> meta column name (prefixed with "extra_" where it would shadow ours)."""
    names = list(getattr(corpus, "extra_columns", None) or first_extras)
    columns = {name: f"extra_{name}" if name in META_COLUMNS else name for name in names}
    renamed = [f"{name} -> {column}" for name, column in columns.items() if name != column]
    if renamed:
        logger.warning("extra corpus columns renamed in meta/*.parquet: %s", ", ".join(renamed))
    return columns


def _encode_shards(model, corpus: Any, out: Path, shards: list[int], n: int, *, shard_size: int, batch_size: int,
                   num_workers: int, modalities: list[str], dtype: str, device: torch.device,
                   progress: bool) -> None:
    """Encode and write ``shards`` (this process's share), one shard at a time, in order."""
    if not shards:
        return
    want_images = "image" in modalities
    # One loader over all of this process's shards keeps its decoding workers alive between shards.
    batches = image_feature_batches(model, corpus, batch_size, device, num_workers, progress, on_bad_image="zero",
                                    decode=want_images, describe=_describe, desc="embed",
                                    batch_sampler=_shard_batches(shards, n, shard_size, batch_size))
    extra_names: Optional[dict[str, str]] = None
    current, shard, image_chunks, bad = -1, {}, [], 0
    for batch in batches:
        batch["row"], batch["ok"] = batch["index"], batch["ok"].tolist()
        k = batch["row"][0] // shard_size
        if k != current:
            current, image_chunks = k, []
            shard = {key: [] for key in ("row", "path", "captions", "ok", "extras")}
        for key in shard:
            shard[key].extend(batch[key])
        if extra_names is None:
            extra_names = _extra_columns(corpus, batch["extras"][0])
        if want_images:
            image_chunks.append(batch["features"])
            for ok, source, error in zip(batch["ok"], batch["source"], batch["error"]):
                if not ok:
                    bad += 1
                    if bad <= MAX_BAD_IMAGES_LOGGED:
                        logger.warning("bad image, kept as a zero vector (ok=False): %s: %s", source, error)
        if len(shard["row"]) == min((k + 1) * shard_size, n) - k * shard_size:
            captions = [c for caps in shard["captions"] for c in caps]
            texts = encode_texts(model, captions, batch_size, device).numpy() if "text" in modalities else None
            images = torch.cat(image_chunks).numpy() if want_images else None
            _write_shard(out, k, shard, images, texts, dtype, extra_names)
            _release_freed_memory()
    if bad > MAX_BAD_IMAGES_LOGGED:
        logger.warning("%d more bad images not listed (%d in all in this process)", bad - MAX_BAD_IMAGES_LOGGED, bad)


def _describe_sample(index: int, row: Any) -> dict[str, Any]:
    """What meta/*.parquet keeps of an input-shard sample: its original path (else ``shard.tar:key``)."""
    return {"path": original_path(row), "captions": list(row.captions), "extras": dict(row.extras)}


def _new_shard() -> dict[str, list]:
    return {key: [] for key in ("row", "path", "captions", "ok", "extras", "features", "skipped")}


def _encode_input_shards(model, corpus: ShardCorpus, out: Path, shards: list[int], n: Optional[int], *,
                         shard_size: Optional[int],
                         batch_size: int, num_workers: int, modalities: list[str], dtype: str, device: torch.device,
                         progress: bool) -> None:
    """Encode input shards ``shards`` (this process's share), streamed: embedding shard ``k`` holds input
    shard ``k``'s samples; a sample's row is its running number (offset of shard ``k``, from the
    listed counts of the shards before it, plus its position), so rows never collide across processes.
    Shard ``k`` is written once its worker has moved past it (or the stream has ended)."""
    if not shards:
        return
    listed = [corpus.listed_samples(k) for k in range(max(shards) + 1)]
    offsets = np.concatenate([[0], np.cumsum(listed)]).tolist()
    want_images, workers = "image" in modalities, max(num_workers, 1)
    pending = [deque(ShardItemStream.split(shards, w, workers)) for w in range(workers)]
    open_shards: dict[int, dict[str, list]] = {}
    bad = 0

    def finish(k: int) -> None:
        shard = open_shards.pop(k, None) or _new_shard()
        captions = [c for caps in shard["captions"] for c in caps]
        texts = encode_texts(model, captions, batch_size, device).numpy() if "text" in modalities else None
        images = None
        if want_images:
            images = torch.stack(shard["features"]).numpy() if shard["features"] else \
                np.zeros((0, model.embed_dim), np.float32)
        extra_names = _extra_columns(corpus, dict.fromkeys(name for extras in shard["extras"] for name in extras))
        _write_shard(out, k, shard, images, texts, dtype, extra_names, skipped=shard["skipped"])
        _release_freed_memory()

    for batch in shard_feature_batches(model, corpus, shards, batch_size, device, num_workers, progress,
                                       decode=want_images, describe=_describe_sample, desc="embed"):
        for i, k in enumerate(batch["shard"]):
            queue = pending[batch["worker"][i]]
            while queue[0] != k:  # this worker has moved on: its earlier shards are complete
                finish(queue.popleft())
            if k not in open_shards:
                open_shards[k] = _new_shard()
            shard = open_shards[k]
            if batch["skip"][i] is not None:
                shard["skipped"].append((batch["source"][i], batch["skip"][i]))
                continue
            if batch["position"][i] >= listed[k]:
                raise ValueError(f"{corpus.shards[k].path}: holds more samples than the {listed[k]} its manifest "
                                 f"lists; write the shards again with `vlp data shard` or remove the manifest")
            shard["row"].append(offsets[k] + batch["position"][i])
            for key in ("path", "captions", "extras"):
                shard[key].append(batch[key][i])
            shard["ok"].append(bool(batch["ok"][i]))
            shard["features"].append(batch["features"][i])
            if want_images and not batch["ok"][i]:
                bad += 1
                if bad <= MAX_BAD_IMAGES_LOGGED:
                    logger.warning("bad image, kept as a zero vector (ok=False): %s: %s", batch["source"][i],
                                   batch["error"][i])
    for queue in pending:
        while queue:
            finish(queue.popleft())
    if bad > MAX_BAD_IMAGES_LOGGED:
        logger.warning("%d more bad images not listed (%d in all in this process)", bad - MAX_BAD_IMAGES_LOGGED, bad)


def _input_shards_summary(out: Path, num_shards: int, corpus: ShardCorpus) -> tuple[int, dict[str, Any]]:
    """Rows written and the manifest's ``input`` record (shards, skipped samples) of an export from shards."""
    import pyarrow.parquet as pq

    rows, skipped = 0, []
    for k in range(num_shards):
        meta = out / "meta" / shard_name(k, "parquet")
        rows += pq.read_metadata(meta).num_rows
        skipped += json.loads((pq.read_schema(meta).metadata or {}).get(SKIPPED_KEY, b"[]"))
    if skipped:
        logger.warning("%d bad input samples skipped, e.g. %s", len(skipped),
                       "; ".join(f"{source}: {why}" for source, why in skipped[:3]))
    return rows, {"input": {"spec": corpus.spec, "shards": [s.name for s in corpus.shards],
                            "skipped_samples": len(skipped),
                            "skipped_examples": [f"{source}: {why}" for source, why in skipped[:MAX_BAD_IMAGES_LOGGED]]}}


def _write_manifest(out: Path, signature: dict[str, Any], settings: dict[str, Any], num_shards: int,
                    dim: int, extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Count what the shards hold and write ``manifest.json`` (atomically, last of all files)."""
    import pyarrow.parquet as pq

    modalities = settings["modalities"]
    texts = bad = 0
    for k in range(num_shards):
        if "text" in modalities:
            texts += pq.read_metadata(out / "text_meta" / shard_name(k, "parquet")).num_rows
        if "image" in modalities:
            ok = pq.read_table(out / "meta" / shard_name(k, "parquet"), columns=["ok"]).column("ok")
            bad += int((~ok.to_numpy(zero_copy_only=False)).sum())
    rows = settings["rows"]
    manifest = {
        "format": FORMAT, "signature": signature, "dim": int(dim), "dtype": settings["dtype"], "normalized": True,
        "modalities": modalities, "shard_size": settings["shard_size"], "num_shards": num_shards,
        "counts": {"rows": rows, "image": rows if "image" in modalities else 0, "text": texts, "bad_images": bad},
        "data": settings["data"], "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
    }
    write_json(manifest, out / MANIFEST_NAME)
    return manifest


# ----------------------------------------------------------------------------- checks


def _read_record(path: Path) -> dict[str, Any]:
    advice = f"pick another --out or delete {path.parent}"
    data = read_json(path, advice)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not an export record: {advice}")
    return data


def _check_existing(out: Path, model, spec: Optional[str], settings: dict[str, Any]) -> Optional[dict[str, Any]]:
    """Refuse to mix with an earlier export of another model or other settings.

    Returns the manifest when ``out`` already holds this very export, finished; else ``None``.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a folder: pick another --out")
    manifest_path, state_path = out / MANIFEST_NAME, out / STATE_NAME
    if manifest_path.is_file():
        record, manifest = _read_record(manifest_path), True
    elif state_path.is_file():
        record, manifest = _read_record(state_path), False
    else:
        if any((out / folder).exists() for folder in SHARD_FOLDERS):
            raise ValueError(f"{out} holds shards of an unknown export (no {MANIFEST_NAME} or {STATE_NAME}): "
                             f"pick another --out or delete {out}")
        return None
    stored = record.get("signature")
    if not isinstance(stored, dict):
        raise ValueError(f"{out}: {manifest_path.name if manifest else STATE_NAME} has no model signature: "
                         f"pick another --out or delete {out}")
    check_same_model(stored, model, str(out), spec, made="holds embeddings of",
                     advice=f"pick another --out or delete {out}")
    old = {"data": record.get("data"), "shard_size": record.get("shard_size"), "dtype": record.get("dtype"),
           "modalities": record.get("modalities"),
           "rows": record.get("counts", {}).get("rows") if manifest else record.get("rows"),
           # A finished export from shards records them as num_shards (and has "input"), the state as input_shards.
           "input_shards": record.get("num_shards") if manifest and "input" in record else record.get("input_shards")}
    labels = {"data": lambda v: f"data {v!r}", "shard_size": lambda v: f"shard size {v}",
              "dtype": lambda v: f"dtype {v}", "modalities": lambda v: "modality " + "+".join(v or []),
              "rows": lambda v: f"a corpus of {v} rows", "input_shards": lambda v: f"{v} input shards"}
    for key, label in labels.items():
        if key in settings and old[key] != settings[key]:  # rows: not known before reading input shards
            raise ValueError(f"{out} holds an export made with {label(old[key])}, not {label(settings[key])}: "
                             f"pick another --out or delete {out}")
    return record if manifest else None


def _finished_shards(out: Path, num_shards: int) -> set[int]:
    return {k for k in range(num_shards) if (out / "meta" / shard_name(k, "parquet")).is_file()}


def _remove_temp_files(out: Path) -> None:
    """Half-written temp files of a killed export (never renamed into place)."""
    for folder in (out, *(out / f for f in SHARD_FOLDERS)):
        if folder.is_dir():
            for tmp in folder.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- export


class _Single:
    """Stand-in for an ``accelerate.Accelerator`` when running in one process without one."""

    process_index, num_processes, is_main_process = 0, 1, True

    def __init__(self, device: torch.device):
        self.device = device

    def wait_for_everyone(self) -> None:
        pass


@contextlib.contextmanager
def _one_writer(out: Path, acc: Any) -> Iterator[None]:
    """Hold ``out``'s lock (:func:`vlpretrain.io.folder_lock`) for one export: the main process takes it
    for the processes of its launch and sends its answer to all (bytes in a tensor, no pickling), so
    all of them stop with its one-line error when another export holds it."""
    with contextlib.ExitStack() as stack:
        busy = b""
        if acc.is_main_process:
            try:
                stack.enter_context(folder_lock(out, "wait for it, or choose another --out"))
            except BlockingIOError as e:
                busy = str(e).encode("utf-8")[:4096]
        if acc.num_processes > 1:
            from accelerate.utils import broadcast

            data = broadcast(torch.tensor(list(busy.ljust(4096, b"\0")), dtype=torch.uint8, device=acc.device))
            busy = bytes(data.cpu().tolist()).rstrip(b"\0")
        if busy:
            raise BlockingIOError(busy.decode("utf-8", "replace"))
        yield


def _check_arguments(modalities: Union[str, Sequence[str]], dtype: str, **ints: int) -> list[str]:
    """The modalities in canonical order; a one-line error for a bad modality, dtype or count."""
    given = [modalities] if isinstance(modalities, str) else list(modalities)
    unknown = [m for m in given if m not in MODALITIES]
    modalities = [m for m in MODALITIES if m in given]
    if unknown or not modalities:
        raise ValueError(f"modalities: expected 'image' and/or 'text', got {unknown or 'none'}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype: '{dtype}' is not one of {', '.join(DTYPES)}")
    for name, value in ints.items():
        least = 0 if name == "num_workers" else 1
        if not isinstance(value, int) or value < least:
            raise ValueError(f"{name}: expected an integer >= {least}, got {value!r}")
    return modalities


def export_embeddings(model, corpus: Any, out: Union[str, os.PathLike], *, spec: Optional[str] = None,
                      data_spec: str = "", modalities: Sequence[str] = ("image", "text"), dtype: str = "float16",
                      shard_size: int = 10_000, batch_size: int = 256, num_workers: int = 0, progress: bool = True,
                      accelerator: Any = None) -> EmbeddingSet:
    """Encode every image and every caption of ``corpus`` into the shard folder ``out``.

    Resumes an interrupted export into the same ``out`` (finished shards are skipped) and returns at
    once when ``out`` already holds this export, finished. With an ``accelerate.Accelerator`` of
    several processes, shard ``k`` is encoded by process ``k % num_processes`` and the main process
    writes the manifest once all are done. Images that cannot be decoded keep their row with a zero
    embedding and ``ok=False``; they are logged and counted in the manifest.

    ``corpus`` may be a :class:`~vlpretrain.data.shard_corpus.ShardCorpus`: then ``shard_size`` is unused,
    embedding shard ``k`` holds input shard ``k``'s samples (streamed over ``num_workers`` decoding
    workers; ``row`` is the sample's running number, ``image`` its original path from its ``.json``,
    else ``shard.tar:key``), and the manifest's ``input`` names the bad samples skipped.

    ``spec`` names the model (stored in the signature); ``data_spec`` names the corpus (stored and
    checked on resume). ``modalities``: "image" and/or "text"; without "image" no image is decoded
    and ``ok`` is True for every row. ``counts`` in the manifest count the embeddings written
    (``image`` is 0 without "image", ``text`` 0 without "text"). With an ``accelerator`` the model is
    moved to ``accelerator.device``. One export at a time writes ``out``: another one (another command,
    not a process of the same launch) is refused at once with a one-line ``BlockingIOError``.

    Example:
        >>> emb = export_embeddings(model, open_named_corpus("emoji:test", DataConfig()), "emb/emoji",
        ...                         spec="runs/demo-emoji/final", data_spec="emoji:test", shard_size=1000)
        >>> emb.manifest["counts"]
        {'rows': 380, 'image': 380, 'text': 760, 'bad_images': 0}
    """
    modalities = _check_arguments(modalities, dtype, shard_size=shard_size, batch_size=batch_size,
                                  num_workers=num_workers)
    out = Path(out)
    from_shards = isinstance(corpus, ShardCorpus)
    n = None if from_shards else len(corpus)
    if n == 0:
        raise ValueError(f"{data_spec or getattr(corpus, 'name', 'corpus')}: no usable rows to embed")
    num_shards = corpus.num_shards if from_shards else math.ceil(n / shard_size)

    acc = accelerator if accelerator is not None else _Single(next(model.parameters()).device)
    device = acc.device
    if accelerator is not None:
        model.to(device)
    signature = model_signature(model, spec)
    settings = {"data": str(data_spec), "shard_size": None if from_shards else shard_size, "dtype": dtype,
                "modalities": modalities, **({"input_shards": num_shards} if from_shards else {"rows": n})}

    with _one_writer(out, acc):
        # Every process reads the folder before anyone writes, so all of them see the same state.
        finished = _check_existing(out, model, spec, settings)
        if finished is not None:
            missing = sorted(set(range(num_shards)) - _finished_shards(out, num_shards))
            if missing:
                raise ValueError(f"{out}/{MANIFEST_NAME} lists {num_shards} shards but meta/"
                                 f"{shard_name(missing[0], 'parquet')} is missing: delete {out} and export again")
            if acc.is_main_process:
                logger.info("%s: export already finished (%d rows, %d shards, same model and arguments); "
                            "nothing to do", out, finished["counts"]["rows"], num_shards)
            return EmbeddingSet.open(out)
        done = _finished_shards(out, num_shards)
        acc.wait_for_everyone()
        if acc.is_main_process:
            for folder in ["meta", *modalities] + (["text_meta"] if "text" in modalities else []):
                (out / folder).mkdir(parents=True, exist_ok=True)
            _remove_temp_files(out)
            if not (out / STATE_NAME).is_file():  # a resume keeps the record it was checked against
                write_json({"format": STATE_FORMAT, "signature": signature, **settings}, out / STATE_NAME)
            if done:
                logger.info("resuming: %d of %d shards already done", len(done), num_shards)
        acc.wait_for_everyone()

        mine = [k for k in range(num_shards) if k % acc.num_processes == acc.process_index and k not in done]
        encode = _encode_input_shards if from_shards else _encode_shards
        encode(model, corpus, out, mine, n, shard_size=shard_size, batch_size=batch_size, num_workers=num_workers,
               modalities=modalities, dtype=dtype, device=device, progress=progress and acc.is_main_process)

        acc.wait_for_everyone()
        missing = sorted(set(range(num_shards)) - _finished_shards(out, num_shards))
        if missing:
            raise ValueError(f"{out}: shards {missing[:5]} were not written; rerun `vlp embed` with the same "
                             f"arguments to resume")
        if acc.is_main_process and from_shards:
            rows, extra = _input_shards_summary(out, num_shards, corpus)
            _write_manifest(out, signature, {**settings, "rows": rows}, num_shards, model.embed_dim, extra)
        elif acc.is_main_process:
            _write_manifest(out, signature, settings, num_shards, model.embed_dim)
        acc.wait_for_everyone()
        return EmbeddingSet.open(out)

