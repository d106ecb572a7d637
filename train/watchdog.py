"""The hang watchdog: a thread in every training worker that fails the worker group when no step completes in time.

A hung rank blocks in its step or in a collective, and every other rank then blocks in the collective waiting
for it: so each rank's own watchdog sees its own step not complete, and each writes its own Python stacks
(faulthandler, every thread) and, on GPUs, NCCL's flight recorder (the collectives in flight and done) to
<run dir>/diagnostics/, naming the step and rank. It then ends its process (os._exit): Ray Train sees a worker
die and restarts the group from the last committed checkpoint (cluster.max_failures), as after any crash.

The timeout (train.step_timeout_s, or derived from the measured step time: STEP_TIMEOUT_FACTOR x the mean time
between completed steps x train.log_interval, at least STEP_TIMEOUT_FLOOR_S) applies between completed steps;
the first steps after a (re)start, an evaluation and a checkpoint save get train.phase_timeout_s instead. The
process group's own collective timeout (collective_timeout_s) is longer than either, so the watchdog, which
says where each rank was, fires before the collective's error, which says nothing of the kind.
"""

from __future__ import annotations

import faulthandler
import glob
import os
import socket
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from pipeline.core import storage
from pipeline.core.config import Config

STEP_TIMEOUT_FLOOR_S = 300.0  # a derived step timeout is never shorter: a stalled read of storage, a slow node
STEP_TIMEOUT_FACTOR = 20.0  # times the measured step time
FIRST_STEPS = 2  # steps after a (re)start under the phase allowance: compilation, NCCL set-up, data caching
WINDOW = 50  # completed steps the step time is measured over
GRACE_S = 5.0  # a rank that fired waits this long before exiting, so that the others (whose last steps
# completed within moments of its own) dump their stacks before its exit breaks their collectives
UPLOAD_LIMIT_S = 120.0  # storage that hangs too must not keep the worker alive
EXIT_CODE = 75
COLLECTIVE_MARGIN_S = 300.0
FLIGHT_RECORDER_ENTRIES = "2000"  # collectives NCCL's flight recorder keeps (PyTorch's recommended size)


def collective_timeout_s(cfg: Config) -> int:
    """The process group's timeout (TorchConfig(timeout_s=...)): past every watchdog allowance."""
    return int(max(cfg.train.phase_timeout_s, cfg.train.step_timeout_s or 0) + COLLECTIVE_MARGIN_S)


def step_timeout(configured: float | None, intervals: list[float], log_interval: int, ceiling: float) -> float:
    """The allowance between completed steps: train.step_timeout_s when set; else STEP_TIMEOUT_FACTOR x the mean
    of the measured intervals between steps x log_interval (on a GPU the host runs ahead and waits for the device
    once per log interval), at least STEP_TIMEOUT_FLOOR_S and at most `ceiling` (the phase allowance, which the
    collective timeout is set above)."""
    if configured:
        return configured
    if not intervals:
        return ceiling
    derived = STEP_TIMEOUT_FACTOR * sum(intervals) / len(intervals) * log_interval
    return min(max(STEP_TIMEOUT_FLOOR_S, derived), ceiling)


