"""The index benchmark: `tools/bench_index.py --quick` writes the JSON it promises, its numbers agree with
each other (rates with times, sizes with bytes, recall of exact search 1, tuned recall at the target) and the
printed table shows the same numbers."""

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
    settings = report["settings"]
    assert {k: settings[k] for k in ("sizes", "kinds", "dim", "queries", "k", "quick")} == {
        "sizes": [10_000], "kinds": ["flat", "hnsw", "ivfpq"], "dim": 32, "queries": 64, "k": 10, "quick": True}
    assert report["command"] == f"bench_index.py --quick --threads 2 --no-progress --out {out}"
    assert report["real"] == {"skipped": "skipped: --model none"}
    (result,) = report["results"]
    n, dim, k = result["n"], result["dim"], result["k"]
    assert (n, dim, k, result["num_queries"], result["num_tune_queries"]) == (10_000, 32, 10, {"vectors": 64}, 64)

    ref = result["reference"]["query_sets"]["vectors"]
    assert result["reference"]["index_bytes"] == n * dim * 4
    assert ref["recall@10"] == 1.0  # brute force agrees with exact search
    for threads in ("1", "2"):  # queries/s is the 64 queries over the time (stored rounded to 0.1 ms)
        seconds = ref["seconds"][threads]
        assert 64 / (seconds + 5e-5) <= ref["qps"][threads] <= 64 / max(seconds - 5e-5, 1e-9)
    lines = proc.stdout.splitlines()
    indexes = {e["kind"]: e for e in result["indexes"]}
    assert list(indexes) == ["flat", "hnsw", "ivfpq"]
    for kind, e in indexes.items():
        assert "skipped" not in e, e
        assert e["rss_method"] in ("VmHWM", "sampled every 10 ms")
        assert e["bytes_per_vector"] == round(e["index_bytes"] / n, 1)
        assert e["memory_ratio_vs_raw"] == round(e["index_bytes"] / (n * dim * 4), 4)
        q = e["query_sets"]["vectors"]
        for threads in ("1", "2"):
            assert q["qps_ratio_vs_torch_topk"][threads] == pytest.approx(q["qps"][threads] / ref["qps"][threads], rel=1e-2)
        assert 0 < q["recall@10"] <= 1 and 0 < e["tune_recall@10"] <= 1
        # The table row of this index shows its recall and its first queries/s.
        (row,) = [line for line in lines if f" {e['factory']} " in line]
        assert f" {q['recall@10']:.3f} " in row and f" {q['qps']['1']:.0f} " in row
    flat, hnsw, ivfpq = indexes["flat"], indexes["hnsw"], indexes["ivfpq"]
    assert flat["query_sets"]["vectors"]["recall@10"] == 1.0 and flat["search_params"] == {}
    assert flat["tune_recall@10"] == 1.0  # exact search is exact on the tuning queries too
    # HNSW reaches the target at 10,000 vectors: the tuner kept the first efSearch that does.
    assert hnsw["tune_recall@10"] >= settings["target_recall"] == 0.95
    assert n * dim * 4 <= flat["index_bytes"] < n * dim * 4 + 1024  # raw vectors plus a small header
    assert set(hnsw["search_params"]) == {"efSearch"} and hnsw["factory"] == "HNSW32,Flat"
    assert set(ivfpq["search_params"]) == {"nprobe"}
    assert ivfpq["factory"] == factory_string("ivfpq", n, dim, parse_memory(report["settings"]["memory_budget"]))
    assert ivfpq["index_bytes"] < flat["index_bytes"]  # compressed codes
