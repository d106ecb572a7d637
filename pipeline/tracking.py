"""One metrics interface, `log(dict, step)`, with sinks behind it: the console now, MLflow beside it.

Only rank 0 logs: every other rank gets a `Metrics` with no sinks, so training code calls `log`
everywhere without asking which rank it is on. This module imports nothing else of the project.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable, Protocol, TextIO


class Sink(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def _tokens(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _duration(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# How the console shows each metric it knows, in this order; others are printed as name=value.
_SHOWN = {
    "train/loss": lambda v: f"loss {v:.4f}",
    "val/loss": lambda v: f"val {v:.4f}",
    "train/lr": lambda v: f"lr {v:.2e}",
    "train/grad_norm": lambda v: f"norm {v:.3f}",
    "train/tokens_per_s": lambda v: f"{_tokens(v)} tok/s",
    "train/mfu": lambda v: f"MFU {v:.1%}",
    "train/step_time_s": lambda v: f"{v * 1000:.0f} ms/step",
    "train/memory_gb": lambda v: f"mem {v:.1f} GB",
    "train/eta_s": lambda v: f"eta {_duration(v)}",
}
_QUIET = {"train/tokens_seen", "train/epoch", "val/tokens", "val/perplexity"}


class Console:
    """A readable line per call: `step 120/19073 | loss 3.2145 | lr 6.00e-04 | ...`."""

    def __init__(self, total_steps: int | None = None, stream: TextIO | None = None):
        self.total_steps, self.stream = total_steps, stream or sys.stdout

    def log(self, metrics: dict[str, float], step: int) -> None:
        head = f"step {step}/{self.total_steps}" if self.total_steps else f"step {step}"
        parts = [fmt(metrics[k]) for k, fmt in _SHOWN.items() if k in metrics]
        parts += [f"{k}={v:.4g}" for k, v in metrics.items() if k not in _SHOWN and k not in _QUIET]
        # write, not print: Ray Train replaces print in workers and would echo each line twice
        self.stream.write(" | ".join([head, *parts]) + "\n")
        self.stream.flush()

    def close(self) -> None:
        pass


class JsonLines:
    """Every logged dict as one JSON line with its step, floats at full precision: the run's own
    record of its metrics, readable without any tracking server."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.file = open(path, "a+", buffering=1)
        self.file.seek(0)
        text = self.file.read()
        if text and not text.endswith("\n"):  # the torn last line of a killed writer
            self.file.truncate(text.rfind("\n") + 1)
        self.file.seek(0, os.SEEK_END)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.file.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")

    def close(self) -> None:
        self.file.close()


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class Metrics:
    def __init__(self, sinks: list[Sink] | None = None):
        self.sinks = list(sinks or [])

    def log(self, metrics: dict[str, float], step: int) -> None:
        metrics = {k: float(v) for k, v in metrics.items() if v is not None}
        for sink in self.sinks:
            sink.log(metrics, step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def for_rank(rank: int, make_sinks: Callable[[], list[Sink]]) -> Metrics:
    """Rank 0 logs to the sinks (made only there); other ranks log nowhere."""
    return Metrics(make_sinks() if rank == 0 else [])
