"""What a training run leaves under <run dir>/diagnostics/ for a person to find out what went wrong or slow,
and the hooks the training loop (train/loop.py) calls for it:

  hang-stepNNNNNNNN-rankR.txt            a rank's Python stacks when no step completed in time (train/watchdog.py)
  nccl-trace-stepNNNNNNNN-rankR.pickle   NCCL's flight recorder of that rank (GPU runs)
  oom.json                               a CUDA out-of-memory error: the one-line message the driver ends the run with
  memory-snapshot-stepNNNNNNNN-rankR.pickle  PyTorch's allocation history at that error (train.memory_snapshot)
  profile-stepsA-B-rankR.json            a torch.profiler trace of steps A-B (train.profile_steps), for Perfetto
  faults/                                markers of the fault-injection testing aid (train/faults.py)

The pickles are PyTorch's own formats, for its viewers (pytorch.org/memory_viz, torchfrtrace); we write them
and never load them. The folder may be on object storage: every file is written locally, then uploaded.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from pipeline.core import storage
from pipeline.core.command import UserError, one_line
from pipeline.core.config import Config, profile_range
from train import watchdog as watchdogs
from train.faults import Injector

OOM_RECORD = "oom.json"
# the keys that set a step's memory, by recipe (train/loop.Recipe.name)
BATCH_KEYS = {"train": ("batch.micro_batch_size", "batch.seq_len"),
              "finetune": ("finetune.micro_batch_size", "finetune.max_len")}


class OutOfMemory(UserError, RuntimeError):
    """A CUDA out-of-memory error of a training worker: the settings that decide memory, and the plan's figure."""


def directory(run_dir: str) -> str:
    return storage.join(run_dir, "diagnostics")


def upload(path: str, url: str) -> str:
    with open(path, "rb") as f:
        storage.write_bytes(url, f.read())
    return url


# --- the driver's side ---------------------------------------------------------------------------------

def files(run_dir: str) -> set[str]:
    """The names of the diagnostics folder's files (not the fault-injection markers)."""
    return {name for name in storage.listdir(directory(run_dir)) if name != "faults"}


def begin(run_dir: str) -> set[str]:
    """Before a training job: forget an out-of-memory record of an earlier job (its settings may have changed
    since); the files already there, for `report`."""
    storage.remove(storage.join(directory(run_dir), OOM_RECORD))
    return files(run_dir)


def report(run_dir: str, before: set[str], name: str, failed: bool = False) -> None:
    """Print where the files this job wrote are; raise OutOfMemory when a worker ran out of memory. After a
    failed job (`failed`), storage that cannot be read is said in a line: the job's own error follows."""
    try:
        new = sorted(files(run_dir) - before - {OOM_RECORD})
        record = storage.join(directory(run_dir), OOM_RECORD)
        oom = storage.exists(record) and storage.read_json(record)["message"]
    except storage.StorageError as err:
        if not failed:
            raise
        print(f"{name}: diagnostics in {directory(run_dir)}/ not listed: {one_line(str(err))}", flush=True)
        return
    if new:
        print(f"{name}: diagnostics in {directory(run_dir)}/: {', '.join(new)}", flush=True)
    if oom:
        raise OutOfMemory(oom)


# --- out of memory ---------------------------------------------------------------------------------------

def oom_message(cfg: Config, recipe_name: str, micro_batch_size: int, seq_len: int, step: int, rank: int,
                err: BaseException, snapshot: str | None, device_gib: float | None) -> str:
    """One line: where it happened, the settings that decide a step's memory, --plan's figure for them, what to
    change."""
    from train import plan

    batch_key, len_key = BATCH_KEYS.get(recipe_name, BATCH_KEYS["train"])
    z = cfg.deepspeed
    shaped = cfg.model_copy(update={"batch": cfg.batch.model_copy(update={"micro_batch_size": micro_batch_size,
                                                                          "seq_len": seq_len})})
    estimate = plan.plan(shaped).total / plan.GIB
    limit = f" of the {device_gib:.1f} GiB the GPU has" if device_gib else ""
    cause = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
    return (f"{recipe_name}: CUDA out of memory at step {step} on rank {rank} with {batch_key}={micro_batch_size}, "
            f"{len_key}={seq_len}, deepspeed.zero_stage={z.zero_stage}, deepspeed.activation_checkpointing="
            f"{str(z.activation_checkpointing).lower()}: --plan estimates {estimate:.2f} GiB per GPU for this "
            f"configuration{limit} (plus the CUDA context and fragmentation); lower {batch_key}, raise "
            f"deepspeed.zero_stage or set deepspeed.activation_checkpointing=true"
            + (f"; memory snapshot: {snapshot}" if snapshot else "") + f" ({cause})")


def simulated_oom(step: int) -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError(f"CUDA out of memory at step {step} (simulated by GPT2_PIPELINE_FAULTS)")


def hang() -> None:
    """A rank that never finishes its step (the fault-injection aid's "hang")."""
    while True:
        time.sleep(3600)


