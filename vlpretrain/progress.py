"""Progress bars that suit where they are written: tqdm's bar on a terminal; in a log file, a SLURM output
file or CI, one plain line every :data:`PLAIN_INTERVAL_S` seconds (count, rate, ETA and any postfix such
as the loss) instead of thousands of carriage returns.

Example:
    >>> for batch in progress_bar(loader, desc="embed", unit="img", enabled=is_main_process):
    ...     ...
"""

from __future__ import annotations

import re
import sys
from typing import Any, Iterable, Optional, TextIO

from tqdm.auto import tqdm

__all__ = ["PLAIN_INTERVAL_S", "progress_bar"]

#: Seconds between two plain progress lines when the output is not a terminal.
PLAIN_INTERVAL_S = 30.0

_CONTROL = re.compile(r"\x1b\[[0-9;]*[A-Za-z]|[\r\n]")


class _PlainLines:
    """A text stream for tqdm that turns each redraw (``\\r`` + bar, cursor moves) into one plain line."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = _CONTROL.sub("", text).strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


def progress_bar(iterable: Optional[Iterable] = None, *, enabled: bool = True, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)``, off unless ``enabled``; written as periodic plain lines when stderr is
    not a terminal.

    Example:
        >>> bar = progress_bar(total=1000, desc="train", enabled=True)
        >>> bar.update(10); bar.set_postfix(loss=2.31); bar.close()
    """
    if enabled and not _is_terminal(sys.stderr):
        kwargs = {**kwargs, "file": _PlainLines(sys.stderr), "mininterval": PLAIN_INTERVAL_S,
                  "maxinterval": PLAIN_INTERVAL_S, "ascii": True, "dynamic_ncols": False, "ncols": 100}
    return tqdm(iterable, disable=not enabled, **kwargs)
