"""Smoke test of the index benchmark: `tools/bench_index.py --quick` runs and writes the JSON it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vlpretrain.retrieval.faiss_index import factory_string, parse_memory

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_benchmark_writes_results(tmp_path):
    out = tmp_path / "bench" / "bench_index.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_index.py"), "--quick", "--threads", "2",
                           "--no-progress", "--out", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"written: {out}" in proc.stdout and "torch.topk" in proc.stdout
    report = json.loads(out.read_text())
    assert report["format"] == "vlpretrain-bench-index-v1"
    assert report["machine"]["threads_all"] == 2 and report["settings"]["thread_counts"] == [1, 2]
    assert report["real"] == {"skipped": "skipped: --model none"}
    (result,) = report["results"]
    n, dim, k = result["n"], result["dim"], result["k"]
    assert (n, dim, k, result["num_queries"], result["num_tune_queries"]) == (10_000, 32, 10, {"vectors": 64}, 64)

    ref = result["reference"]["query_sets"]["vectors"]
    assert result["reference"]["index_bytes"] == n * dim * 4
    assert ref["recall@10"] == 1.0  # brute force agrees with exact search
    indexes = {e["kind"]: e for e in result["indexes"]}
    assert list(indexes) == ["flat", "hnsw", "ivfpq"]
    for kind, e in indexes.items():
        assert "skipped" not in e, e
        assert e["build_seconds"] >= 0 and e["rss_peak_delta_bytes"] >= 0
        q = e["query_sets"]["vectors"]
        for threads in ("1", "2"):
            assert q["qps_ratio_vs_torch_topk"][threads] == pytest.approx(q["qps"][threads] / ref["qps"][threads], rel=1e-2)
        assert 0 <= q["recall@10"] <= 1
    flat, hnsw, ivfpq = indexes["flat"], indexes["hnsw"], indexes["ivfpq"]
    assert flat["query_sets"]["vectors"]["recall@10"] == 1.0 and flat["search_params"] == {}
    assert n * dim * 4 <= flat["index_bytes"] < n * dim * 4 + 1024  # raw vectors plus a small header
    assert set(hnsw["search_params"]) == {"efSearch"} and hnsw["factory"] == "HNSW32,Flat"
    assert set(ivfpq["search_params"]) == {"nprobe"}
    assert ivfpq["factory"] == factory_string("ivfpq", n, dim, parse_memory(report["settings"]["memory_budget"]))
    assert ivfpq["index_bytes"] < flat["index_bytes"]  # compressed codes
