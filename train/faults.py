"""Fault injection for tests: GPT2_PIPELINE_FAULTS="nan@12,spike@14,hang@20:rank=1,oom@5" makes the training
loop misbehave at those steps (a NaN loss, a loss 1000 times as large, a rank that never finishes its step, a CUDA
out-of-memory error), so that the guards against bad steps, hung ranks and OOM can be tried on a CPU.

A testing aid only: unset (the default) it does nothing. Each fault is KIND@STEP[:rank=R]; STEP is the
step being taken (1-based, as logged), and without rank= every rank is hit. Kinds are those in KINDS.
A fault fires once per run directory (a marker under <run dir>/diagnostics/faults/ records that it
did), so a worker group that Ray Train restarts after a hang meets it no more; with `:every` it fires each
time the step is taken (a NaN that every resume repeats, as bad data would).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from pipeline.core import storage

ENV = "GPT2_PIPELINE_FAULTS"
KINDS = ("nan", "spike", "hang", "oom")
SPIKE = 1000.0  # what "spike" multiplies the loss by
_FAULT = re.compile(r"(?P<kind>[a-z]+)@(?P<step>\d+)(?::rank=(?P<rank>\d+))?(?P<every>:every)?")


class FaultSpecError(ValueError):
    pass


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int | None = None  # None: every rank
    every: bool = False  # fire each time the step is taken, not once per run directory

    @property
    def name(self) -> str:
        return f"{self.kind}@{self.step}" + ("" if self.rank is None else f".rank{self.rank}")


def parse(spec: str) -> list[Fault]:
    """The faults a GPT2_PIPELINE_FAULTS value names; FaultSpecError naming the item it cannot read."""
    faults = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        match = _FAULT.fullmatch(item)
        if not match or match["kind"] not in KINDS:
            raise FaultSpecError(f"{ENV}: cannot read {item!r}; expected KIND@STEP[:rank=R][:every], KIND one of "
                                 f"{', '.join(KINDS)}")
        faults.append(Fault(match["kind"], int(match["step"]), None if match["rank"] is None else int(match["rank"]),
                            bool(match["every"])))
    return faults


class Injector:
    """Which fault, if any, this rank meets at a step. Built once per worker process from the environment."""

    def __init__(self, rank: int, run_dir: str, spec: str | None = None):
        spec = os.environ.get(ENV, "") if spec is None else spec
        self.faults = [f for f in parse(spec) if f.rank in (None, rank)]
        self.markers = storage.join(run_dir, "diagnostics", "faults")

    def __bool__(self) -> bool:
        return bool(self.faults)

    def loss_factor(self, step: int) -> float | None:
        """What this rank's losses are multiplied by at `step` (train/engine.train_step's fault): NaN, SPIKE, or
        None for no fault."""
        if self.at(step, "nan"):
            return float("nan")
        return SPIKE if self.at(step, "spike") else None

    def at(self, step: int, kind: str) -> bool:
        """Whether a fault of `kind` fires at `step` (1-based) on this rank."""
        for fault in self.faults:
            if fault.kind != kind or fault.step != step:
                continue
            if fault.every:
                return True
            marker = storage.join(self.markers, f"{fault.name}.fired")
            if not storage.exists(marker):
                storage.write_bytes(marker, b"")
                return True
        return False
