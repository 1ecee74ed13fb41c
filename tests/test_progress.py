"""Progress bars: tqdm's bar on a terminal, periodic plain lines (no carriage returns) elsewhere."""

from __future__ import annotations

import io

from vlpretrain import progress


class _Stream(io.StringIO):
    def __init__(self, terminal: bool) -> None:
        super().__init__()
        self.terminal = terminal

    def isatty(self) -> bool:
        return self.terminal


def _run(monkeypatch, terminal: bool, enabled: bool = True) -> str:
    stream = _Stream(terminal)
    monkeypatch.setattr(progress.sys, "stderr", stream)
    monkeypatch.setattr(progress, "PLAIN_INTERVAL_S", 0.0)  # a line for every update, not every 30 s
    bar = progress.progress_bar(total=50, desc="train", enabled=enabled)
    for _ in range(5):
        bar.update(10)
        bar.set_postfix(loss=1.5)
    bar.close()
    return stream.getvalue()


def test_a_log_file_gets_plain_lines_without_carriage_returns(monkeypatch):
    text = _run(monkeypatch, terminal=False)
    lines = text.splitlines()
    assert "\r" not in text and "\x1b" not in text
    assert len(lines) >= 2 and all(line.startswith("train:") for line in lines)
    assert "50/50" in lines[-1] and "loss=1.5" in lines[-1]


def test_a_terminal_gets_tqdms_redrawn_bar(monkeypatch):
    assert "\r" in _run(monkeypatch, terminal=True)


def test_a_disabled_bar_writes_nothing(monkeypatch):
    assert _run(monkeypatch, terminal=False, enabled=False) == ""
