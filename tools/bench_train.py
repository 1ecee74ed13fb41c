#!/usr/bin/env python
"""Training throughput and peak memory: ``vlp train`` against ``open_clip_train`` in one run.

Both trainers get the same open_clip architecture (written once as an ``open_clip_config.json``),
batch size, image size, thread count, precision, data-loader workers and synthetic data (one fixed
random pair, open_clip_train's ``--dataset-type synthetic``). Throughput is the global batch divided
by the mean step time over the logged intervals after the first (which holds warm-up), the median over
interleaved repeats; peak memory is the largest resident set of the process tree, sampled every 50 ms.

    python tools/bench_train.py --out results/bench_train.json

``--profile [STEPS]`` adds one more ``vlp train`` run (not timed) with ``train.profile_steps=STEPS`` (default 5,
after one warm-up step) and puts its ``profile.json`` in the results: seconds per step spent waiting for the
DataLoader (``data_wait``), in ``forward`` (model and loss), ``backward``, ``gather`` (collectives),
``optimizer`` (clip, step, schedule, EMA) and ``other`` (the rest of the loop), also printed as a table.

    python tools/bench_train.py --profile --out results/bench_train.json

``--effective-batch PAIRS`` replaces the open_clip_train comparison with large-batch training in small memory:
``vlp train`` at PAIRS pairs per optimizer step, as K micro-batches of PAIRS / K for each K of
``--micro-batches`` (``train.batch_size`` = PAIRS / K, ``train.accum_freq`` = K: the loss still sees all PAIRS
pairs), and with ``--grad-checkpointing`` the last K again with ``model.grad_checkpointing=true``. Each gets
pairs/s, peak RSS and PSS of the process tree (and on a GPU ``torch.cuda.max_memory_allocated`` when the
trainer logs it), side by side with ratios to the first configuration:

    python tools/bench_train.py --effective-batch 1024 --micro-batches 1,8 --grad-checkpointing --steps 10

``--flops`` also counts the model's training FLOPs per pair (forward and backward of both towers, counted once
on the CPU by torch's ``FlopCounterMode``; the loss's B x B logits are left out) and reports each trainer's
achieved TFLOP/s; in bf16 on a GPU named in ``PEAK_BF16_TFLOPS`` (or with ``--peak-tflops``) also its model
FLOPs utilization (MFU), the fraction of the card's dense bf16 peak:

    python tools/bench_train.py --device cuda --precision amp_bf16 --model-config ViT-B-32.json --flops
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
from typing import Optional

import psutil
import yaml

# ViT width 192 / 6 layers, patch 16 at 64 px; text width 192 / 4 layers: the size of ENVIRONMENT.md's
# speed reference, small enough for a 2-core machine.
DEFAULT_MODEL = {
    "embed_dim": 256,
    "vision_cfg": {"image_size": 64, "layers": 6, "width": 192, "patch_size": 16, "head_width": 64},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 192, "heads": 4, "layers": 4},
}
# Peak memory in a --effective-batch result: the process tree's RSS and PSS (a page shared by n processes
# counts 1/n in each, so a DataLoader worker's pages shared with the trainer count once), and on a GPU
# torch.cuda.max_memory_allocated as the trainer logs it in metrics.jsonl (GPU_MEMORY_FIELD), when it does.
GPU_MEMORY_FIELD = "max_memory_allocated_mib"
MEMORY_KEYS = ("peak_memory_mib", "peak_pss_mib", "gpu_peak_memory_mib")
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, for --flops' MFU; a card
# matches the longest name it contains ("NVIDIA H100 PCIe" is the PCIe card, "NVIDIA H100 80GB HBM3" the SXM).
PEAK_BF16_TFLOPS = {"H200": 989.4, "H200 NVL": 835.5, "H100": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.5,
                    "A100": 312.0, "L40S": 362.1, "L40": 181.0, "L4": 121.0, "A10G": 70.0}
_MEMORY_LABELS = {"peak_memory_mib": "RSS MiB", "peak_pss_mib": "PSS MiB", "gpu_peak_memory_mib": "GPU MiB"}


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


def bench_vlp(args, model_dir: Path, work: Path, env: dict, overrides: Optional[dict] = None, tag: str = "vlp",
              steps: Optional[int] = None) -> dict:
    """One ``vlp train`` run on synthetic pairs for ``steps`` optimizer steps (default ``--steps``), in ``work / tag``.
    ``overrides`` (dotted recipe keys: ``{"train.accum_freq": 8}``) go on its command line, so the results file
    shows them; ``train.batch_size`` (default ``--batch-size``) x ``train.accum_freq`` pairs make a step."""
    overrides, steps = {**({"train.compile": True} if args.compile else {}), **(overrides or {})}, steps or args.steps
    effective = overrides.get("train.batch_size", args.batch_size) * overrides.get("train.accum_freq", 1)
    recipe = {
        "model": {"arch": str(model_dir / "open_clip_config.json")},
        "data": {"train": f"synthetic:{effective * steps}", "num_workers": args.workers},
        "train": {"output_dir": str(work / tag), "epochs": 1, "batch_size": args.batch_size, "lr": 1e-4,
                  "warmup_steps": 2, "precision": {"fp32": "no", "amp_bf16": "bf16"}[args.precision],
                  "log_every": args.log_every, "threads": args.threads, "progress": False},
    }
    path = work / f"{tag}_recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cmd = [sys.executable, "-m", "vlpretrain.cli.main", "train", str(path),
           *(f"{key}={str(value).lower() if isinstance(value, bool) else value}" for key, value in overrides.items())]
    shutil.rmtree(work / tag, ignore_errors=True)
    measured = run_measured(cmd, env, work / f"{tag}.log", proportional=args.effective_batch is not None)
    records = [json.loads(line) for line in (work / tag / "metrics.jsonl").read_text().splitlines()]
    # samples_per_s is per logged interval; convert back to step time so both sides average alike.
    step_times = [effective / r["samples_per_s"] for r in records if "samples_per_s" in r][1:]
    result = {"pairs_per_s": throughput(step_times, effective), "peak_memory_mib": measured["peak_rss_mib"],
              "wall_s": measured["wall_s"], "intervals": len(step_times), "command": readable(cmd, work)}
    if "peak_pss_mib" in measured:
        result["peak_pss_mib"] = measured["peak_pss_mib"]
    gpu = [r[GPU_MEMORY_FIELD] for r in records if GPU_MEMORY_FIELD in r]
    if gpu:
        result["gpu_peak_memory_mib"] = max(gpu)
    return result


def bench_open_clip(args, model_dir: Path, work: Path, env: dict) -> dict:
    cmd = [sys.executable, "-m", "open_clip_train.main", "--dataset-type", "synthetic",
           "--train-num-samples", str(args.batch_size * args.steps), "--model", f"local-dir:{model_dir}",
           "--batch-size", str(args.batch_size), "--epochs", "1", "--lr", "1e-4", "--warmup", "2",
           "--workers", str(args.workers), "--device", args.device, "--precision", args.precision,
           "--log-every-n-steps", str(args.log_every), "--logs", str(work / "open_clip_logs"),
           "--name", "bench", "--save-frequency", "0", "--report-to", "", "--seed", "0",
           *(["--torchcompile"] if args.compile else [])]
    peak, wall = run(cmd, env, work / "open_clip.log")
    text = (work / "open_clip.log").read_text()
    # "Batch (t): 0.924" is the mean step time of the interval since the previous log line.
    step_times = [float(x) for x in re.findall(r"Batch \(t\): ([0-9.]+)", text)][1:]
    return {"pairs_per_s": throughput(step_times, args.batch_size), "peak_memory_mib": peak,
            "wall_s": wall, "intervals": len(step_times), "command": readable(cmd, work)}


def bench_profile(args, model_dir: Path, work: Path, env: dict, overrides: Optional[dict] = None) -> dict:
    """One more ``vlp train`` run with ``train.profile_steps=--profile``: its ``profile.json`` (seconds per step
    in data wait, forward, backward, gather, optimizer, other) and its command. Not timed: profiling slows it."""
    steps = max(args.steps, args.profile + 1)  # step 1 is warm-up, never profiled
    overrides = {**(overrides or {}), "train.profile_steps": args.profile}
    result = bench_vlp(args, model_dir, work, env, overrides, tag="vlp_profile", steps=steps)
    profile = json.loads((work / "vlp_profile" / "profile.json").read_text())
    profile.pop("trace", None)  # the trace stays in the temp folder
    return {**profile, "command": result["command"]}


def print_profile(title: str, profile: dict) -> None:
    """The profile as a table: seconds per step and share of the step for each phase."""
    print(f"{title}: {profile['steps']} profiled step(s), {profile['step_s']:.4f} s/step")
    print(f"  {'phase':<10} {'s/step':>9} {'share':>7}")
    for name, seconds in profile["phases_s"].items():
        print(f"  {name:<10} {seconds:9.4f} {profile['shares'][name]:7.1%}")


def effective_batch_configs(args) -> list[dict]:
    """The --effective-batch runs: one per --micro-batches count K (micro-batch effective / K, train.accum_freq
    K), then, with --grad-checkpointing, the last K again with model.grad_checkpointing=true."""
    configs = [{"name": f"{k}x{args.effective_batch // k}",
                "overrides": {"train.batch_size": args.effective_batch // k, "train.accum_freq": k}}
               for k in args.micro_batches]
    if args.grad_checkpointing:
        last = configs[-1]
        configs.append({"name": last["name"] + "+grad_checkpointing",
                        "overrides": {**last["overrides"], "model.grad_checkpointing": True}})
    return configs


def bench_effective_batch(args, model_dir: Path, work: Path, env: dict) -> dict:
    """The --effective-batch comparison: interleaved repeats of every configuration; the median pairs/s and the
    largest peak memory of each, and their ratios to the first (the whole batch at once)."""
    configs = effective_batch_configs(args)
    runs: dict[str, list[dict]] = {c["name"]: [] for c in configs}
    for repeat in range(args.repeats):
        for c in configs:
            print(f"run {repeat + 1}/{args.repeats}: {c['name']} ...", flush=True)
            runs[c["name"]].append(bench_vlp(args, model_dir, work, env, c["overrides"]))
            print(f"  {runs[c['name']][-1]['pairs_per_s']:.1f} pairs/s, peak "
                  f"{runs[c['name']][-1]['peak_memory_mib']:.0f} MiB", flush=True)
    results = {}
    for c in configs:
        rs = runs[c["name"]]
        results[c["name"]] = {"accum_freq": c["overrides"]["train.accum_freq"],
                              "micro_batch": c["overrides"]["train.batch_size"],
                              "grad_checkpointing": c["overrides"].get("model.grad_checkpointing", False),
                              "pairs_per_s": statistics.median(r["pairs_per_s"] for r in rs),
                              **{key: max(r[key] for r in rs) for key in MEMORY_KEYS if key in rs[0]},
                              "runs": rs}
        if args.profile:
            print(f"profiling {c['name']} ...", flush=True)
            results[c["name"]]["profile"] = bench_profile(args, model_dir, work, env, c["overrides"])
    base = results[configs[0]["name"]]
    ratios = {name: {"pairs_per_s": r["pairs_per_s"] / base["pairs_per_s"],
                     **{key: r[key] / base[key] for key in MEMORY_KEYS if key in r and key in base}}
              for name, r in results.items()}
    return {"baseline": configs[0]["name"], "results": results, "ratios_to_baseline": ratios}


def print_effective_batch(report: dict) -> None:
    """The --effective-batch results side by side: pairs/s and peak memory, each with its ratio to the baseline."""
    keys = [k for k in MEMORY_KEYS if all(k in r for r in report["results"].values())]
    header = f"{'configuration':<28} {'pairs/s':>9} {'ratio':>6}" + "".join(f" {_MEMORY_LABELS[k]:>9} {'ratio':>6}"
                                                                            for k in keys)
    print(f"effective batch {report['settings']['effective_batch']} (ratios to {report['baseline']}):")
    print(header)
    for name, r in report["results"].items():
        ratio = report["ratios_to_baseline"][name]
        print(f"{name:<28} {r['pairs_per_s']:9.1f} {ratio['pairs_per_s']:6.2f}"
              + "".join(f" {r[k]:9.0f} {ratio[k]:6.2f}" for k in keys))
    for name, r in report["results"].items():
        if "profile" in r:
            print_profile(f"profile of {name}", r["profile"])


def bench_against_open_clip(args, model_dir: Path, work: Path, env: dict) -> dict:
    """The default comparison: interleaved repeats of open_clip_train and vlp train; medians and ratios."""
    runs: dict[str, list[dict]] = {"open_clip_train": [], "vlp": []}
    # Interleaved repeats: a slow spell of the machine then hits both trainers alike.
    for repeat in range(args.repeats):
        for name, fn in (("open_clip_train", bench_open_clip), ("vlp", bench_vlp)):
            print(f"run {repeat + 1}/{args.repeats}: {name} ...", flush=True)
            shutil.rmtree(work / "open_clip_logs", ignore_errors=True)
            runs[name].append(fn(args, model_dir, work, env))
            print(f"  {runs[name][-1]['pairs_per_s']:.1f} pairs/s, peak {runs[name][-1]['peak_memory_mib']:.0f} MiB",
                  flush=True)
    results = {name: {"pairs_per_s": statistics.median(r["pairs_per_s"] for r in rs),
                      "peak_memory_mib": max(r["peak_memory_mib"] for r in rs),
                      "runs": rs} for name, rs in runs.items()}
    report = {"results": results,
              "ratio_pairs_per_s": results["vlp"]["pairs_per_s"] / results["open_clip_train"]["pairs_per_s"],
              "ratio_peak_memory": results["vlp"]["peak_memory_mib"] / results["open_clip_train"]["peak_memory_mib"]}
    if args.profile:
        print("profiling vlp ...", flush=True)
        report["profile"] = bench_profile(args, model_dir, work, env)
    return report


def training_flops_per_pair(model_cfg: dict, batch: int = 2) -> float:
    """FLOPs of one training step per image-text pair of the open_clip ``CLIP`` built from ``model_cfg``: the
    forward of both towers (``encode_image`` and ``encode_text``) and its backward, as torch's ``FlopCounterMode``
    counts them (matmuls, convolutions, attention) on ``batch`` pairs on the CPU, divided by ``batch``. The loss's
    B x B logits are not counted (under 0.1% at B = 256 for a ViT-B/32).

    Example: ``training_flops_per_pair(DEFAULT_MODEL) / 1e9``  (GFLOPs per pair)
    """
    import open_clip
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = open_clip.CLIP(**model_cfg)
    vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    images = torch.randn(batch, 3, vision["image_size"], vision["image_size"])
    tokens = torch.randint(0, text.get("vocab_size", 49408), (batch, text.get("context_length", 77)))
    # The math kernel of attention is made of matmuls the counter sees; a fused CPU kernel may not be counted.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        (model.encode_image(images).sum() + model.encode_text(tokens).sum()).backward()
    return counter.get_total_flops() / batch


def peak_bf16_tflops(device_name: str) -> Optional[float]:
    """The dense bf16 peak of the card whose name is the longest ``PEAK_BF16_TFLOPS`` key in ``device_name``.

    Example: ``peak_bf16_tflops("NVIDIA H100 PCIe")``  (756.0; None for a card not listed)
    """
    names = [name for name in PEAK_BF16_TFLOPS if name in device_name]
    return PEAK_BF16_TFLOPS[max(names, key=len)] if names else None


def add_flop_utilization(report: dict, flops_per_pair: float, peak_tflops: Optional[float]) -> None:
    """Adds ``training_flops_per_pair`` and ``peak_tflops`` to ``report`` and to each trainer's result its
    ``achieved_tflops`` (FLOPs per pair x pairs/s) and, with a known peak, ``model_flops_utilization``.

    Example: ``add_flop_utilization(report, training_flops_per_pair(cfg), peak_bf16_tflops(_gpu_name()))``
    """
    report["training_flops_per_pair"] = flops_per_pair
    report["peak_tflops"] = peak_tflops
    for result in report["results"].values():
        result["achieved_tflops"] = flops_per_pair * result["pairs_per_s"] / 1e12
        result["model_flops_utilization"] = (result["achieved_tflops"] / peak_tflops) if peak_tflops else None


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


def _micro_batches(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas (e.g. 1,8), got {text!r}")
    return counts


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-config", help="open_clip model config JSON (default: a ViT 192/6 at 64 px)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--precision", choices=["fp32", "amp_bf16"], default="fp32")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs of each trainer (median reported)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile both trainers (vlp: train.compile=true; open_clip_train: --torchcompile); "
                             "the first logged interval, which holds the compilation, is left out as always")
    parser.add_argument("--profile", type=int, nargs="?", const=5, default=0, metavar="STEPS",
                        help="also profile STEPS steps (default 5, after 1 warm-up step) of vlp train in one more "
                             "run per configuration (train.profile_steps): seconds per step in data wait, forward, "
                             "backward, gather, optimizer and other, in the JSON and printed")
    parser.add_argument("--effective-batch", type=int, metavar="PAIRS",
                        help="instead of the open_clip_train comparison: vlp train at this many pairs per optimizer "
                             "step, as each --micro-batches count K of micro-batches of PAIRS / K (train.accum_freq)")
    parser.add_argument("--micro-batches", type=_micro_batches, default=[1, 8], metavar="K,K,...",
                        help="with --effective-batch: the micro-batch counts to compare (default 1,8; the first is "
                             "the baseline of the ratios)")
    parser.add_argument("--grad-checkpointing", action="store_true",
                        help="with --effective-batch: also run the last --micro-batches count with "
                             "model.grad_checkpointing=true")
    parser.add_argument("--flops", action="store_true",
                        help="also count the model's training FLOPs per pair and report each trainer's achieved "
                             "TFLOP/s and, on a GPU of known peak, its model FLOPs utilization (MFU)")
    parser.add_argument("--peak-tflops", type=float, metavar="TFLOPS",
                        help="with --flops: the device's peak TFLOP/s for MFU (default with --precision amp_bf16: the "
                             "dense bf16 peak of a GPU named in PEAK_BF16_TFLOPS; none on a CPU)")
    parser.add_argument("--out", help="results JSON (default results/bench_train.json, or "
                                      "results/bench_train_effective_batch.json with --effective-batch)")
    args = parser.parse_args()
    if args.effective_batch is not None:
        bad = [k for k in args.micro_batches if args.effective_batch % k]
        if bad:
            parser.error(f"--effective-batch {args.effective_batch} is not a multiple of --micro-batches {bad[0]}")
        if args.flops:
            parser.error("--flops goes with the open_clip_train comparison, not --effective-batch")
    elif args.grad_checkpointing:
        parser.error("--grad-checkpointing needs --effective-batch")
    if args.peak_tflops is not None and not args.flops:
        parser.error("--peak-tflops needs --flops")
    default_out = "bench_train.json" if args.effective_batch is None else "bench_train_effective_batch.json"
    args.out = args.out or f"results/{default_out}"
    return args


def main() -> None:
    args = parse_args()
    model_cfg = json.loads(Path(args.model_config).read_text()) if args.model_config else DEFAULT_MODEL
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               **({"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {}))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = work / "model"
        model_dir.mkdir()
        (model_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
        compare = bench_against_open_clip if args.effective_batch is None else bench_effective_batch
        # Counted first: a model the counter cannot build fails before the (long) benchmark, not after it.
        flops = training_flops_per_pair(model_cfg) if args.flops else None
        measured = compare(args, model_dir, work, env)
    if args.flops:
        # The listed peaks are bf16's: an fp32 run has none unless given one.
        bf16_on_gpu = args.device == "cuda" and args.precision == "amp_bf16"
        add_flop_utilization(measured, flops, args.peak_tflops or (peak_bf16_tflops(_gpu_name()) if bf16_on_gpu
                                                                   else None))
    # Settings the mode did not use stay out of the results file.
    unused = {"out"} | ({"effective_batch", "micro_batches", "grad_checkpointing"} if args.effective_batch is None
                        else {"batch_size"})
    report = {
        "benchmark": "train_throughput" if args.effective_batch is None else "train_effective_batch",
        # An absolute --model-config (a file inside open_clip's install) is recorded by its name: no machine paths.
        "settings": {k: v for k, v in vars(args).items() if k not in unused} | {
            "model_config": args.model_config and (Path(args.model_config).name if Path(args.model_config).is_absolute()
                                                   else args.model_config),
            "model_cfg": model_cfg, "data": "synthetic"},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "gpu": _gpu_name() if args.device == "cuda" else None},
        **measured,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    if args.effective_batch is None:
        print(json.dumps({k: report[k] for k in ("ratio_pairs_per_s", "ratio_peak_memory")}, indent=2))
        if args.flops:
            print(f"training FLOPs per pair: {report['training_flops_per_pair'] / 1e9:.2f} G")
            for name, result in report["results"].items():
                mfu = result["model_flops_utilization"]
                print(f"  {name}: {result['achieved_tflops']:.3f} TFLOP/s"
                      + (f", MFU {100 * mfu:.1f}% of {report['peak_tflops']:g}" if mfu is not None else ""))
        if "profile" in report:
            print_profile("profile of vlp train", report["profile"])
    else:
        print_effective_batch(report)
    print(f"written: {out}")


if __name__ == "__main__":
    main()
