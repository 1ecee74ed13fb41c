"""Pre-emption: SIGTERM or SIGUSR1 (what SLURM sends before it kills a job) asks the trainer to finish the
current optimizer step, write a checkpoint and exit with :data:`PREEMPTED_EXIT_CODE`; ``--resume auto``
continues from that checkpoint.

The signal handler only sets a flag (no I/O, no locks: it may run between any two bytecodes, checkpoint
writing included). After each optimizer step every process reduces its flag, so a signal that reached
one process only, or the processes at different steps, stops all of them after the same step.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger("vlpretrain.train")

# EX_TEMPFAIL from sysexits.h: "a temporary failure, try again" -- here: pre-empted, resume me.
PREEMPTED_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """The pre-emption flag of one process and the agreement on it across processes.

    Use it as a context manager around the training loop: inside, SIGTERM / SIGUSR1 set the flag; on
    leaving, the previous handlers come back. Outside the main thread (where Python allows no signal
    handlers) it installs nothing and only :meth:`request` sets the flag.

    Example:
        >>> with StopRequest(accelerator) as stop:
        ...     for batch in loader:
        ...         train_one_step(batch)
        ...         if stop.agreed():  # a collective: every process calls it after every step
        ...             save_checkpoint(...); break
    """

    def __init__(self, accelerator: "Accelerator"):
        self.accelerator = accelerator
        self.signum: Optional[int] = None  # the last stop signal received by this process
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        # Only a flag: a second signal while the checkpoint is written changes nothing either.
        self.signum = signum

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Ask for a stop as a signal would (tests, or a caller with its own reason)."""
        self.signum = signum

    def agreed(self) -> bool:
        """True on every process when any process has received a stop signal. A collective with several
        processes (one all-reduce of one number): every process calls it after the same steps."""
        local = self.signum is not None
        if self.accelerator.num_processes == 1:
            return local
        flag = torch.tensor([1.0 if local else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, "sum").item() > 0)

    def describe(self) -> str:
        """How the stop was asked for, for the log: ``SIGTERM``, or ``another process's signal``."""
        return signal.Signals(self.signum).name if self.signum is not None else "another process's signal"
