"""Where a training step's time goes: ``train.profile_steps: N`` runs torch.profiler over N optimizer steps.

The first step of a run holds the warm-up (allocator, lazy init, the first batches), so the profile covers
steps 2 .. N + 1. The main process then writes, in the run folder:

- ``profile.json``: seconds per step in each phase (``data_wait``: blocked on the DataLoader; ``forward``
  (model and loss); ``backward``; ``gather``: collectives such as the loss's all-gather and DDP's
  all-reduce; ``optimizer``: clip, step, schedule, EMA; ``other``: the rest of the loop, logging and
  checkpoints included), their shares, and the ops with the most self time;
- ``profile_trace.json``: the Chrome trace (open it in https://ui.perfetto.dev or chrome://tracing).

The trainer marks its phases with :func:`phase` (a ``record_function`` range named ``vlp/<phase>``). When
no profiler runs, :func:`phase` returns a do-nothing context (a ~0.1 us check), so marks cost nothing in
ordinary runs. On a GPU, a profiled phase synchronizes at its edges, so kernels count in the phase that
queued them rather than in the next one that waits.

Example:
    >>> profiler = StepProfiler(steps=5, output_dir=Path("runs/demo"), enabled=accelerator.is_main_process)
    >>> for batch in timed_batches(loader):
    ...     with phase("forward"): out = model(batch)
    ...     profiler.step_done()
    >>> profiler.close()
"""

from __future__ import annotations

import logging
import re
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import ContextManager, Iterable, Iterator, Optional, TypeVar

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from ..io import atomic_write, write_json

logger = logging.getLogger("vlpretrain.train")

PHASES = ("data_wait", "forward", "backward", "gather", "optimizer")
LABEL = "vlp/"
# Collectives as the profiler names them: c10d:: / _c10d_functional:: ops, backends' own ranges
# (gloo:all_gather, nccl:all_reduce) and the communication record of DDP.
_COLLECTIVE = re.compile(r"^(c10d::|_?c10d_functional::|gloo:|nccl:|record_param_comms)|all_gather|allgather|"
                         r"all_reduce|allreduce|reduce_scatter")
_TOP_OPS = 15
T = TypeVar("T")


def phase(name: str) -> ContextManager:
    """A ``vlp/<name>`` range in a running profiler's trace; a no-op when none runs.

    Example: ``with phase("backward"): accelerator.backward(loss)``
    """
    if not torch.autograd._profiler_enabled():
        return nullcontext()
    return _profiled_phase(name)


@contextmanager
def _profiled_phase(name: str) -> Iterator[None]:
    _sync()
    with record_function(LABEL + name):
        yield
        _sync()


def _sync() -> None:
    # Only a GPU run has queued work to wait for; is_initialized() keeps CPU runs from starting CUDA.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed_batches(batches: Iterable[T]) -> Iterator[T]:
    """``batches``, each ``next()`` inside a ``data_wait`` phase (the time the loop waits for data).

    Example: ``for batch in timed_batches(run.epoch_loader(epoch, skip)): ...``
    """
    iterator = iter(batches)
    while True:
        with phase("data_wait"):
            try:
                batch = next(iterator)
            except StopIteration:
                return
        yield batch


