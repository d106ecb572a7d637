"""Files on local disk or object storage (s3://, gs://, any fsspec URL), written atomically.

A reader never sees a half-written file: locally we write to a temporary name in the same directory and
rename; on object stores an object only appears when its upload completes, and a failed upload is
discarded rather than committed. This module imports nothing else of the project.

Object storage is a network service that fails for a while and comes back: every request has a connect and
a read timeout (`configure`, from storage.timeout_s), and every call here that fails with a transient error
(connection refused or reset, a timeout, HTTP 5xx such as S3's 503 SlowDown) is retried with back-off for up
to storage.retry_s, then raises a one-line StorageError naming the endpoint. A full local disk is a
StorageError naming the path.
"""

from __future__ import annotations

import atexit
import errno
import hashlib
import json
import os
import posixpath
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.core.command import UserError

T = TypeVar("T")


class StorageError(UserError, RuntimeError):
    """Storage that cannot be used as configured; the one-line message names the URL and the cause."""


class StorageUnavailable(StorageError):
    """Storage that kept failing with transient errors for longer than storage.retry_s."""


# this process's settings (configure); the defaults are storage.retry_s's and storage.timeout_s's
_settings = {"retry_s": 300.0, "timeout_s": 60.0}


def configure(retry_s: float, timeout_s: float) -> None:
    """How long this process retries a transient storage error, and each request's connect and read timeout.
    Every command calls it with the config's storage section, and so does every training worker."""
    _settings.update(retry_s=float(retry_s), timeout_s=float(timeout_s))


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for a path or URL, and the path within it.

    Without the listings cache: another process (a rank, the driver) writes checkpoints and markers
    under the same prefixes, and a cached listing would hide them from this one. On S3, with our timeouts
    and no retries inside botocore or s3fs: the back-off that spans an outage is `retrying`'s, bounded by retry_s.
    """
    options: dict[str, Any] = {"use_listings_cache": False}
    s3 = url.startswith(("s3://", "s3a://"))
    if s3:
        options["config_kwargs"] = client_config()
    fs, path = fsspec.core.url_to_fs(url, **options)
    if s3:
        fs.retries = 1  # s3fs's own retry loop (5 tries of every request) would multiply the timeouts
        client = fs.s3
        if getattr(fs, "_expect_dropped_on", None) is not client:
            client.meta.events.register("before-send.s3", _drop_expect_continue)
            fs._expect_dropped_on = client
    return fs, path


def _drop_expect_continue(request, **_) -> None:
    """Send uploads without `Expect: 100-continue`: aiohttp waits for the 100 with no timeout at all, so an
    endpoint that accepts and never answers held an upload for good; without it the read timeout applies.
    (SigV4 never signs the header, so removing it changes no signature.)"""
    request.headers.pop("Expect", None)


def client_config() -> dict:
    """botocore's Config arguments for an S3 client of this process (boto3's too: pipeline/core/runlock.py): our
    timeouts, and one attempt per call, since `retrying` retries (botocore's retries would multiply the timeout)."""
    timeout = _settings["timeout_s"]
    return {"connect_timeout": timeout, "read_timeout": timeout, "retries": {"max_attempts": 1, "mode": "standard"}}


def endpoint(url: str) -> str:
    """The service behind url, for messages: the S3 endpoint in use, or the URL's scheme and bucket."""
    if url.startswith(("s3://", "s3a://")):
        return (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                or "AWS S3 (the default endpoint)")
    return url.split("/")[0] + "//" + url.split("/")[2] if "://" in url else url


_TRANSIENT_NAMES = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
                    "HTTPClientError", "ClientConnectorError", "ServerDisconnectedError", "ClientOSError",
                    "ClientPayloadError", "IncompleteRead", "ResponseParserError", "FSTimeoutError"}
_TRANSIENT_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
                    "ThrottlingException", "RequestLimitExceeded"}
_TRANSIENT_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE,
                     errno.EHOSTUNREACH, errno.ENETUNREACH}


