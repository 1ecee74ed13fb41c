"""Where a run stands (step, epoch, batch in the epoch, samples seen): written into every checkpoint's
``trainer_state.json`` and read back, with the trainer objects' state, when a run resumes."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from .checkpoint import read_trainer_state, resolve_resume, verify_checkpoint
from .checkpoint_state import load_trainer_objects

if TYPE_CHECKING:
    from .checkpoint_state import TrainerObjects

logger = logging.getLogger("vlpretrain.train")


@dataclass
class Position:
    """Optimizer steps done, the epoch and the optimizer steps of it done (``batch_in_epoch``: each step
    trains on ``train.accum_freq`` loader batches), and samples seen by all processes.

    Example: ``Position(step=48, epoch=2, batch_in_epoch=0, samples_seen=6144)``
    """

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples_seen: int = 0

    def trainer_state(self, total_steps: int, world: int, accum_freq: int = 1) -> dict:
        """What ``trainer_state.json`` holds for a checkpoint taken here.

        Example: ``save_checkpoint(run.checkpointed, out, position.trainer_state(1000, 8))``
        """
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "samples_seen": self.samples_seen, "total_steps": total_steps, "world_size": world,
                "accum_freq": accum_freq}


def resume_position(objects: "TrainerObjects", resume: Optional[str], output_dir: Path, total_steps: int,
                    steps_per_epoch: int, accum_freq: int = 1) -> Position:
    """Check the checkpoint ``train.resume`` names (``latest`` or a folder) against its manifest, load it
    into ``objects`` (and this process's random generators) and return where it stopped; a fresh start
    (``Position()``) without one. A damaged checkpoint, or one of an older version, is a one-line error.

    A checkpoint taken after the last batch of an epoch resumes at the start of the next epoch. A stream
    of shards (:class:`~vlpretrain.data.shard_dataset.ShardStream`) resumes from the same two numbers: the
    trainer hands ``epoch`` and ``batch_in_epoch`` to ``PreparedRun.epoch_loader``, which restarts the
    epoch's shard order and skips this process's samples of those steps (``batch_in_epoch`` x
    ``train.accum_freq`` batches).

    Example: ``start = resume_position(run.checkpointed, "latest", Path("runs/demo"), 384, 24)``
    """
    if not resume:
        return Position()
    checkpoint = resolve_resume(resume, output_dir)
    if checkpoint is None:
        logger.info("train.resume=%s: no checkpoint in %s yet, starting fresh", resume, output_dir)
        return Position()
    load_trainer_objects(objects, checkpoint, verify_checkpoint(checkpoint))
    accelerator = objects.accelerator
    state = read_trainer_state(checkpoint)
    step, start_epoch, skip_batches = state["step"], state["epoch"], state["batch_in_epoch"]
    samples_seen = state.get("samples_seen", 0)
    if state.get("world_size") not in (None, accelerator.num_processes):
        # Each process's share of the data (its sampler shard, or its shards of a stream) depends on the world.
        logger.warning("resuming a run of %s processes with %d: the data after the resume differs from what the "
                       "uninterrupted run would have read", state["world_size"], accelerator.num_processes)
    if state.get("accum_freq", 1) != accum_freq:
        # batch_in_epoch counts optimizer steps: with another accum_freq they stand for other batches.
        logger.warning("resuming a run of train.accum_freq=%s with %d: the data after the resume differs from what "
                       "the uninterrupted run would have read", state.get("accum_freq", 1), accum_freq)
    if state.get("total_steps") not in (None, total_steps):
        logger.warning("resuming a run planned for %s steps with %s steps", state["total_steps"], total_steps)
    if skip_batches >= steps_per_epoch:
        start_epoch, skip_batches = start_epoch + 1, 0
    logger.info("resumed from %s at step %d (epoch %d, batch %d)", checkpoint, step, start_epoch, skip_batches)
    return Position(step=step, epoch=start_epoch, batch_in_epoch=skip_batches, samples_seen=samples_seen)