# --- profiling -------------------------------------------------------------------------------------------

class _Profile:
    """torch.profiler over steps A-B (those of them this attempt takes), exported as a Chrome trace per rank."""

    def __init__(self, steps: tuple[int, int], device: torch.device):
        self.first, self.last = steps
        self.device = device
        self.profiler: torch.profiler.profile | None = None
        self.started = 0

    def before(self, step: int) -> None:
        if self.profiler is None and not self.started and self.first <= step <= self.last:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.start()
            self.started = step

    def after(self, step: int) -> str | None:
        """The local trace file once step B is done, else None."""
        if self.profiler is None or step < self.last:
            return None
        self.profiler.stop()
        path = os.path.join(tempfile.mkdtemp(prefix="gpt2-pipeline-profile-"), f"steps{self.started}-{step}.json")
        self.profiler.export_chrome_trace(path)
        self.profiler = None
        return path


# --- the loop's hooks --------------------------------------------------------------------------------------

class Diagnostics:
    """One per training worker. `guard` around the worker's training (an out-of-memory error becomes the run's
    record); `started` once the engine is built; `before_step` / `after_step` around each step (1-based numbers);
    `phase` around evaluation and checkpointing; `finished` after the last step."""

    def __init__(self, cfg: Config, recipe, rank: int, device: torch.device, tracking: dict | None,
                 injector: Injector):
        self.cfg, self.recipe, self.rank, self.device, self.tracking = cfg, recipe, rank, device, tracking
        self.injector, self.step = injector, 0
        self.dir = directory(recipe.run_dir)
        self.watchdog = watchdogs.Watchdog(cfg, rank, self.dir, recipe.name)
        steps = cfg.train.profile_steps
        self.profile = _Profile(profile_range(steps), device) if steps else None
        self.snapshots = cfg.train.memory_snapshot and device.type == "cuda"
        if self.snapshots:
            torch.cuda.memory._record_memory_history(max_entries=100_000)

    def stopped(self) -> bool:
        """An earlier attempt of this job ran out of memory: the driver ends the run with its record, so a
        restarted worker group does no work."""
        return storage.exists(storage.join(self.dir, OOM_RECORD))

    @contextmanager
    def guard(self) -> Iterator[Diagnostics]:
        try:
            yield self
        except torch.OutOfMemoryError as err:
            self._record_oom(err)
            raise
        finally:
            self.watchdog.stop()

    def started(self, step: int) -> None:
        for url in watchdogs.upload_nccl_dumps(self.dir):
            sys.stderr.write(f"{self.recipe.name}: NCCL's timeout dump of an earlier attempt saved as {url}\n")
        self.step = step
        self.watchdog.start(step)

    def before_step(self, step: int) -> None:
        self.step = step
        if self.injector.at(step, "hang"):
            hang()
        if self.injector.at(step, "oom"):
            raise simulated_oom(step)
        if self.profile is not None:
            self.profile.before(step)

    def after_step(self, step: int) -> None:
        self.watchdog.beat(step)
        trace = self.profile.after(step) if self.profile is not None else None
        if trace is not None:
            url = upload(trace, storage.join(self.dir, f"profile-{os.path.basename(trace)[:-5]}-rank{self.rank}.json"))
            if self.rank == 0:
                self._log_trace(trace, url)

    def finished(self) -> None:
        """The last step is done: what follows (the final collectives, sending the metrics) is no step's time."""
        self.watchdog.stop()

    def phase(self, what: str):
        return self.watchdog.phase(what)

    def _log_trace(self, path: str, url: str) -> None:
        """Rank 0's trace as an artifact of the MLflow run (a server that fails does not stop training)."""
        if self.tracking:
            from mlflow.tracking import MlflowClient

            try:
                MlflowClient(tracking_uri=self.tracking["uri"]).log_artifact(self.tracking["run_id"], path, "profile")
            except Exception as err:
                sys.stderr.write(f"{self.recipe.name}: the profiler trace could not be logged to MLflow "
                                 f"({type(err).__name__}: {err}); it is in {url}\n")
        sys.stdout.write(f"{self.recipe.name}: profiler trace of steps {os.path.basename(path)[5:-5]} in {url}\n")
        sys.stdout.flush()

    def _record_oom(self, err: BaseException) -> None:
        snapshot = None
        if self.snapshots:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "snapshot.pickle")
                torch.cuda.memory._dump_snapshot(path)
                snapshot = upload(path, storage.join(
                    self.dir, f"memory-snapshot-step{self.step:08d}-rank{self.rank}.pickle"))
        gib = (torch.cuda.get_device_properties(self.device).total_memory / 2**30
               if self.device.type == "cuda" else None)
        b = self.recipe.batch
        message = oom_message(self.cfg, self.recipe.name, b.micro_batch_size, b.seq_len, self.step, self.rank, err,
                              snapshot, gib)
        storage.write_json(storage.join(self.dir, OOM_RECORD), {"message": message, "step": self.step,
                                                                "rank": self.rank})
        sys.stderr.write(message + "\n")