def transient(err: BaseException) -> bool:
    """Whether err (or what caused it) is a failure that passes: a refused, reset or timed-out connection, or
    an HTTP 5xx answer (S3's 503 SlowDown). Missing objects, denied permission and bad requests are not."""
    seen = 0
    while err is not None and seen < 8:
        names = {c.__name__ for c in type(err).__mro__}
        if names & _TRANSIENT_NAMES or isinstance(err, (ConnectionError, TimeoutError)):
            return True
        if isinstance(err, OSError) and err.errno in _TRANSIENT_ERRNOS:
            return True
        response = getattr(err, "response", None)
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            if status >= 500 or response.get("Error", {}).get("Code") in _TRANSIENT_CODES:
                return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def retrying(url: str, fn: Callable[[], T], what: str = "") -> T:
    """fn(), retried with back-off (1 s doubling to 30 s) while it fails with a transient error, for up to
    storage.retry_s; then a one-line StorageUnavailable naming the endpoint. Other errors pass at once."""
    deadline = time.monotonic() + _settings["retry_s"]
    delay = 1.0
    while True:
        try:
            return fn()
        except Exception as err:
            if not transient(err) or is_local(url):
                raise
            left = deadline - time.monotonic()
            if left <= 0:
                raise StorageUnavailable(
                    f"{endpoint(url)} did not answer {what or url} for {_settings['retry_s']:.0f} s "
                    f"(storage.retry_s): {explain(err)}") from err
            time.sleep(min(delay, left))  # the last try falls on the deadline: the whole budget is used
            delay = min(delay * 2, 30.0)


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or a URL (s3://bucket/x) with '/'."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def is_local(url: str) -> bool:
    return isinstance(filesystem(url)[0], LocalFileSystem)


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return retrying(url, lambda: _exists(fs, path))


def _exists(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """fs.exists, except that a transient error is raised rather than read as "absent" (s3fs answers False
    to any error it meets): an outage must not make a committed checkpoint look missing."""
    try:
        fs.info(path)
        return True
    except FileNotFoundError:
        return False


def size(url: str) -> int:
    fs, path = filesystem(url)
    return retrying(url, lambda: fs.size(path))


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    return retrying(url, lambda: fs.cat_file(path))


def files(url: str) -> dict[str, int]:
    """{path relative to url: size} of every file below url (empty when there is none)."""
    fs, root = filesystem(url)
    found = retrying(url, lambda: fs.find(root, detail=True) if _exists(fs, root) else {})
    return {posixpath.relpath(p, root.rstrip("/")): int(info["size"])
            for p, info in found.items() if info.get("type") != "directory"}


def sha256(url: str) -> str:
    """The sha256 of a file's bytes, read in blocks (a remote file is streamed, not kept)."""
    fs, path = filesystem(url)

    def digest() -> str:
        h = hashlib.sha256()
        with fs.open(path, "rb", block_size=8 << 20) if not isinstance(fs, LocalFileSystem) else open(path, "rb") as f:
            while block := f.read(8 << 20):
                h.update(block)
        return h.hexdigest()
    return retrying(url, digest)


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url))


def listdir(url: str) -> list[str]:
    """Names (not paths) of the entries directly under url; empty if it does not exist."""
    fs, path = filesystem(url)
    names = retrying(url, lambda: fs.ls(path, detail=False) if _exists(fs, path) else [])
    return sorted(posixpath.basename(p.rstrip("/")) for p in names)


def makedirs(url: str) -> None:
    fs, path = filesystem(url)
    fs.makedirs(path, exist_ok=True)


def remove(url: str, recursive: bool = False) -> None:
    fs, path = filesystem(url)
    retrying(url, lambda: fs.rm(path, recursive=recursive) if _exists(fs, path) else None)


def upload(local: str, url: str) -> None:
    """Copy the local directory's files under url (retried as a whole: a rewrite of the same files)."""
    fs, remote = filesystem(url)
    retrying(url, lambda: fs.put(local.rstrip("/") + "/", remote, recursive=True), f"the upload to {url}")


