"""The training loop: Accelerate for devices, processes and precision; one contrastive step per batch.

One process on CPU::

    vlp train recipes/demo-emoji.yaml

Several processes (GPUs, or CPU processes talking over gloo)::

    accelerate launch --multi_gpu --num_processes 2 -m vlpretrain.cli.main train recipes/demo-emoji.yaml
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch

from ..config import RecipeConfig
from ..models.dual_encoder import first_non_finite
from ..recipe_ranges import check_ranges
from .accumulation import check_accumulation, grouped
from .checkpoint import checkpoint_root, save_checkpoint
from .eval_during_training import SuiteDuringTraining
from .fsdp import consolidated_state_dict, sharded_first_non_finite
from .monitors import TrainingMonitor
from .preemption import PREEMPTED_EXIT_CODE, StopRequest
from .prepare import PreparedRun, make_accelerator, prepare_run
from .profiling import StepProfiler, timed_batches
from .resume import Position, resume_position
from .run_log import RunLog, close_logging, setup_logging
from .step import NonFiniteGuard, train_step
from .trackers import check_log_with, open_trackers
from .validation import validate_at_epoch_end

logger = logging.getLogger("vlpretrain.train")


@dataclass
class TrainResult:
    """Where a run wrote its final model, how far it got, what it skipped (bad samples; steps with a
    non-finite loss, not trained on), its validation records and its throughput (samples per second over
    the whole run)."""

    output_dir: Path
    final_dir: Optional[Path]
    step: int
    skipped_samples: int
    val_metrics: list[dict] = field(default_factory=list)
    samples_per_second: float = 0.0
    nonfinite_steps: int = 0
    preempted: bool = False  # stopped by SIGTERM / SIGUSR1 after a checkpoint; ``final_dir`` is None


def train(cfg: RecipeConfig, on_step: Optional[Callable[[int], None]] = None) -> TrainResult:
    """Train a dual encoder as the recipe says; returns where the final model was written.

    ``on_step(step)`` is called after every optimizer step (tests use it to interrupt a run).
    SIGTERM or SIGUSR1 during the run stop it after the current step with a checkpoint and
    ``preempted=True`` in the result (see :mod:`vlpretrain.training.preemption`); the previous signal
    handlers are back when this returns.

    Example:
        >>> from vlpretrain.config import load_recipe
        >>> result = train(load_recipe("recipes/demo-emoji.yaml", ["train.epochs=1"]))
        >>> vlpretrain.load_model(result.final_dir)
    """
    tc = cfg.train
    check_ranges(cfg)  # a recipe built in Python, not loaded, is checked here
    check_accumulation(cfg)
    check_log_with(tc.log_with)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    accelerator = make_accelerator(cfg)
    output_dir = Path(tc.output_dir)
    setup_logging(accelerator, output_dir)
    try:
        with StopRequest(accelerator) as stop:
            return _train(cfg, accelerator, output_dir, on_step, stop)
    finally:
        close_logging()


def _train(cfg: RecipeConfig, accelerator, output_dir: Path, on_step: Optional[Callable[[int], None]],
           stop: StopRequest) -> TrainResult:
    """Prepare the run and resume it if asked; then, ``train.accum_freq`` batches at a time: one optimizer
    step, a metrics record every ``train.log_every`` steps, a checkpoint every ``train.checkpoint_every``
    (and one when a stop signal came); validate after each epoch; finish with the final checkpoint and model."""
    tc = cfg.train
    evals = SuiteDuringTraining(cfg, output_dir)
    run = prepare_run(cfg, accelerator, output_dir)
    position = resume_position(run.checkpointed, tc.resume, output_dir, run.total_steps, run.steps_per_epoch,
                               tc.accum_freq)
    first_epoch, skip_steps = position.epoch, position.batch_in_epoch
    run.log_summary()
    log = RunLog(accelerator, output_dir, run.total_steps, position.step, tc.log_every, tc.progress,
                 trackers=open_trackers(cfg, output_dir, accelerator.is_main_process))
    guard = NonFiniteGuard(accelerator, tc.max_nonfinite_steps)
    profiler = StepProfiler(tc.profile_steps, output_dir, enabled=accelerator.is_main_process)
    monitor = TrainingMonitor(run, tc.monitor_every, log)

    run.model.train()
    try:
        for epoch in range(first_epoch, run.num_epochs):
            if position.step >= run.total_steps:
                break
            skip = skip_steps if epoch == first_epoch else 0
            position.epoch, position.batch_in_epoch = epoch, skip
            # train.accum_freq micro-batches of train.batch_size make one optimizer step.
            for batches in grouped(timed_batches(run.epoch_loader(epoch, skip)), tc.accum_freq):
                for batch in batches:
                    log.note_skipped(batch["skipped"])
                monitor.before_step(position.step + 1)
                loss, losses, updated = train_step(run, batches, position.step, guard)

                global_batch = sum(batch["image"].shape[0] for batch in batches) * run.world
                position.step += 1
                position.batch_in_epoch += 1
                position.samples_seen += global_batch
                log.step_done(loss, global_batch, updated)
                if log.due(position.step):
                    log.write_step(position.step, epoch, position.samples_seen, losses, run.scheduler, run.unwrapped)
                monitor.after_step(position.step, epoch, loss, batches[-1], updated)
                saved = bool(tc.checkpoint_every) and position.step % tc.checkpoint_every == 0
                if saved and position.step < run.total_steps:
                    state = position.trainer_state(run.total_steps, run.world, tc.accum_freq)
                    save_checkpoint(run.checkpointed, output_dir, state, keep=tc.keep_checkpoints)
                profiler.step_done()
                if on_step is not None:
                    on_step(position.step)
                if position.step >= run.total_steps:
                    break  # a stop asked for at the last step: finishing is as quick as a checkpoint
                if stop.agreed():
                    return _preempted(run, log, position, output_dir, stop, already_saved=saved)
            validate_at_epoch_end(run, log, position.step, epoch, monitor)
            evals.after_epoch(run, log, position.step, epoch)
    finally:
        monitor.close()
        profiler.close()
        log.close()
    return _finish(run, log, position, output_dir)


def _preempted(run: PreparedRun, log: RunLog, position: Position, output_dir: Path, stop: StopRequest,
               already_saved: bool) -> TrainResult:
    """Every process, after the same step: checkpoint there (unless the periodic one just did) and
    report the run as pre-empted; ``--resume auto`` continues it."""
    tc = run.cfg.train
    checkpoint = checkpoint_root(output_dir) / f"step_{position.step:08d}"
    if not already_saved:
        checkpoint = save_checkpoint(run.checkpointed, output_dir,
                                     position.trainer_state(run.total_steps, run.world, tc.accum_freq),
                                     keep=tc.keep_checkpoints)
    logger.warning("stopped by %s after step %d of %d: checkpoint %s; continue with --resume auto "
                   "(exit code %d)", stop.describe(), position.step, run.total_steps, checkpoint,
                   PREEMPTED_EXIT_CODE)
    return TrainResult(output_dir=output_dir, final_dir=None, step=position.step, skipped_samples=log.skipped_total(),
                       val_metrics=log.val_history, samples_per_second=log.samples_per_second(),
                       nonfinite_steps=log.nonfinite_steps, preempted=True)


def _finish(run: PreparedRun, log: RunLog, position: Position, output_dir: Path) -> TrainResult:
    """Refuse NaN / inf weights, report skipped samples, take the final checkpoint (with
    ``train.checkpoint_every``), save ``final/`` (the EMA weights when ``train.ema_decay`` is set, the last
    ones then in ``final-online/``)."""
    accelerator, tc = run.accelerator, run.cfg.train
    _refuse_non_finite_weights(run, position.step)
    skipped_total = log.skipped_total()
    if skipped_total:
        logger.warning("%d bad samples were skipped in total (see train.rank*.log)", skipped_total)
    if tc.checkpoint_every:
        end = replace(position, epoch=run.num_epochs, batch_in_epoch=0)
        save_checkpoint(run.checkpointed, output_dir, end.trainer_state(run.total_steps, run.world, tc.accum_freq),
                        keep=tc.keep_checkpoints)
    final_dir = output_dir / "final"
    # FSDP: the full weights gathered to the main process, written in the ordinary format.
    consolidated = consolidated_state_dict(run.unwrapped) if run.checkpointed.sharded else None
    if accelerator.is_main_process:
        if run.ema is not None:
            run.unwrapped.save_pretrained(output_dir / "final-online")
        run.scored.save_pretrained(final_dir, state_dict=consolidated)
        skipped_steps = f" (steps skipped for a non-finite loss: {log.nonfinite_steps})" if log.nonfinite_steps else ""
        logger.info("saved the final model%s to %s%s", " (EMA weights)" if run.ema is not None else "", final_dir,
                    skipped_steps)
    accelerator.wait_for_everyone()
    return TrainResult(output_dir=output_dir, final_dir=final_dir, step=position.step, skipped_samples=skipped_total,
                       val_metrics=log.val_history, samples_per_second=log.samples_per_second(),
                       nonfinite_steps=log.nonfinite_steps)


def _refuse_non_finite_weights(run: PreparedRun, step: int) -> None:
    """A NaN / inf weight (a finite loss can still blow the weights up, e.g. a huge lr) stops the run before
    the last checkpoint and ``final/`` are written. Every process checks (their weights are the same)."""
    for model in [run.scored] + ([run.unwrapped] if run.ema is not None else []):
        bad = (sharded_first_non_finite(model, run.accelerator) if run.checkpointed.sharded
               else first_non_finite(model.state_dict()))
        if bad is not None:
            raise ValueError(f"train: the weights hold NaN or inf values after step {step} (e.g. {bad}); final/ "
                             f"was not written; lower train.lr or check the data")