def flight_recorder_env(run_dir: str) -> dict[str, str]:
    """The environment NCCL's flight recorder needs in a GPU worker before its process group starts (set through
    Ray Train's worker_runtime_env): the ring of recent collectives, and its dump on an NCCL timeout into a local
    folder of this run, which the next worker started on the node uploads (`upload_nccl_dumps`)."""
    key = storage.filesystem(run_dir)[1].strip("/").replace("/", "_")[-80:]
    prefix = os.path.join(tempfile.gettempdir(), "gpt2-pipeline-nccl-trace", key, "rank_")
    return {"TORCH_NCCL_TRACE_BUFFER_SIZE": FLIGHT_RECORDER_ENTRIES, "TORCH_FR_BUFFER_SIZE": FLIGHT_RECORDER_ENTRIES,
            "TORCH_NCCL_DUMP_ON_TIMEOUT": "1", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": prefix, "TORCH_FR_DUMP_TEMP_FILE": prefix}


def upload_nccl_dumps(diagnostics: str) -> list[str]:
    """Move what NCCL's own timeout dumped on this node (TORCH_NCCL_DEBUG_INFO_TEMP_FILE) to the diagnostics
    folder; the URLs written. Also makes the dump's folder, which NCCL does not create."""
    prefix = os.environ.get("TORCH_NCCL_DEBUG_INFO_TEMP_FILE")
    if not prefix:
        return []
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    urls = []
    for path in sorted(glob.glob(glob.escape(prefix) + "*")):
        url = storage.join(diagnostics, f"nccl-timeout-{os.path.basename(path)}.pickle")
        with open(path, "rb") as f:
            storage.write_bytes(url, f.read())
        os.remove(path)
        urls.append(url)
    return urls


def _collective_timeout() -> str:
    """The process group's collective timeout as this rank's backend has it (launch.py sets it), for the report."""
    import torch
    import torch.distributed as dist

    try:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return f"{dist.group.WORLD._get_backend(device).options._timeout.total_seconds():.0f} s"
    except Exception:  # no process group, or a backend that does not say
        return "unknown"


def _flight_recorder() -> bytes | None:
    """NCCL's flight recorder now (PyTorch's pickle, which we write and never read), or None without NCCL."""
    import torch

    dump = getattr(torch._C._distributed_c10d, "_dump_nccl_trace", None)
    if dump is None or not torch.cuda.is_available():
        return None
    try:
        return dump()
    except Exception:  # no NCCL process group in this process
        return None


class Watchdog:
    """Started once the engine is built; `beat` after every completed step; `phase` around evaluation and
    checkpointing. `on_fire` (tests) replaces the exit."""

    def __init__(self, cfg: Config, rank: int, diagnostics: str, name: str = "train",
                 clock: Callable[[], float] = time.monotonic, poll_s: float = 1.0, grace_s: float = GRACE_S,
                 on_fire: Callable[[int], None] = os._exit):
        t = cfg.train
        self.configured, self.phase_s, self.log_interval = t.step_timeout_s, t.phase_timeout_s, t.log_interval
        self.rank, self.diagnostics, self.clock, self.poll_s, self.on_fire = rank, diagnostics, clock, poll_s, on_fire
        self.grace_s, self.name = grace_s, name  # name: the console's prefix (train, finetune)
        self.intervals: deque[float] = deque(maxlen=WINDOW)
        self.step = self.first = 0
        self.last = self.deadline = self.excluded = 0.0  # excluded: time in phases since the last step
        self.doing = ""  # what the step after self.step waits on, for the report
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, step: int) -> Watchdog:
        """Watch from `step` on; again after the loop went back to a checkpoint: re-armed, same thread."""
        self.step = self.first = step
        self._arm(self.phase_s, "the first steps after a start")
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="hang-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def timeout(self) -> float:
        return step_timeout(self.configured, list(self.intervals), self.log_interval, self.phase_s)

    def beat(self, step: int) -> None:
        """Step `step` completed."""
        now = self.clock()
        if self.step - self.first >= FIRST_STEPS:  # the first steps' times (compilation) say nothing of the others
            self.intervals.append(now - self.last - self.excluded)
        self.step, self.last, self.excluded = step, now, 0.0
        if step - self.first < FIRST_STEPS:
            self._arm(self.phase_s, "the first steps after a start")
        else:
            self._arm(self.timeout(), "a training step")

    @contextmanager
    def phase(self, what: str) -> Iterator[None]:
        """An evaluation or checkpoint save: the phase allowance, and its time not counted as a step's."""
        began = self.clock()
        self._arm(self.phase_s, what)
        try:
            yield
        finally:
            self.excluded += self.clock() - began
            self._arm(self.phase_s if self.step - self.first < FIRST_STEPS else self.timeout(), "a training step")

    def _arm(self, seconds: float, doing: str) -> None:
        self.armed_s, self.doing = seconds, doing
        self.deadline = self.clock() + seconds

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            if self.clock() > self.deadline:
                self.fire()
                return

    def fire(self) -> None:
        """Write this rank's stacks (and NCCL's flight recorder) to the diagnostics folder, then end the process."""
        backstop = threading.Timer(UPLOAD_LIMIT_S, self.on_fire, (EXIT_CODE,))  # storage that hangs as well
        backstop.daemon = True
        backstop.start()
        step = self.step + 1
        name = f"hang-step{step:08d}-rank{self.rank}"
        url = storage.join(self.diagnostics, f"{name}.txt")
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, f"{name}.txt")
            with open(path, "w") as f:  # faulthandler writes to a file descriptor: a real file first
                f.write(f"hang watchdog: rank {self.rank} (pid {os.getpid()} on {socket.gethostname()}) completed no "
                        f"step in {self.armed_s:.0f} s, waiting on {self.doing} at step {step} (last completed: "
                        f"{self.step}); the process group's collective timeout: {_collective_timeout()}; the Python "
                        f"stacks of every thread:\n\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
            with open(path, "rb") as f:
                storage.write_bytes(url, f.read())
        trace = _flight_recorder()
        if trace is not None:
            storage.write_bytes(storage.join(self.diagnostics, f"nccl-trace-step{step:08d}-rank{self.rank}.pickle"),
                                trace)
        sys.stderr.write(f"{self.name}: rank {self.rank} completed no step in {self.armed_s:.0f} s (step {step}, "
                         f"{self.doing}): stacks in {url}; ending this worker so that Ray Train restarts the group "
                         f"from the last checkpoint\n")
        sys.stderr.flush()
        time.sleep(self.grace_s)
        backstop.cancel()
        self.on_fire(EXIT_CODE)
