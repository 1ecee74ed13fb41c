#!/usr/bin/env python
"""Training throughput and peak memory: ``vlp train`` against ``open_clip_train`` in one run.

Both trainers get the same open_clip architecture (written once as an ``open_clip_config.json``),
batch size, image size, thread count, precision, data-loader workers and synthetic data (one fixed
random pair, open_clip_train's ``--dataset-type synthetic``). Throughput is the global batch divided
by the mean step time over the logged intervals after the first (which holds warm-up), the median over
interleaved repeats; peak memory is the largest resident set of the process tree, sampled every 50 ms.

    python tools/bench_train.py --out results/bench_train.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

# ViT width 192 / 6 layers, patch 16 at 64 px; text width 192 / 4 layers: the size of ENVIRONMENT.md's
# speed reference, small enough for a 2-core machine.
DEFAULT_MODEL = {
    "embed_dim": 256,
    "vision_cfg": {"image_size": 64, "layers": 6, "width": 192, "patch_size": 16, "head_width": 64},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 192, "heads": 4, "layers": 4},
}


class PeakMemory:
    """Largest RSS (MiB) of a process and its children while it runs; with ``proportional``, also the largest
    sum of their PSS (``peak_pss``: a page shared by n processes counts 1/n in each), which does not count
    twice the pages a forked DataLoader worker shares with its parent."""

    def __init__(self, pid: int, proportional: bool = False):
        self.process, self.peak, self.peak_pss, self._stop = psutil.Process(pid), 0.0, 0.0, threading.Event()
        self.proportional = proportional
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.process, *self.process.children(recursive=True)]
                info = [p.memory_full_info() if self.proportional else p.memory_info()
                        for p in procs if p.is_running()]
                self.peak = max(self.peak, sum(m.rss for m in info) / 2**20)
                if self.proportional:
                    self.peak_pss = max(self.peak_pss, sum(m.pss for m in info) / 2**20)
            except psutil.Error:
                pass
            time.sleep(0.05)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


def run(cmd: list[str], env: dict, log_path: Path) -> tuple[float, float]:
    """Run ``cmd`` (output to ``log_path``); returns its peak RSS (MiB) and wall seconds, or raises with the
    log's tail when it fails."""
    measured = run_measured(cmd, env, log_path)
    return measured["peak_rss_mib"], measured["wall_s"]


