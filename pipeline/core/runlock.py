"""One run at a time per run directory: a lock the driver (and a stage command run alone) holds while it works.

Two drivers on one run directory would mix their checkpoints, metrics and MLflow runs. The lock is
- on local disk (or a filesystem every node mounts): `<run dir>/run.lock`, an flock the kernel releases
  when the holder dies, however it dies; the file says who holds it;
- on S3: the object `<run dir>/run.lock` with a lease, created only if absent and renewed only if unchanged
  (S3's conditional writes: If-None-Match / If-Match), renewed every lease/4 by a background thread. A
  holder that died leaves a lease that expires; the next run takes it over once it has.
Other object stores (gs://, ...) are not locked, with a warning: fsspec offers no conditional write there.

A refusal is one line naming the holder (host, pid, command, since when) and exit code 2.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator

from pipeline.core import storage
from pipeline.core.command import UserError
from pipeline.core.storage import join

NAME = "run.lock"


class RunDirBusy(UserError, RuntimeError):
    """Another run holds the run directory; the message names it."""


def _holder(lease_s: float) -> dict:
    return {"id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
            "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])[:300],
            "since": time.time(), "expires_at": time.time() + lease_s}


def _describe(holder: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')} ({holder.get('command')!r}, since {since})"


@contextlib.contextmanager
def hold(run_dir: str, lease_s: float = 120.0, log=print, lock: str | None = None) -> Iterator[None]:
    """Hold run_dir for the duration of the block, or raise RunDirBusy naming the holder. lease_s: how long
    an object-storage lock outlives a holder that stopped renewing it (died). lock: the lock's URL, by default
    run.lock inside run_dir (a dataset directory, whose files are the product, keeps it beside itself)."""
    lock = lock or join(run_dir, NAME)
    if storage.is_local(run_dir):
        with _local(run_dir, lock):
            yield
    elif run_dir.startswith("s3://"):
        with _S3Lease(run_dir, lock, lease_s, log):
            yield
    else:
        log(f"run: {run_dir} is not locked ({run_dir.split('://')[0]}:// has no conditional writes here): "
            f"start no second run on it while this one runs")
        yield


@contextlib.contextmanager
def _local(run_dir: str, lock: str) -> Iterator[None]:
    path = storage.filesystem(lock)[1]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            try:
                holder = json.loads(f.read() or "{}")
            except ValueError:
                holder = {}
            raise RunDirBusy(f"{run_dir} is in use by {_describe(holder)}; wait for it to finish, stop it, or "
                             f"choose another run.name") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps(_holder(0)))
        f.flush()
        yield  # the kernel releases the flock when the file closes, also if this process is killed


class _S3Lease:
    def __init__(self, run_dir: str, lock: str, lease_s: float, log):
        import boto3

        self.run_dir, self.lease_s, self.log = run_dir, lease_s, log
        bucket_key = lock[len("s3://"):]
        self.bucket, self.key = bucket_key.split("/", 1)
        from botocore.config import Config

        # endpoint and credentials as s3fs finds them (environment, profile); its timeouts too (storage.timeout_s)
        self.s3 = boto3.client("s3", config=Config(**storage.client_config()))
        self.me = _holder(lease_s)
        self.etag: str | None = None
        self.stop = threading.Event()

    def __enter__(self) -> _S3Lease:
        from botocore.exceptions import ClientError

        try:  # transient errors retried for storage.retry_s, as every storage call
            self.etag = storage.retrying(self.run_dir, lambda: self._put(IfNoneMatch="*"), f"the lock {self.key}")
        except ClientError as err:
            if not _precondition_failed(err):
                raise
            self._take_over_if_expired()
        self.thread = threading.Thread(target=self._renew, name="run-lock-lease", daemon=True)
        self.thread.start()
        return self

    def _put(self, **condition) -> str:
        self.me["expires_at"] = time.time() + self.lease_s
        return self.s3.put_object(Bucket=self.bucket, Key=self.key, Body=json.dumps(self.me).encode(),
                                  **condition)["ETag"]

    def _take_over_if_expired(self) -> None:
        from botocore.exceptions import ClientError

        found = storage.retrying(self.run_dir, lambda: self.s3.get_object(Bucket=self.bucket, Key=self.key))
        try:
            holder = json.loads(found["Body"].read())
        except ValueError:
            holder = {}
        if holder.get("expires_at", 0) > time.time():
            raise RunDirBusy(f"{self.run_dir} is in use by {_describe(holder)}, its lease valid for "
                             f"{holder['expires_at'] - time.time():.0f} s more; wait for it to finish, stop it, or "
                             f"choose another run.name")
        try:  # expired: the holder died; take it, unless another driver just did
            self.etag = self._put(IfMatch=found["ETag"])
        except ClientError as err:
            if _precondition_failed(err):
                raise RunDirBusy(f"{self.run_dir}: another run took over its expired lock just now") from None
            raise
        self.log(f"run: took over the lock of {self.run_dir} from {_describe(holder)}, whose lease had expired")

    def _renew(self) -> None:
        while not self.stop.wait(self.lease_s / 4):
            try:
                self.etag = self._put(IfMatch=self.etag)
            except Exception as err:  # storage hiccup: the next round retries; a lost lease is said loudly
                self.log(f"run: could not renew the lock of {self.run_dir} ({type(err).__name__}: {err})")

    def __exit__(self, *_) -> None:
        self.stop.set()
        self.thread.join()
        with contextlib.suppress(Exception):  # an expired lease is freed by the next run anyway
            self.s3.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)


def _precondition_failed(err) -> bool:
    return err.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict") or \
        err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412)