def disk_full(err: OSError, path: str) -> StorageError | None:
    """A StorageError saying the disk is full, naming path, when err is ENOSPC (or EDQUOT); else None."""
    if getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return StorageError(f"{path}: no space left on the device (disk full); free space there and run the "
                            f"same command again")
    return None


@contextmanager
def atomic_open(url: str, mode: str = "wb") -> Iterator[IO]:
    """Open url for writing; the file becomes visible under its name only if the block completes."""
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            with open(tmp, mode) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as err:
            raise disk_full(err, path) or err
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    f = fs.open(path, mode)
    try:
        yield f
    except BaseException:
        discard = getattr(f, "discard", None)  # s3fs/gcsfs: abort the multipart upload
        if discard is not None:
            discard()
        else:
            f.close()
            fs.rm(path)
        raise
    f.close()


def write_bytes(url: str, data: bytes) -> None:
    def write() -> None:
        with atomic_open(url, "wb") as f:
            f.write(data)
    retrying(url, write)


def write_json(url: str, obj: Any) -> None:
    """Deterministic JSON (sorted keys, fixed indent), written atomically."""
    write_bytes(url, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


_copies: str | None = None  # this process's downloads; another process may see the URL rewritten (--force)


def local_copy(url: str, keep: Callable[[str], bool] = lambda rel: True) -> str:
    """A local directory holding url's files (url itself when local; else downloaded once per process,
    into a temporary directory removed at exit). `keep(relative path)` picks the files to fetch."""
    global _copies
    if is_local(url):
        return filesystem(url)[1]
    if _copies is None:
        _copies = tempfile.mkdtemp(prefix="gpt2-pipeline-copies-")
        atexit.register(shutil.rmtree, _copies, True)
    fs, remote = filesystem(url)
    target = os.path.join(_copies, re.sub(r"[^\w.-]", "_", url))
    for path in retrying(url, lambda: fs.find(remote)):
        rel = os.path.relpath(path, remote)
        local = os.path.join(target, rel)
        if keep(rel) and not os.path.exists(local):
            os.makedirs(os.path.dirname(local), exist_ok=True)
            try:
                retrying(url, lambda: fs.get(path, local + ".part"))  # a download cut short is never taken for the file
            except OSError as err:
                raise disk_full(err, local) or err
            os.replace(local + ".part", local)
    return target


def check(url: str, write: bool = True) -> None:
    """Fail fast with a one-line StorageError when url's storage cannot be used: an unreachable endpoint,
    a missing bucket, missing credentials or denied permission. With write, a probe object of its own
    name is written and removed under url, so nothing already there is touched."""
    if is_local(url):
        return
    try:
        fs, path = filesystem(url)
        retrying(url, lambda: fs.ls(path.split("/")[0], detail=False))  # the bucket: exists, reachable, ...
        if write:
            probe = f"{path.rstrip('/')}/.write-check-{uuid.uuid4().hex[:12]}"
            retrying(url, lambda: fs.pipe_file(probe, b""))
            retrying(url, lambda: fs.rm(probe))
    except StorageUnavailable:
        raise
    except Exception as err:
        raise StorageError(f"{url}: {explain(err)}") from None


def explain(err: BaseException) -> str:
    """What a storage client's exception means, in one line (botocore and cloud SDKs, by class name)."""
    names = {c.__name__ for c in type(err).__mro__}
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200].strip()
    if names & {"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError", "RefreshError"}:
        return (f"no credentials for the storage ({first}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                f"(or a profile), or GOOGLE_APPLICATION_CREDENTIALS")
    if names & {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionError", "ClientConnectorError",
                 "ReadTimeoutError"}:
        return f"cannot reach the storage endpoint ({first}); check AWS_ENDPOINT_URL and the network"
    if isinstance(err, PermissionError):
        return f"permission denied ({first}); the credentials may not read and write here"
    if isinstance(err, FileNotFoundError):
        return f"not found ({first}); create the bucket first"
    return f"{type(err).__name__}: {first}"