def run_measured(cmd: list[str], env: dict, log_path: Path, proportional: bool = False) -> dict:
    """:func:`run`, returning ``peak_rss_mib``, ``wall_s`` and, with ``proportional``, ``peak_pss_mib``."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        memory = PeakMemory(proc.pid, proportional)
        code = proc.wait()
        memory.stop()
    if code != 0:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed with exit code {code}:\n{tail}")
    return {"peak_rss_mib": memory.peak, **({"peak_pss_mib": memory.peak_pss} if proportional else {}),
            "wall_s": time.perf_counter() - start}


def readable(cmd: list[str], work: Path) -> str:
    """A command as a results file records it: ``python`` and ``WORK`` (the temp folder), no machine paths."""
    return " ".join(["python"] + cmd[1:]).replace(str(work), "WORK")


def throughput(step_times: list[float], global_batch: int) -> float:
    if not step_times:
        raise RuntimeError("no step times logged after warm-up: raise --steps")
    return global_batch / statistics.mean(step_times)


def bench_vlp(args, model_dir: Path, work: Path, env: dict) -> dict:
    recipe = {
        "model": {"arch": str(model_dir / "open_clip_config.json")},
        "data": {"train": f"synthetic:{args.batch_size * args.steps}", "num_workers": args.workers},
        "train": {"output_dir": str(work / "vlp"), "epochs": 1, "batch_size": args.batch_size, "lr": 1e-4,
                  "warmup_steps": 2, "precision": {"fp32": "no", "amp_bf16": "bf16"}[args.precision],
                  "log_every": args.log_every, "threads": args.threads, "progress": False},
    }
    path = work / "vlp_recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cmd = [sys.executable, "-m", "vlpretrain.cli.main", "train", str(path)]
    peak, wall = run(cmd, env, work / "vlp.log")
    records = [json.loads(line) for line in (work / "vlp" / "metrics.jsonl").read_text().splitlines()]
    # samples_per_s is per logged interval; convert back to step time so both sides average alike.
    step_times = [args.batch_size / r["samples_per_s"] for r in records if "samples_per_s" in r][1:]
    return {"pairs_per_s": throughput(step_times, args.batch_size), "peak_memory_mib": peak,
            "wall_s": wall, "intervals": len(step_times), "command": readable(cmd, work)}


def bench_open_clip(args, model_dir: Path, work: Path, env: dict) -> dict:
    cmd = [sys.executable, "-m", "open_clip_train.main", "--dataset-type", "synthetic",
           "--train-num-samples", str(args.batch_size * args.steps), "--model", f"local-dir:{model_dir}",
           "--batch-size", str(args.batch_size), "--epochs", "1", "--lr", "1e-4", "--warmup", "2",
           "--workers", str(args.workers), "--device", args.device, "--precision", args.precision,
           "--log-every-n-steps", str(args.log_every), "--logs", str(work / "open_clip_logs"),
           "--name", "bench", "--save-frequency", "0", "--report-to", "", "--seed", "0"]
    peak, wall = run(cmd, env, work / "open_clip.log")
    text = (work / "open_clip.log").read_text()
    # "Batch (t): 0.924" is the mean step time of the interval since the previous log line.
    step_times = [float(x) for x in re.findall(r"Batch \(t\): ([0-9.]+)", text)][1:]
    return {"pairs_per_s": throughput(step_times, args.batch_size), "peak_memory_mib": peak,
            "wall_s": wall, "intervals": len(step_times), "command": readable(cmd, work)}


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-config", help="open_clip model config JSON (default: a ViT 192/6 at 64 px)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--precision", choices=["fp32", "amp_bf16"], default="fp32")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs of each trainer (median reported)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", default="results/bench_train.json")
    args = parser.parse_args()

    model_cfg = json.loads(Path(args.model_config).read_text()) if args.model_config else DEFAULT_MODEL
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               **({"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {}))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = work / "model"
        model_dir.mkdir()
        (model_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
        runs: dict[str, list[dict]] = {"open_clip_train": [], "vlp": []}
        # Interleaved repeats: a slow spell of the machine then hits both trainers alike.
        for repeat in range(args.repeats):
            for name, fn in (("open_clip_train", bench_open_clip), ("vlp", bench_vlp)):
                print(f"run {repeat + 1}/{args.repeats}: {name} ...", flush=True)
                shutil.rmtree(work / "vlp", ignore_errors=True)
                shutil.rmtree(work / "open_clip_logs", ignore_errors=True)
                runs[name].append(fn(args, model_dir, work, env))
                print(f"  {runs[name][-1]['pairs_per_s']:.1f} pairs/s, peak {runs[name][-1]['peak_memory_mib']:.0f} MiB",
                      flush=True)
        results = {name: {"pairs_per_s": statistics.median(r["pairs_per_s"] for r in rs),
                          "peak_memory_mib": max(r["peak_memory_mib"] for r in rs),
                          "runs": rs} for name, rs in runs.items()}
    report = {
        "benchmark": "train_throughput",
        "settings": {k: v for k, v in vars(args).items() if k != "out"} | {"model_cfg": model_cfg, "data": "synthetic"},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "gpu": _gpu_name() if args.device == "cuda" else None},
        "results": results,
        "ratio_pairs_per_s": results["vlp"]["pairs_per_s"] / results["open_clip_train"]["pairs_per_s"],
        "ratio_peak_memory": results["vlp"]["peak_memory_mib"] / results["open_clip_train"]["peak_memory_mib"],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("ratio_pairs_per_s", "ratio_peak_memory")}, indent=2))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
