"""A status line for long work: rewritten in place on a terminal, printed every few seconds in logs."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, label: str, stream: TextIO | None = None, interval_s: float | None = None):
        self.label = label
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        # In a log (ray job logs, CI) a line every 10 s is readable; on a terminal, redraw often.
        self.interval_s = interval_s if interval_s is not None else (0.2 if self.live else 10.0)
        self.start = time.perf_counter()
        self._last = 0.0
        self._width = 0

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def update(self, text: str, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._last < self.interval_s:
            return
        self._last = now
        line = f"{self.label}: {text} [{format_duration(self.elapsed)}]"
        if self.live:
            self.stream.write("\r" + line.ljust(self._width))
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def done(self, text: str) -> None:
        self.update(text, force=True)
        if self.live:
            self.stream.write("\n")
            self.stream.flush()


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def human(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"
