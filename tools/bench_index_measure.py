"""Measurement helpers of the index benchmarks: threads, best-of timing, native warnings, peak RSS, brute force.

Shared by ``tools/bench_index.py`` and ``tools/bench_index_ondisk.py``.

Example:
    >>> seconds, result = timed(lambda: index.search(queries, 10))
"""

from __future__ import annotations

import gc
import os
import platform
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np


def set_threads(threads: int) -> None:
    import faiss
    import torch

    faiss.omp_set_num_threads(threads)
    torch.set_num_threads(threads)


def timed(fn: Callable[[], Any], min_seconds: float = 1.0, max_runs: int = 10) -> tuple[float, Any]:
    """Best wall time of ``fn`` over runs until ``min_seconds`` have passed (at most ``max_runs``).

    Example:
        >>> seconds, result = timed(lambda: sum(range(1000)))
    """
    times, result = [], None
    while True:
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
        if sum(times) >= min_seconds or len(times) >= max_runs:
            return min(times), result


@contextmanager
def collect_native_stderr(enabled: bool = True) -> Iterator[list[str]]:
    """Collect what native code (faiss's k-means warnings) writes to file descriptor 2, as counted lines.

    Example:
        >>> with collect_native_stderr() as warnings:
        ...     index.train(few_vectors)
        >>> warnings  # ['64 x WARNING clustering 3775 points to 256 centroids: ...']
    """
    lines: list[str] = []
    if not enabled:
        yield lines
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield lines
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            counts = Counter(line.strip() for line in capture.read().decode(errors="replace").splitlines() if line.strip())
            lines.extend(f"{count} x {line}" for line, count in counts.items())


def _status_kb(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(match.group(1)) if match else 0


class PeakRSS:
    """Growth of the peak resident set (bytes) inside a ``with`` block.

    Resets the kernel's high-water mark (``/proc/self/clear_refs``) on entry, so the peak is that of
    the block; where that is not allowed, a thread samples the resident set every 10 ms instead.

    Example:
        >>> with PeakRSS() as peak:
        ...     x = np.ones(10_000_000)
        >>> peak.delta > 0
        True
    """

    def __init__(self) -> None:
        self.delta, self.method = 0, "VmHWM"
        self._stop, self._peak, self._thread = threading.Event(), 0, None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _status_kb("VmRSS"))
            time.sleep(0.01)

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        self._start = _status_kb("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS
        except OSError:
            self.method, self._peak = "sampled every 10 ms", self._start
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, _status_kb("VmRSS"))
        else:
            peak = _status_kb("VmHWM")
        self.delta = max(0, peak - self._start) * 1024


def torch_topk(base, queries, k: int, chunk: int = 32_768) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` inner products by brute force: matmul over chunks of ``base``, merged with topk.

    Example:
        >>> scores, ids = torch_topk(torch.from_numpy(base), torch.from_numpy(queries), 10)
    """
    import torch

    k = min(k, base.shape[0])
    best_scores = best_ids = None
    with torch.no_grad():
        for start in range(0, base.shape[0], chunk):
            scores = queries @ base[start:start + chunk].T
            values, ids = scores.topk(min(k, scores.shape[1]), dim=1)
            ids += start
            if best_scores is not None:
                values, ids = torch.cat([best_scores, values], 1), torch.cat([best_ids, ids], 1)
                values, order = values.topk(k, dim=1)
                ids = ids.gather(1, order)
            best_scores, best_ids = values, ids
    return best_scores.numpy(), best_ids.numpy()


def machine_info(threads: int) -> dict:
    import faiss
    import torch

    cpu = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M) \
        if Path("/proc/cpuinfo").exists() else None
    memory = _status_kb_meminfo()
    return {"cpu": cpu.group(1).strip() if cpu else platform.processor(), "cpu_count": os.cpu_count(),
            "threads_all": threads, "threads_single": 1, "memory_bytes": memory,
            "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
            "platform": platform.platform(), "python": platform.python_version(), "numpy": np.__version__,
            "torch": torch.__version__, "faiss": faiss.__version__, "faiss_compile": faiss.get_compile_options().strip()}


def _status_kb_meminfo() -> Optional[int]:
    path = Path("/proc/meminfo")
    if not path.exists():
        return None
    match = re.search(r"^MemTotal:\s+(\d+) kB", path.read_text(), re.M)
    return int(match.group(1)) * 1024 if match else None


def add_flat_ratios(result: dict, target: float, speedup: float) -> None:
    """queries/s of each index over faiss flat's (exact) at the same thread count, and whether it meets the
    target: recall@k >= ``target`` at >= ``speedup`` times exact search's queries/s (the faster of flat
    and torch.topk)."""
    flat = next((e for e in result["indexes"] if e["kind"] == "flat" and "skipped" not in e), None)
    for e in result["indexes"]:
        if "skipped" in e:
            continue
        for name, q in e["query_sets"].items():
            ref = result["reference"]["query_sets"][name]["qps"]
            exact = {t: max(v, flat["query_sets"][name]["qps"][t]) if flat else v for t, v in ref.items()}
            if flat:
                q["qps_ratio_vs_flat"] = {t: round(v / flat["query_sets"][name]["qps"][t], 3)
                                          for t, v in q["qps"].items()}
            q["meets_target"] = {t: bool(q[f"recall@{result['k']}"] >= target and v >= speedup * exact[t])
                                 for t, v in q["qps"].items()}  # the index is freed here, before the next kind is built