class StepProfiler:
    """Profiles optimizer steps 2 .. ``steps`` + 1 of a run (the first is warm-up) and writes ``profile.json``
    and ``profile_trace.json`` into ``output_dir``. Inert when ``steps`` is 0 or ``enabled`` is false (the
    trainer enables it on the main process only).

    Example:
        >>> profiler = StepProfiler(steps=5, output_dir=Path("runs/demo"))
        >>> ...  # profiler.step_done() after each optimizer step
        >>> profiler.close()  # at the end of the run: writes what was profiled if the run stopped early
    """

    def __init__(self, steps: int, output_dir: Path, enabled: bool = True, warmup_steps: int = 1):
        self.steps, self.output_dir, self.warmup_steps = (steps if enabled else 0), Path(output_dir), warmup_steps
        self.done, self.profiled = 0, 0
        self.profiler: Optional[profile] = None
        self.start_s = 0.0

    def step_done(self) -> None:
        """Count one optimizer step: start the profiler after the warm-up, stop and write after ``steps``."""
        if not self.steps:
            return
        self.done += 1
        if self.profiler is not None:
            self.profiled += 1
            if self.profiled == self.steps:
                self._finish()
        elif self.done == self.warmup_steps and self.profiled == 0:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.profiler = profile(activities=activities)
            self.profiler.start()
            self.start_s = time.perf_counter()

    def close(self) -> None:
        """End of the run: if it stopped before ``steps`` profiled steps, write those it has (or warn)."""
        if self.profiler is not None and self.profiled:
            logger.warning("train.profile_steps=%d: the run ended after %d profiled steps; profile.json "
                           "covers those", self.steps, self.profiled)
            self._finish()
            return
        if self.profiler is not None:
            self.profiler.stop()
            self.profiler = None
        if self.steps:
            logger.warning("train.profile_steps=%d: the run ended before a step could be profiled (the first "
                           "step is warm-up and not profiled); no profile.json", self.steps)

    def _finish(self) -> None:
        window_s = time.perf_counter() - self.start_s
        prof, self.profiler = self.profiler, None
        prof.stop()
        cuda = any(a == ProfilerActivity.CUDA for a in prof.activities)
        report = breakdown(prof.events(), self.profiled, window_s)
        report.update(first_step=self.warmup_steps + 1, activities=["cpu"] + (["cuda"] if cuda else []),
                      top_ops=top_ops(prof, self.profiled, cuda), trace="profile_trace.json")
        atomic_write(self.output_dir / "profile_trace.json", lambda tmp: prof.export_chrome_trace(str(tmp)))
        write_json(report, self.output_dir / "profile.json")
        logger.info("profiled %d steps (%.4f s/step): %s; written to %s", self.profiled, report["step_s"],
                    ", ".join(f"{k} {v:.4f} s" for k, v in report["phases_s"].items()),
                    self.output_dir / "profile.json")
        self.steps = 0  # done: later steps are not profiled


def breakdown(events: Iterable, steps: int, window_s: float) -> dict:
    """Seconds per step in each phase, from a profiler's events over ``steps`` steps lasting ``window_s``.

    Each instant of the loop's thread counts once, for the innermost range that holds it (a collective
    inside ``vlp/forward`` counts as ``gather``, not as forward); ``other`` is the window's remainder.

    Example:
        >>> breakdown(prof.events(), steps=5, window_s=2.0)["phases_s"]["forward"]
        0.121
    """
    ranges = []  # (start_us, end_us, phase) of our ranges and the collectives, on the loop's thread
    cpu = torch.autograd.DeviceType.CPU  # device (kernel) events run on streams, not on the loop's thread
    events = [e for e in events if not getattr(e, "is_async", False) and getattr(e, "device_type", cpu) == cpu]
    threads = {e.thread for e in events if e.name.startswith(LABEL)}
    for e in events:
        if e.thread not in threads:
            continue
        name = e.name[len(LABEL):] if e.name.startswith(LABEL) else ("gather" if _COLLECTIVE.search(e.name) else None)
        if name in PHASES:
            ranges.append((e.time_range.start, e.time_range.end, name))
    totals = dict.fromkeys(PHASES, 0.0)
    for name, seconds in _self_times(ranges):
        totals[name] += seconds
    per_step = {k: v / steps for k, v in totals.items()}
    step_s = window_s / steps
    per_step["other"] = max(step_s - sum(per_step.values()), 0.0)
    return {"steps": steps, "step_s": step_s, "phases_s": per_step,
            "shares": {k: v / step_s if step_s else 0.0 for k, v in per_step.items()}}


def _self_times(ranges: list[tuple[float, float, str]]) -> Iterator[tuple[str, float]]:
    """(phase, seconds) of each range less the ranges directly inside it: the ranges of one thread nest,
    so the self times add up to the time covered, with nothing counted twice."""
    stack: list[list] = []  # [end_us, phase, self_us]
    for start, end, name in sorted(ranges, key=lambda r: (r[0], -r[1])):
        while stack and stack[-1][0] <= start:
            done = stack.pop()
            yield done[1], max(done[2], 0.0) / 1e6
        if stack:
            stack[-1][2] -= end - start
        stack.append([end, name, end - start])
    for end, name, self_us in reversed(stack):
        yield name, max(self_us, 0.0) / 1e6


def top_ops(prof: profile, steps: int, cuda: bool) -> list[dict]:
    """The ops with the most self CPU time (and, with CUDA, device time), per step: where to look for waste."""
    rows = []
    for avg in prof.key_averages():
        if avg.key.startswith(LABEL):
            continue
        row = {"op": avg.key, "calls_per_step": avg.count / steps, "self_cpu_s": avg.self_cpu_time_total / 1e6 / steps}
        if cuda:
            row["self_device_s"] = getattr(avg, "self_device_time_total", 0.0) / 1e6 / steps
        rows.append(row)
    key = "self_device_s" if cuda else "self_cpu_s"
    return sorted(rows, key=lambda r: r[key], reverse=True)[:_TOP_OPS]
