"""One metrics interface, `log(dict, step)`, with sinks behind it: the console now, MLflow beside it.

Only rank 0 logs: every other rank gets a `Metrics` with no sinks, so training code calls `log`
everywhere without asking which rank it is on. It imports only progress.py's number formats.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol, TextIO

from pipeline.core import storage
from pipeline.core.progress import format_duration, human
from pipeline.core.redaction import redact


class Sink(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


# How the console shows each metric it knows, in this order; others are printed as name=value.
_SHOWN = {
    "train/loss": lambda v: f"loss {v:.4f}",
    "val/loss": lambda v: f"val {v:.4f}",
    "train/lr": lambda v: f"lr {v:.2e}",
    "train/grad_norm": lambda v: f"norm {v:.3f}",
    "train/tokens_per_s": lambda v: f"{human(v)} tok/s",
    "train/mfu": lambda v: f"MFU {v:.1%}",
    "train/step_time_s": lambda v: f"{v * 1000:.0f} ms/step",
    "train/memory_gb": lambda v: f"mem {v:.1f} GB",
    "train/eta_s": lambda v: f"eta {format_duration(v)}",
}  # and any other metric (HellaSwag's, named by eval/hellaswag.py) as name=value
_QUIET = {"train/tokens_seen", "train/epoch", "val/perplexity"}


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


class Mirror:
    """Local files kept copied to URLs (the run directory on object storage), from a background thread
    every interval_s, on `publish` and on `close`: whichever node rank 0 runs on, the run directory
    holds its record, and a restart on another node continues it (`restore`)."""

    def __init__(self, pairs: dict[str, str], interval_s: float = 10.0):
        self.pairs, self.interval_s = pairs, interval_s  # {local path: URL}
        self._sent: dict[str, tuple[int, int]] = {}  # path -> (size, mtime_ns) of what was copied
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def restore(self) -> Mirror:
        """Make each local file the URL's copy (absent when the URL is): what the run dir holds is the record."""
        for path, url in self.pairs.items():
            fetch(url, path)
            self._sent[path] = _stamp(path)
        return self

    def start(self) -> Mirror:
        self._thread = threading.Thread(target=self._loop, name="metrics-mirror", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.publish()
            except Exception as err:  # storage hiccup: the next round or close() sends it
                sys.stderr.write(f"tracking: could not copy metrics to the run directory ({err}); retrying\n")

    def publish(self) -> None:
        with self._lock:
            for path, url in self.pairs.items():
                stamp = _stamp(path)
                if stamp != self._sent.get(path, (0, 0)):
                    with open(path, "rb") as f:
                        data = f.read()
                    storage.write_bytes(url, data)
                    self._sent[path] = stamp

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.publish()


def _stamp(path: str) -> tuple[int, int]:
    if not os.path.exists(path):
        return 0, 0
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def fetch(url: str, path: str) -> None:
    """Replace the local file path by a copy of url, or remove it when url does not exist."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if not storage.exists(url):
        if os.path.exists(path):
            os.remove(path)
        return
    tmp = f"{path}.fetch-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(storage.read_bytes(url))
    os.replace(tmp, path)


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


def read_cursor(path: str) -> tuple[int, int]:
    """(bytes of the metrics file sent, lines after them to skip as already sent)."""
    try:
        with open(path) as f:
            parts = [int(p) for p in f.read().split()]
    except (OSError, ValueError):
        return 0, 0
    return (parts + [0, 0])[0], (parts + [0, 0])[1]


def write_cursor(path: str, offset: int, skip: int) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{offset} {skip}")
    os.replace(tmp, path)


def rewind(path: str, step: int, run_id: str | None) -> int:
    """Drop the records of the steps after `step` from the metrics file: a run resumed from the checkpoint of
    `step` redoes them, and each step keeps one record. Those MLflow already received stay there (MLflow cannot
    delete a value): the cursor of run_id is moved back and told to skip as many redone lines, which repeat
    them (a resume is exact). Returns the number of records dropped."""
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    keep = 0
    while keep < len(lines) and lines[keep].endswith(b"\n") and json.loads(lines[keep])["step"] <= step:
        keep += 1
    if keep == len(lines):
        return 0
    kept = b"".join(lines[:keep])
    if run_id:
        cursor = cursor_path(path, run_id)
        offset, skip = read_cursor(cursor)
        if offset > len(kept):  # it sent some of the dropped records: skip their redone copies
            sent, at = 0, len(kept)
            for line in lines[keep:]:
                at += len(line)
                if at > offset:
                    break
                sent += 1
            write_cursor(cursor, len(kept), sent + skip)
    tmp = f"{path}.rewind"
    with open(tmp, "wb") as f:
        f.write(kept)
    os.replace(tmp, path)
    return len(lines) - keep


def cursor_path(path: str, run_id: str) -> str:
    """Where MlflowUploader keeps how much of a metrics file reached the MLflow run run_id."""
    return f"{path}.sent-{run_id}"


def metrics_url(run_dir: str) -> str:
    """Every logged training metric as JSON lines: the run's record, in its run directory."""
    return storage.join(run_dir, "metrics.jsonl")


def metrics_file(run_dir: str) -> str:
    """The local file the metrics are appended to: metrics_url itself on local disk; for a remote run dir, a
    working copy on this node (copied to metrics_url by Mirror)."""
    if "://" in run_dir:
        key = hashlib.sha256(run_dir.encode()).hexdigest()[:16]
        return os.path.join(tempfile.gettempdir(), "gpt2-pipeline", key, "metrics.jsonl")
    return metrics_url(run_dir)


def mirrored(run_dir: str, run_id: str | None) -> dict[str, str]:
    """{local file: URL} of a run's metrics record and its MLflow cursor: empty when the run
    directory is local (the files are written there directly)."""
    path, url = metrics_file(run_dir), metrics_url(run_dir)
    if path == url:
        return {}
    pairs = {path: url}
    if run_id:
        pairs[cursor_path(path, run_id)] = cursor_path(url, run_id)
    return pairs


def drain(run_dir: str, run_id: str, uri: str, log=print, timeout_s: float = 120) -> None:
    """Send to MLflow run run_id whatever of the run's metrics record rank 0 could not send, read from the
    run directory wherever rank 0 ran (raises only what MlflowUploader.drain raises)."""
    mirror = Mirror(mirrored(run_dir, run_id)).restore()
    if os.path.exists(metrics_file(run_dir)):
        MlflowUploader(metrics_file(run_dir), run_id, uri, log=log).drain(timeout_s=timeout_s)
    mirror.publish()


class MlflowUploader:
    """Ships a JSON-lines metrics file to an MLflow run in batches, from a background thread.

    The file is the record and MLflow its copy: training only appends a line per step, so a slow or
    unreachable tracking server never slows a step. The byte offset of the last line sent is kept in
    `<file>.sent-<run id>`, so an outage (retried with back-off) or a restart of the process resumes
    where it stopped. `drain` sends what is left, e.g. from the driver once training ends.
    """

    MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call

    def __init__(self, path: str, run_id: str, tracking_uri: str, interval_s: float = 5.0, log=print):
        self.path, self.run_id, self.uri, self.interval_s, self.log = path, run_id, tracking_uri, interval_s, log
        self.cursor_path = cursor_path(path, run_id)
        # MLflow's client otherwise retries one request for minutes; our own loop retries instead
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def start(self) -> MlflowUploader:
        self._thread = threading.Thread(target=self._loop, name="mlflow-uploader", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        delay = self.interval_s
        while not self._stop.wait(delay):
            delay = self.interval_s if self._send() else min(delay * 2, 60.0)

    def close(self, timeout_s: float = 30.0) -> bool:
        """Stop the thread and send what is left, trying for up to timeout_s; True when all was sent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self.drain(timeout_s)

    def drain(self, timeout_s: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout_s
        delay = 1.0
        while True:
            if self._send() and self._pending() == 0:
                return True
            if time.monotonic() + delay > deadline:
                self.log(f"tracking: {self._pending()} bytes of metrics not yet in MLflow; they stay in "
                         f"{self.path} and are sent by the next drain")
                return False
            time.sleep(delay)
            delay = min(delay * 2, 10.0)

    def _offset(self) -> int:
        return read_cursor(self.cursor_path)[0]

    def _pending(self) -> int:
        return max(0, os.path.getsize(self.path) - self._offset()) if os.path.exists(self.path) else 0

    def _send(self) -> bool:
        """Send every complete line after the cursor; False if the server refused or was unreachable."""
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        if not os.path.exists(self.path):
            return True
        offset, skip = read_cursor(self.cursor_path)
        with open(self.path, "rb") as f:
            f.seek(offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a line being written is sent next time
        lines = data[:end].splitlines()
        metrics, left_to_skip = [], max(0, skip - len(lines))
        for line in lines[skip:]:  # the first `skip` are redone steps MLflow already has (see rewind)
            record = json.loads(line)
            ms = int(record.get("time", time.time()) * 1000)
            metrics += [Metric(k, float(v), ms, int(record["step"])) for k, v in record.items() if k not in ("step", "time")]
        try:
            client = MlflowClient(tracking_uri=self.uri)
            for i in range(0, len(metrics), self.MAX_BATCH):
                client.log_batch(self.run_id, metrics=metrics[i:i + self.MAX_BATCH])
        except Exception as err:  # unreachable or failing server: keep the lines, retry later
            if not self._failing:
                self.log(f"tracking: MLflow at {redact(self.uri)} unreachable ({type(err).__name__}); metrics are kept in "
                         f"{self.path} and sent when it is back")
            self._failing = True
            return False
        if self._failing:
            self.log(f"tracking: MLflow at {redact(self.uri)} is back; sending the kept metrics")
        self._failing = False
        write_cursor(self.cursor_path, offset + end, left_to_skip)
        return True


@contextmanager
def worker_metrics(run_dir: str, rank: int, tracking: dict | None, total_steps: int,
                   start_step: int = 0) -> Iterator[tuple[Metrics, Callable | None]]:
    """A training worker's metrics: on rank 0 the console, metrics.jsonl (on this node, mirrored to a remote
    run dir) and MLflow (tracking: {"uri", "run_id"}, or None); other ranks log nowhere. Yields the
    metrics and `publish` (copies the record to the run dir now; None when it is written there directly).
    start_step: the step training continues from; the record's later steps are redone, so they go (rewind)."""
    run_id = tracking["run_id"] if tracking else None
    pairs = mirrored(run_dir, run_id) if rank == 0 else {}
    mirror = Mirror(pairs).restore() if pairs else None
    path = metrics_file(run_dir)
    if rank == 0:
        rewind(path, start_step, run_id)
    if mirror is not None:
        mirror.start()
    metrics = for_rank(rank, lambda: [Console(total_steps), JsonLines(path)])
    uploader = MlflowUploader(path, run_id, tracking["uri"]).start() if tracking and rank == 0 else None
    try:
        yield metrics, (mirror.publish if mirror is not None else None)
    finally:
        metrics.close()
        if uploader is not None:
            uploader.close()
        if mirror is not None:
            mirror.close()
