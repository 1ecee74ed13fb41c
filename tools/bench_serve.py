#!/usr/bin/env python
"""Serving benchmark: queries/s and p50 / p99 latency of text queries against a real `vlp index serve`.

The server runs in its own process on a free 127.0.0.1 port (never another address); ``--clients``
threads each send one text query at a time (POST /search, k=10) for ``--seconds`` (30 at most), after a
short untimed warm-up. Every query text is distinct (a phrase and a number), so a model's text cache
never answers for the encoder. Concurrent queries are embedded together by the server's micro-batcher.

``--generate N`` first builds (once; reused after) an index of N generated vectors signed by INDEX's
model, and benchmarks that one: unit vectors drawn around INDEX's own vectors (a seeded Gaussian
mixture), written as an embedding folder and built by `RetrievalIndex.build` (``--kind``, default
auto: IVF-SQ8 at 1M vectors). Building 1M vectors takes minutes on a few cores; the benchmark itself is
bounded by ``--seconds``. Results are merged into ``--out`` under a label per index.

    python tools/bench_serve.py runs/demo-emoji/index                          # the demo index
    python tools/bench_serve.py runs/demo-emoji/index --generate 1000000       # a 1M-vector index
    python tools/bench_serve.py runs/demo-emoji/index --clients 4 --seconds 5 --out /tmp/b.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MAX_SECONDS = 30.0
PHRASES = ("a smiling cat", "a red heart", "a frog", "the flag of france", "a waving hand", "a birthday cake",
           "a rocket", "a sad face", "a green tree", "a yellow star", "a cup of coffee", "a dog face")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def shown(path: Any) -> str:
    """A path as results files show it: relative to the repository, else its name (no machine paths)."""
    text = str(path)
    if not text or ":" in text.split("/")[0]:
        return text  # a spec such as open_clip:ViT-B-32/openai
    prefix = ""
    for p in ("hf:", "local-dir:"):
        if text.startswith(p):
            prefix, text = p, text[len(p):]
    full = Path(text).resolve()
    try:
        return prefix + str(full.relative_to(REPO))
    except ValueError:
        return prefix + full.name


# ---------------------------------------------------------------------------------------------- index

def generate_index(source: Path, n: int, out: Path, kind: str, memory_budget: str, seed: int = 0) -> Path:
    """Build (once) an index of ``n`` generated vectors near ``source``'s vectors, signed by its model."""
    import pandas as pd

    from vlpretrain.io import write_json
    from vlpretrain.retrieval import RetrievalIndex
    from vlpretrain.retrieval.index_files import read_info

    if (out / "info.json").is_file() and int(read_info(out).get("ntotal", -1)) == n:
        log(f"reusing {out} ({n} vectors)")
        return out
    index = RetrievalIndex.load(source)
    try:
        centres = index.index.reconstruct_n(0, min(index.ntotal, 100_000))
    except RuntimeError:  # an index that does not store its vectors: centres of its own dimension instead
        centres = np.random.default_rng([seed, 1]).standard_normal((1000, index.dim)).astype(np.float32)
    centres /= np.maximum(np.linalg.norm(centres, axis=1, keepdims=True), 1e-12)
    emb = out.with_name(out.name + ".embeddings")
    shard_size = 100_000
    num_shards = -(-n // shard_size)
    for folder in ("image", "meta"):
        (emb / folder).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(num_shards):  # shard by shard: memory stays at one shard
        rows = np.arange(k * shard_size, min((k + 1) * shard_size, n))
        x = centres[rng.integers(0, len(centres), len(rows))] + 0.35 * rng.standard_normal(
            (len(rows), index.dim)).astype(np.float32) / np.sqrt(index.dim)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        np.save(emb / "image" / f"{k:06d}.npy", x.astype(np.float16))
        pd.DataFrame({"row": rows.astype(np.int64), "image": [""] * len(rows),
                      "captions": [[f"generated vector {r}"] for r in rows], "ok": np.ones(len(rows), bool)}
                     ).to_parquet(emb / "meta" / f"{k:06d}.parquet", index=False)
    write_json({"format": "vlpretrain-embeddings-v1", "signature": index.info["signature"], "dim": index.dim,
                "dtype": "float16", "normalized": True, "modalities": ["image"], "shard_size": shard_size,
                "num_shards": num_shards, "counts": {"rows": n, "image": n, "text": 0, "bad_images": 0},
                "data": f"generated near {shown(source)}", "created": datetime.now(timezone.utc).isoformat()},
               emb / "manifest.json")
    log(f"building a {kind} index of {n} generated vectors into {out} (minutes at 1M)")
    RetrievalIndex.build(emb, out, kind=kind, memory_budget=memory_budget, seed=seed)
    return out


# ---------------------------------------------------------------------------------------------- server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index: Path, port: int, max_k: int) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"), TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen([sys.executable, "-m", "vlpretrain.cli.main", "index", "serve", f"bench={index}",
                             "--host", "127.0.0.1", "--port", str(port), "--max-k", str(max_k), "--log-level",
                             "warning"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_until_up(proc: subprocess.Popen, base: str, timeout: float = 600.0) -> float:
    import httpx

    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited (code {proc.returncode}):\n{proc.stdout.read()}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return time.perf_counter() - start
        except httpx.TransportError:
            time.sleep(0.2)
    raise SystemExit(f"the server did not answer /health within {timeout:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    import signal

    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------------------------------- load

def run_clients(base: str, clients: int, seconds: float, k: int) -> dict[str, Any]:
    """``clients`` threads, each one query at a time until the deadline; latencies of the answered ones."""
    import httpx

    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    start_line = threading.Barrier(clients + 1)
    deadline = [0.0]

    def client(i: int) -> None:
        with httpx.Client(base_url=base, timeout=60) as c:
            start_line.wait()
            n = 0
            while time.perf_counter() < deadline[0]:
                text = f"{PHRASES[(i + n) % len(PHRASES)]} number {i * 1_000_000 + n}"
                t = time.perf_counter()
                r = c.post("/search", json={"text": text, "k": k})
                if r.status_code == 200 and len(r.json()["hits"]) > 0:
                    latencies[i].append(time.perf_counter() - t)
                else:
                    errors[i] += 1
                n += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    deadline[0] = time.perf_counter() + seconds
    begin = time.perf_counter()
    start_line.wait()
    for t in threads:
        t.join(timeout=seconds + 120)
    elapsed = time.perf_counter() - begin
    ms = np.array([x for per in latencies for x in per]) * 1000
    if not len(ms):
        raise SystemExit(f"no query was answered ({sum(errors)} errors)")
    return {"queries": int(len(ms)), "errors": int(sum(errors)), "elapsed_s": round(elapsed, 2),
            "queries_per_s": round(len(ms) / elapsed, 1),
            "latency_ms": {name: round(float(v), 2) for name, v in (
                ("p50", np.percentile(ms, 50)), ("p90", np.percentile(ms, 90)), ("p99", np.percentile(ms, 99)),
                ("mean", ms.mean()), ("max", ms.max()))}}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("index", type=Path, help="index folder (e.g. runs/demo-emoji/index)")
    parser.add_argument("--generate", type=int, default=None, metavar="N",
                        help="benchmark an index of N generated vectors near INDEX's (built once)")
    parser.add_argument("--generated-dir", type=Path, default=Path("runs/bench_serve"),
                        help="where --generate builds its index (default: runs/bench_serve)")
    parser.add_argument("--kind", default="auto", help="index kind of --generate (default: auto)")
    parser.add_argument("--memory-budget", default="4GB", help="memory budget of --generate (default: 4GB)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default: 8)")
    parser.add_argument("--seconds", type=float, default=20.0, help=f"measured seconds, at most {MAX_SECONDS:.0f} (default: 20)")
    parser.add_argument("-k", type=int, default=10, help="hits per query (default: 10)")
    parser.add_argument("--label", default=None, help="name of this run in --out (default: from the index)")
    parser.add_argument("--out", type=Path, default=Path("results/bench_serve.json"))
    args = parser.parse_args(argv)
    if not 0 < args.seconds <= MAX_SECONDS:
        parser.error(f"--seconds must be in (0, {MAX_SECONDS:.0f}]")
    if args.clients < 1:
        parser.error("--clients must be at least 1")

    from vlpretrain.io import read_json, write_json
    from vlpretrain.retrieval.index_files import read_info

    index = args.index
    if args.generate:
        index = generate_index(args.index, args.generate, args.generated_dir / f"generated-{args.generate}",
                               args.kind, args.memory_budget)
    info = read_info(index)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(index, port, max(args.k, 10))
    try:
        startup = wait_until_up(proc, base)
        log(f"server up in {startup:.1f} s; warming up")
        run_clients(base, 1, 2.0, args.k)  # untimed: first forward passes, page cache
        log(f"{args.clients} clients for {args.seconds:.0f} s")
        result = run_clients(base, args.clients, args.seconds, args.k)
    finally:
        stop_server(proc)
    label = args.label or (f"generated-{args.generate}" if args.generate else shown(args.index))
    record = {
        "command": "python tools/bench_serve.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "index": shown(index), "kind": info.get("kind"), "factory": info.get("factory"), "ntotal": info.get("ntotal"),
        "dim": info.get("dim"), "search_params": info.get("search_params"), "recall@10": info.get("recall@10"),
        "model": shown((info.get("signature") or {}).get("model") or ""), "clients": args.clients,
        "seconds": args.seconds, "k": args.k, "server": "vlp index serve: uvicorn, one process, text queries micro-batched",
        "server_startup_s": round(startup, 1), **result,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    previous = read_json(args.out) if args.out.is_file() else {}
    runs = dict(previous.get("runs", {}), **{label: record})
    write_json({"tool": "tools/bench_serve.py", "runs": runs}, args.out)
    print(json.dumps({label: {k: record[k] for k in ("ntotal", "kind", "clients", "queries_per_s", "latency_ms")}},
                     indent=2))
    log(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
