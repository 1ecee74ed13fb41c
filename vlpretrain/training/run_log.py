"""What a training run reports as it goes: the per-rank log files, ``metrics.jsonl`` (one record per
logged step, one per validation), the progress bar, and warnings about skipped bad samples.

Only the main process writes ``metrics.jsonl``; every process keeps its own interval sums, reduced
across processes when a record is written.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from .fsdp import full_tensor

if TYPE_CHECKING:
    from accelerate import Accelerator

    from .trackers import Trackers

logger = logging.getLogger("vlpretrain.train")

# Bad samples are named in the log up to this many per process, then only counted.
_NAMED_SKIPS = 20


def setup_logging(accelerator: "Accelerator", output_dir: Path) -> None:
    """Log ``vlpretrain.*`` to ``output_dir/train.rank{N}.log`` and to the console (the main process at
    INFO, the others at WARNING). Undo with :func:`close_logging`.

    Example: ``setup_logging(accelerator, Path("runs/demo"))``
    """
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    root = logging.getLogger("vlpretrain")
    root.setLevel(logging.INFO)
    if not any(getattr(h, "_vlp", False) for h in root.handlers):
        fmt = logging.Formatter(f"%(asctime)s [rank {accelerator.process_index}] %(levelname)s %(message)s",
                                "%H:%M:%S")
        handler = logging.FileHandler(output_dir / f"train.rank{accelerator.process_index}.log")
        handler.setFormatter(fmt)
        handler._vlp = True
        root.addHandler(handler)
        console = logging.StreamHandler()
        console.setFormatter(fmt)
        console.setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)
        console._vlp = True
        root.addHandler(console)


def close_logging() -> None:
    """Remove and close the handlers :func:`setup_logging` added."""
    root = logging.getLogger("vlpretrain")
    for handler in [h for h in root.handlers if getattr(h, "_vlp", False)]:
        root.removeHandler(handler)
        handler.close()


class RunLog:
    """``metrics.jsonl``, the progress bar and the running sums between two logged steps.

    A resumed run (``step > 0``) appends to its metrics; a fresh one starts the file anew.

    Example:
        >>> log = RunLog(accelerator, Path("runs/demo"), total_steps=384, step=0, log_every=10, progress=True)
        >>> log.step_done(loss, global_batch=128)
        >>> if log.due(step): log.write_step(step, epoch, samples_seen, terms, scheduler, model)
        >>> log.close()
    """

    def __init__(self, accelerator: "Accelerator", output_dir: Path, total_steps: int, step: int, log_every: int,
                 progress: bool, trackers: Optional["Trackers"] = None):
        from ..progress import progress_bar

        self.accelerator = accelerator
        self.total_steps = total_steps
        self.log_every = log_every
        metrics_path = output_dir / "metrics.jsonl"
        self.metrics_file = open(metrics_path, "a" if step else "w") if accelerator.is_main_process else None
        self.bar = progress_bar(total=total_steps, initial=step, desc="train", dynamic_ncols=True,
                                enabled=progress and accelerator.is_main_process)
        self.skipped_local = 0
        self.nonfinite_steps = 0  # identical on every process: they agree on each skip
        self.val_history: list[dict] = []
        self.interval_start, self.interval_samples = time.perf_counter(), 0
        self.loss_sum, self.loss_count = torch.zeros((), device=accelerator.device), 0
        self.train_start, self.train_samples = time.perf_counter(), 0
        self.trackers = trackers  # train.log_with: each record also goes there

    def write(self, record: dict) -> None:
        """Append one record to ``metrics.jsonl`` (main process only), flushed at once, and send it to the
        run's experiment trackers (``train.log_with``)."""
        if self.metrics_file is not None:
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()
            if self.trackers is not None:
                self.trackers.log(record)

    def note_skipped(self, skipped: list[tuple[Any, str]]) -> None:
        """Count the bad samples the collate dropped from a batch; name the first ones in the log."""
        for source, reason in skipped:
            self.skipped_local += 1
            if self.skipped_local <= _NAMED_SKIPS:
                logger.warning("skipped bad sample %s: %s", source, reason)
            elif self.skipped_local == _NAMED_SKIPS + 1:
                logger.warning("more bad samples skipped; the count is in metrics.jsonl")

    def step_done(self, loss: torch.Tensor, global_batch: int, updated: bool = True) -> None:
        """Add one optimizer step (its loss and the samples all processes trained on) to the sums; a step
        skipped for a non-finite loss (``updated`` false) is counted instead, its loss left out of the mean."""
        self.interval_samples += global_batch
        self.train_samples += global_batch
        if updated:
            self.loss_sum += loss.detach().float()  # stays on the device
            self.loss_count += 1
        else:
            self.nonfinite_steps += 1
        self.bar.update(1)

    def due(self, step: int) -> bool:
        """Whether step ``step`` writes a record: every ``train.log_every`` steps and at the last one."""
        return step % self.log_every == 0 or step == self.total_steps

    def skipped_total(self) -> int:
        """Bad samples skipped so far by all processes (a collective: every process calls it)."""
        return int(self.accelerator.reduce(torch.tensor(self.skipped_local, device=self.accelerator.device),
                                           "sum").item())

    def write_step(self, step: int, epoch: int, samples_seen: int, losses: dict[str, torch.Tensor], scheduler,
                   model: torch.nn.Module) -> None:
        """Write the record of step ``step``: mean loss since the last record, the last step's loss terms,
        lr, logit scale, throughput and counts; then start the next interval. Every process calls it."""
        elapsed = time.perf_counter() - self.interval_start
        throughput = self.interval_samples / max(elapsed, 1e-9)
        # The mean over the interval's finite steps; NaN when every one of them was skipped.
        mean_loss = self.accelerator.reduce(self.loss_sum, "mean").item() / self.loss_count if self.loss_count \
            else float("nan")
        skipped_total = self.skipped_total()
        record = {"step": step, "epoch": epoch, "loss": mean_loss,
                  **{k: v.item() for k, v in losses.items()},
                  "lr": scheduler.get_last_lr()[0], "logit_scale": full_tensor(model.logit_scale).exp().item(),
                  "samples_per_s": throughput, "skipped_samples": skipped_total,
                  "nonfinite_steps": self.nonfinite_steps, "samples_seen": samples_seen,
                  "elapsed_s": time.perf_counter() - self.train_start}
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # the GPU's peak, for big-batch settings
            record["max_memory_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        self.write(record)
        self.bar.set_postfix(loss=f"{mean_loss:.3f}", scale=f"{record['logit_scale']:.1f}",
                             sps=f"{throughput:.0f}", refresh=False)
        self.interval_start, self.interval_samples = time.perf_counter(), 0
        self.loss_sum, self.loss_count = torch.zeros((), device=self.accelerator.device), 0

    def write_validation(self, val: dict, step: int, epoch: int) -> None:
        """Record validation metrics (``split: val``) in ``metrics.jsonl`` and the history, and log them."""
        val.update({"step": step, "epoch": epoch, "split": "val", "elapsed_s": time.perf_counter() - self.train_start})
        self.val_history.append(val)
        self.write(val)
        logger.info("epoch %d val: loss %.4f, text->image R@1 %.3f R@5 %.3f R@10 %.3f, "
                    "image->text R@1 %.3f R@5 %.3f R@10 %.3f", epoch, val["val_loss"],
                    val["image_retrieval_recall@1"], val["image_retrieval_recall@5"],
                    val["image_retrieval_recall@10"], val["text_retrieval_recall@1"],
                    val["text_retrieval_recall@5"], val["text_retrieval_recall@10"])

    def samples_per_second(self) -> float:
        """Training throughput over the whole run so far (validation time included)."""
        return self.train_samples / max(time.perf_counter() - self.train_start, 1e-9)

    def close(self) -> None:
        """Close the bar and ``metrics.jsonl``."""
        self.bar.close()
        if self.metrics_file is not None:
            self.metrics_file.close()
        if self.trackers is not None:
            self.trackers.close()
