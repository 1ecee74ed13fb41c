#!/usr/bin/env python
"""Retrieval index benchmark: FAISS flat / HNSW / IVF-PQ / IVF-SQ8 / re-scored IVF-PQ and ``auto`` (the kind
`vlp index build` picks) against ``torch.topk`` brute force, in one run.

Data: (i) clustered synthetic vectors -- a seeded Gaussian mixture (default 1000 centres in dim 256,
noise of norm ``--spread`` around unit centres, every vector unit-normalized), with separate query
vectors drawn from the same mixture -- at each of ``--sizes``; (ii) real embeddings of the emoji demo
corpus (``emoji:all``: the images are the index, captions and images the queries) from ``--model``,
at their real, small size.

Per index: build time (train + add, all threads), index memory (bytes of ``faiss.serialize_index``
and the growth of the peak resident set while building), recall@k against exact search after tuning
nprobe / efSearch on a separate set of tuning queries (``tune_search_params``, target ``--target``),
and queries/s for one batch of ``--queries`` queries with 1 thread and with ``--threads`` threads.
The reference is brute force with ``torch.topk`` (chunked matmul over the same base); ratios are the
index's queries/s over the reference's (and over faiss flat's) at the same thread count, and
``meets_target`` says whether recall@k >= ``--target`` at >= ``--speedup`` x exact search's queries/s.
Measurement helpers live in ``bench_index_measure.py``; the larger-than-memory build has its own
benchmark, ``bench_index_ondisk.py``.

    python tools/bench_index.py                            # 100k and 1M, writes results/bench_index.json
    python tools/bench_index.py --sizes 1000000 --kinds flat,auto,ivfpq-refine --model none \
        --out results/bench_index_auto.json                # auto at 1M against the target
    python tools/bench_index.py --quick --out /tmp/b.json  # seconds: tiny sizes, no model
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

# torch and faiss each bring their own OpenMP runtime; with the default active wait, one's idle threads
# spin while the other's work, and multi-threaded faiss runs slow down several times on a few cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from vlpretrain.retrieval.faiss_index import (  # noqa: E402
    KINDS, build_faiss_index, choose_kind, exact_search, factory_string, parse_memory, recall_at_k, tune_search_params)
from bench_index_measure import (  # noqa: E402
    PeakRSS, add_flat_ratios, collect_native_stderr, machine_info, set_threads, timed, torch_topk)

DEFAULT_MODEL = "runs/demo-emoji/final"
HNSW_FALLBACKS = ((32, 40), (16, 40), (16, 20))  # (M, efConstruction), tried in order when a build is too long
HNSW_SAMPLE = 20_000  # vectors built to estimate an HNSW build time before committing to a long one
HNSW_MEASURE_DIRECTLY = 200_000  # up to this size an HNSW build is simply done, not estimated first
SMALL_TRAIN = 10_000  # below this, IVF / PQ training has fewer points than faiss's k-means asks for
QUICK = {"sizes": "10000", "dim": 32, "queries": 64, "centres": 20,  # 10k: enough to train IVF256 / PQ
         "kinds": "flat,hnsw,ivfpq"}
FULL_KINDS = "flat,auto,ivfpq-refine,hnsw,ivfpq"
REAL_NOTE = ("small: the real demo embeddings are only a few thousand vectors, far below the sizes where an "
             "approximate index pays off; shown for recall on a real, two-modality distribution, not for speed")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- data

def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def mixture_centres(num_centres: int, dim: int, seed: int) -> np.ndarray:
    """Unit-norm centres of the synthetic Gaussian mixture.

    Example:
        >>> mixture_centres(1000, 256, seed=0).shape
        (1000, 256)
    """
    rng = np.random.default_rng([seed, 0])
    return _normalize(rng.standard_normal((num_centres, dim), dtype=np.float32))


def mixture_sample(centres: np.ndarray, n: int, spread: float, seed: list[int],
                   chunk: int = 100_000) -> np.ndarray:
    """``n`` unit vectors: a random centre plus isotropic noise of expected norm ``spread``, normalized.

    Generated in chunks in float32 so 1M x 256 needs no float64 copy.

    Example:
        >>> x = mixture_sample(mixture_centres(10, 8, 0), 100, spread=0.75, seed=[0, 1])
        >>> np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
        True
    """
    rng = np.random.default_rng(seed)
    num_centres, dim = centres.shape
    out = np.empty((n, dim), dtype=np.float32)
    scale = np.float32(spread / math.sqrt(dim))
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        block = centres[rng.integers(0, num_centres, stop - start)]
        block += scale * rng.standard_normal((stop - start, dim), dtype=np.float32)
        out[start:stop] = _normalize(block)
    return out


def real_embeddings(model_spec: str, batch_size: int, progress: bool) -> tuple[np.ndarray, np.ndarray, dict]:
    """Image and caption embeddings of ``emoji:all`` from a checkpoint (float32, unit norm).

    Example:
        >>> images, texts, info = real_embeddings("runs/demo-emoji/final", 256, progress=False)
    """
    from vlpretrain.config import DataConfig
    from vlpretrain.inference import encode_corpus
    from vlpretrain.models import load_model
    from vlpretrain.data.named import open_named_corpus

    model = load_model(model_spec)
    corpus = open_named_corpus("emoji:all", DataConfig())
    start = time.perf_counter()
    feats = encode_corpus(model, corpus, batch_size=batch_size, progress=progress)
    info = {"model": model_spec, "data": "emoji:all", "embed_dim": int(model.embed_dim),
            "bad_images": len(feats["bad_images"]), "encode_seconds": round(time.perf_counter() - start, 2)}
    return (np.ascontiguousarray(feats["image_features"].numpy(), dtype=np.float32),
            np.ascontiguousarray(feats["text_features"].numpy(), dtype=np.float32), info)


# ------------------------------------------------------------------------------------ measurements

# ------------------------------------------------------------------------------------------ HNSW plan

def _build_hnsw(vectors: np.ndarray, m: int, ef_construction: int, progress: bool):
    import faiss
    from tqdm.auto import tqdm

    index = faiss.index_factory(vectors.shape[1], f"HNSW{m},Flat", faiss.METRIC_INNER_PRODUCT)
    faiss.downcast_index(index).hnsw.efConstruction = ef_construction
    bar = tqdm(total=len(vectors), desc=f"adding to HNSW{m} (efConstruction {ef_construction})", unit="vec",
               disable=not progress)
    for start in range(0, len(vectors), 65_536):
        index.add(vectors[start:start + 65_536])
        bar.update(min(65_536, len(vectors) - start))
    bar.close()
    return index


def _default_ef_construction() -> int:
    import faiss

    return int(faiss.IndexHNSWFlat(8, 32).hnsw.efConstruction)


def _scale_hnsw_time(seconds: float, n_from: int, n_to: int) -> float:
    # Insertion cost grows about like log(n) per vector (graph depth), so n log n overall.
    return seconds * (n_to / n_from) * (math.log(n_to) / math.log(max(n_from, 2)))


def plan_hnsw(n: int, base: np.ndarray, measured: dict, limit_seconds: float) -> dict:
    """The first (M, efConstruction) of ``HNSW_FALLBACKS`` whose estimated build fits ``limit_seconds``.

    Estimates come from an earlier build of the same settings (``measured``: {(M, efC): (n, s)}) or
    from building a sample of ``HNSW_SAMPLE`` vectors; small sizes are not estimated at all.

    Example:
        >>> plan_hnsw(1_000_000, base, {(32, 40): (100_000, 60.0)}, 900)["M"]
        32
    """
    tried = []
    for m, ef in HNSW_FALLBACKS:
        if n <= HNSW_MEASURE_DIRECTLY:
            return {"M": m, "efConstruction": ef, "estimated_build_seconds": None, "tried": tried}
        if (m, ef) in measured:
            n0, seconds0 = measured[(m, ef)]
            source = f"scaled from the {n0:,}-vector build"
        else:
            sample = base[:min(HNSW_SAMPLE, len(base))]
            start = time.perf_counter()
            _build_hnsw(sample, m, ef, progress=False)
            n0, seconds0 = len(sample), time.perf_counter() - start
            source = f"scaled from a {n0:,}-vector sample build"
        estimate = _scale_hnsw_time(seconds0, n0, n)
        tried.append({"M": m, "efConstruction": ef, "estimated_build_seconds": round(estimate, 1), "from": source})
        if estimate <= limit_seconds:
            return {"M": m, "efConstruction": ef, "estimated_build_seconds": round(estimate, 1), "tried": tried}
    return {"M": None, "tried": tried}


# --------------------------------------------------------------------------------------- benchmark

def reference(base: np.ndarray, query_sets: dict, exact: dict, k: int, thread_counts: list[int]) -> dict:
    """Brute-force ``torch.topk`` queries/s and recall for every query set."""
    import torch

    base_t = torch.from_numpy(base)  # shares memory: brute force needs only the raw vectors
    out = {"method": "torch.topk", "description": "chunked matmul (32,768 base rows a chunk) + topk, merged",
           "build_seconds": 0.0, "index_bytes": int(base.nbytes), "query_sets": {}}
    for name, (queries, _) in query_sets.items():
        queries_t = torch.from_numpy(queries)
        entry = {"qps": {}, "seconds": {}}
        for threads in thread_counts:
            set_threads(threads)
            seconds, (_, ids) = timed(lambda: torch_topk(base_t, queries_t, k))
            entry["qps"][str(threads)] = round(len(queries) / seconds, 1)
            entry["seconds"][str(threads)] = round(seconds, 4)
        entry[f"recall@{k}"] = round(recall_at_k(ids, exact[name], k), 4)
        out["query_sets"][name] = entry
    return out


def bench_index(kind: str, base: np.ndarray, query_sets: dict, exact: dict, tune: tuple, ref: dict, args,
                hnsw_measured: dict, holdout: Optional[np.ndarray] = None) -> dict:
    """Build, size, tune and time one index kind over ``base``."""
    import faiss

    n, dim = base.shape
    budget = parse_memory(args.memory_budget)
    entry: dict = {"kind": kind}
    set_threads(args.threads)
    plan = None
    if kind == "auto":  # what `vlp index build --kind auto` would build for this size and budget
        kind = entry["chosen"] = choose_kind(n, dim, budget)
        if kind == "ivf-ondisk":
            entry["skipped"] = ("auto builds on disk here (the raw vectors exceed --memory-budget): measure it with "
                                "tools/bench_index_ondisk.py")
            return entry
    if kind == "hnsw":
        plan = plan_hnsw(n, base, hnsw_measured, args.hnsw_limit_minutes * 60)
        entry["hnsw_plan"] = plan
        if plan["M"] is None:
            entry["skipped"] = (f"every HNSW setting tried is estimated to build in more than "
                                f"{args.hnsw_limit_minutes:g} minutes on {args.threads} threads (--hnsw-limit-minutes)")
            return entry
        entry["factory"] = f"HNSW{plan['M']},Flat"
        entry["efConstruction"] = plan["efConstruction"]
        if plan["tried"] and (plan["M"], plan["efConstruction"]) != HNSW_FALLBACKS[0]:
            entry["note"] = (f"HNSW{HNSW_FALLBACKS[0][0]} (efConstruction {HNSW_FALLBACKS[0][1]}) was estimated at "
                             f"{plan['tried'][0]['estimated_build_seconds'] / 60:.1f} min, over the "
                             f"{args.hnsw_limit_minutes:g}-minute limit: built with M={plan['M']}, "
                             f"efConstruction={plan['efConstruction']} instead")
    else:
        entry["factory"] = factory_string(kind, n, dim, budget)
    log(f"  {kind}: building {entry['factory']} over {n:,} vectors ({args.threads} threads)")
    # At tiny sizes faiss's k-means warns once per sub-quantizer (too few training points): keep that in the JSON.
    quiet = kind in ("ivf", "ivfpq") and n < SMALL_TRAIN
    try:
        with collect_native_stderr(quiet) as warnings, PeakRSS() as peak:
            start = time.perf_counter()
            if kind == "hnsw" and (plan["M"], plan["efConstruction"]) != (32, _default_ef_construction()):
                index = _build_hnsw(base, plan["M"], plan["efConstruction"], progress=not args.no_progress)
            else:
                index = build_faiss_index(base, kind, memory_budget=budget, seed=args.seed,
                                          progress=not (args.no_progress or quiet), holdout=holdout,
                                          factory=entry["factory"])
            build_seconds = time.perf_counter() - start
    except ValueError as e:  # e.g. too few vectors to train IVF-PQ at this size
        entry["skipped"] = str(e)
        return entry
    if warnings:
        entry["faiss_warnings"] = warnings
    if kind == "hnsw":
        hnsw_measured[(plan["M"], plan["efConstruction"])] = (n, build_seconds)
    entry["build_seconds"] = round(build_seconds, 3)
    entry["rss_peak_delta_bytes"] = peak.delta
    entry["rss_method"] = peak.method
    entry["index_bytes"] = int(faiss.serialize_index(index).nbytes)
    entry["bytes_per_vector"] = round(entry["index_bytes"] / n, 1)
    entry["memory_ratio_vs_raw"] = round(entry["index_bytes"] / base.nbytes, 4)

    tune_queries, tune_exact = tune
    start = time.perf_counter()
    params, tune_recall = tune_search_params(index, base, tune_queries, k=args.k, target=args.target,
                                             exact_ids=tune_exact)
    entry["search_params"] = params
    entry[f"tune_recall@{args.k}"] = round(tune_recall, 4)
    entry["tune_seconds"] = round(time.perf_counter() - start, 2)
    entry["query_sets"] = {}
    for name, (queries, _) in query_sets.items():
        result = {"qps": {}, "qps_ratio_vs_torch_topk": {}}
        for threads in args.thread_counts:
            set_threads(threads)
            seconds, (_, ids) = timed(lambda: index.search(queries, args.k))
            qps = len(queries) / seconds
            result["qps"][str(threads)] = round(qps, 1)
            result["qps_ratio_vs_torch_topk"][str(threads)] = round(qps / ref["query_sets"][name]["qps"][str(threads)], 3)
        result[f"recall@{args.k}"] = round(recall_at_k(ids, exact[name], args.k), 4)
        entry["query_sets"][name] = result
    return entry


def run_dataset(name: str, base: np.ndarray, query_sets: dict, args, hnsw_measured: dict, extra: dict,
                holdout: Optional[np.ndarray] = None) -> dict:
    """Reference and every index kind on one base; ``query_sets``: {name: (eval queries, tune queries)}."""
    n, dim = base.shape
    log(f"[{name}] {n:,} x {dim}: exact ground truth, torch.topk reference")
    set_threads(args.threads)
    exact = {qname: exact_search(base, queries, args.k)[1] for qname, (queries, _) in query_sets.items()}
    # Tuning runs on queries never used for the reported recall, pooled over the query sets.
    tune_queries = np.concatenate([t for _, t in query_sets.values()])
    tune = (tune_queries, exact_search(base, tune_queries, args.k)[1])
    ref = reference(base, query_sets, exact, args.k, args.thread_counts)
    result = {"dataset": name, "n": n, "dim": dim, "k": args.k,
              "num_queries": {q: len(v[0]) for q, v in query_sets.items()},
              "num_tune_queries": len(tune_queries), **extra, "reference": ref, "indexes": []}
    for kind in args.kinds:
        result["indexes"].append(bench_index(kind, base, query_sets, exact, tune, ref, args, hnsw_measured, holdout))
        gc.collect()
    add_flat_ratios(result, args.target, args.speedup)
    return result


# ------------------------------------------------------------------------------------------- output

def table(results: list[dict], thread_counts: list[int], k: int) -> str:
    """A plain-text table: one line per (dataset, query set, method)."""
    tcols = [str(t) for t in thread_counts]
    w = max([len(f"{r['dataset']} n={r['n']:,}") for r in results] + [7]) + 2
    head = (f"{'dataset':<{w}}{'queries':<8}{'method':<22}{'build s':>9}{'MB':>9}{'RSS+MB':>9}{'params':>22}"
            f"{'R@' + str(k):>8}" + "".join(f"{'q/s ' + t + 't':>11}{'x torch':>9}" for t in tcols))
    lines = [head, "-" * len(head)]
    for r in results:
        label = f"{r['dataset']} n={r['n']:,}"
        for qname in r["num_queries"]:
            ref = r["reference"]["query_sets"][qname]
            lines.append(f"{label:<{w}}{qname:<8}{'torch.topk':<22}{0:>9.1f}{r['reference']['index_bytes'] / 1e6:>9.1f}"
                         f"{'-':>9}{'-':>22}{ref[f'recall@{k}']:>8.3f}"
                         + "".join(f"{ref['qps'][t]:>11.0f}{1:>9.2f}" for t in tcols))
            for e in r["indexes"]:
                name = e.get("factory", e["kind"])
                if "skipped" in e:
                    lines.append(f"{label:<{w}}{qname:<8}{name:<22} skipped: {e['skipped'][:80]}")
                    continue
                q = e["query_sets"][qname]
                params = ",".join(f"{a}={b}" for a, b in e["search_params"].items()) or "-"
                lines.append(f"{label:<{w}}{qname:<8}{name[:21]:<22}{e['build_seconds']:>9.1f}{e['index_bytes'] / 1e6:>9.1f}"
                             f"{e['rss_peak_delta_bytes'] / 1e6:>9.1f}{params:>22}{q[f'recall@{k}']:>8.3f}"
                             + "".join(f"{q['qps'][t]:>11.0f}{q['qps_ratio_vs_torch_topk'][t]:>9.2f}" for t in tcols))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- main

def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", default=None, help="synthetic base sizes, comma-separated (default 100000,1000000; "
                                                 f"--quick: {QUICK['sizes']})")
    p.add_argument("--kinds", default=None,
                   help=f"index kinds among auto, {', '.join(KINDS[:-1])} (default {FULL_KINDS}; --quick: {QUICK['kinds']})")
    p.add_argument("--speedup", type=float, default=10.0,
                   help="target: queries/s at least this many times exact search's, at recall@k >= --target")
    p.add_argument("--dim", type=int, default=None, help=f"synthetic dimension (default 256; --quick: {QUICK['dim']})")
    p.add_argument("--queries", type=int, default=None,
                   help=f"queries per batch, and as many separate tuning queries (default 1000; --quick: {QUICK['queries']})")
    p.add_argument("--centres", type=int, default=None, help="mixture centres (default 1000)")
    p.add_argument("--spread", type=float, default=0.75, help="expected norm of the noise around a unit centre")
    p.add_argument("--k", type=int, default=10, help="neighbours per query; recall@k")
    p.add_argument("--target", type=float, default=0.95, help="recall@k the tuning of nprobe / efSearch aims for")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for 'all threads' runs")
    p.add_argument("--memory-budget", default="4GB", help="memory budget given to factory_string (sizes IVF-PQ codes)")
    p.add_argument("--hnsw-limit-minutes", type=float, default=15.0,
                   help="an HNSW build estimated longer than this uses smaller M / efConstruction, or is skipped")
    p.add_argument("--model", default=None,
                   help=f"checkpoint for the real emoji embeddings (default: {DEFAULT_MODEL} if it exists; "
                        "--quick: none); 'none' skips them")
    p.add_argument("--batch-size", type=int, default=256, help="batch size for encoding the emoji corpus")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test (seconds)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--out", default="results/bench_index.json", help="JSON file to write")
    args = p.parse_args(argv)

    defaults = QUICK if args.quick else {"sizes": "100000,1000000", "dim": 256, "queries": 1000, "centres": 1000,
                                         "kinds": FULL_KINDS}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.sizes = sorted({int(s) for s in str(args.sizes).split(",") if s.strip()})
    except ValueError:
        p.error(f"--sizes must be comma-separated integers, got '{args.sizes}'")
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in args.kinds if k not in ("auto",) + KINDS[:-1]]
    if unknown:
        p.error(f"--kinds: unknown kind {', '.join(unknown)}; use auto, {', '.join(KINDS[:-1])} "
                f"(ivf-ondisk: tools/bench_index_ondisk.py)")
    for name in ("dim", "queries", "centres", "k", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if not args.sizes or min(args.sizes) <= args.k:
        p.error(f"--sizes must all be larger than --k ({args.k})")
    try:
        parse_memory(args.memory_budget)
    except ValueError as e:
        p.error(f"--memory-budget: {e}")
    if args.model is None:
        args.model = "none" if args.quick else (DEFAULT_MODEL if Path(DEFAULT_MODEL).is_dir() else "missing")
    args.thread_counts = sorted({1, args.threads})
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    wall = time.perf_counter()
    from vlpretrain.io import write_json

    report: dict = {
        "format": "vlpretrain-bench-index-v1",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(args.threads),
        "settings": {"sizes": args.sizes, "kinds": args.kinds, "dim": args.dim, "queries": args.queries, "k": args.k,
                     "target_recall": args.target, "target_speedup": args.speedup,
                     "memory_budget": args.memory_budget, "seed": args.seed,
                     "hnsw_limit_minutes": args.hnsw_limit_minutes, "thread_counts": args.thread_counts,
                     "quick": args.quick},
        "notes": [
            "build_seconds: train + add with all threads; the torch.topk reference needs no build (0 s) and holds "
            "the raw vectors (index_bytes = n * dim * 4)",
            "qps: one batch of all queries, best of up to 10 runs (until 1 s has passed); qps_ratio_vs_torch_topk = "
            "index qps / torch.topk qps at the same thread count; qps_ratio_vs_flat: over faiss flat's (exact); "
            "meets_target: recall@k >= target_recall at >= target_speedup x the faster exact search's qps",
            "auto: the kind `vlp index build --kind auto` picks for this size and memory budget (its 'chosen')",
            "recall@k: against exact inner-product search, on queries not used for tuning; search_params tuned "
            f"(tune_search_params, target {args.target}) on a separate, equally large set of queries",
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}: torch and faiss load separate OpenMP runtimes; "
            "with active waiting one's idle threads slow the other's multi-threaded runs several times",
            "index_bytes: len(faiss.serialize_index(index)); rss_peak_delta_bytes: growth of the process's peak "
            "resident set during the build (training temporaries included)",
        ],
        "results": [],
    }
    hnsw_measured: dict = {}

    centres = mixture_centres(args.centres, args.dim, args.seed)
    synthetic = {"centres": args.centres, "spread": args.spread,
                 "description": "Gaussian mixture: unit-norm random centres + isotropic noise of expected norm "
                                "`spread`, unit-normalized; queries drawn separately from the same mixture"}
    for n in args.sizes:
        log(f"generating {n:,} x {args.dim} mixture vectors")
        base = mixture_sample(centres, n, args.spread, [args.seed, n])
        queries = mixture_sample(centres, 2 * args.queries, args.spread, [args.seed, n, 1])
        sets = {"vectors": (queries[:args.queries], queries[args.queries:])}
        report["results"].append(run_dataset(f"synthetic-gmm{args.centres}", base, sets, args, hnsw_measured,
                                             {"synthetic": synthetic}))
        del base, queries, sets
        gc.collect()

    if args.model in ("none", "missing"):
        reason = ("skipped: --model none" if args.model == "none"
                  else f"skipped: {DEFAULT_MODEL} does not exist (train it with `vlp demo`, or pass --model)")
        log(f"real emoji embeddings {reason}")
        report["real"] = {"skipped": reason}
    else:
        log(f"encoding emoji:all with {args.model}")
        images, texts, info = real_embeddings(args.model, args.batch_size, not args.no_progress)
        rng = np.random.default_rng([args.seed, 2])
        sets, holdout = {}, None
        for qname, pool in (("text", texts), ("image", images)):
            order = rng.permutation(len(pool))
            q = min(args.queries, len(pool) // 2)  # half for the reported recall, half (disjoint) for tuning
            sets[qname] = (pool[order[:q]], pool[order[q:2 * q]])
            if qname == "image":
                holdout = order[:2 * q]  # image queries are index members: keep them out of IVF training
        info["note"] = REAL_NOTE
        info["small"] = True
        info["index"] = "image embeddings; queries: captions (text -> image) and images (image -> image)"
        report["results"].append(run_dataset("emoji-demo", images, sets, args, {}, {"real": info},
                                             holdout=holdout))
        report["real"] = info

    report["wall_seconds"] = round(time.perf_counter() - wall, 1)
    report["machine"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    text = table(report["results"], args.thread_counts, args.k)
    print(text)
    print(f"\nthreads: 1 and {args.threads} (of {os.cpu_count()} cores); wall time {report['wall_seconds']:.0f} s")
    print(f"written: {write_json(report, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
