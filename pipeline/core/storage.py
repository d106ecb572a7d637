"""Files on local disk or object storage (s3://, gs://, any fsspec URL), written atomically.

A reader never sees a half-written file: locally we write to a temporary name in the same directory and
rename; on object stores an object only appears when its upload completes, and a failed upload is
discarded rather than committed. This module imports nothing else of the project.
"""

from __future__ import annotations

import atexit
import json
import os
import posixpath
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.core.command import UserError


class StorageError(UserError, RuntimeError):
    """Storage that cannot be used as configured; the one-line message names the URL and the cause."""


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for a path or URL, and the path within it.

    Without the listings cache: another process (a rank, the driver) writes checkpoints and markers
    under the same prefixes, and a cached listing would hide them from this one.
    """
    return fsspec.core.url_to_fs(url, use_listings_cache=False)


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or a URL (s3://bucket/x) with '/'."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def is_local(url: str) -> bool:
    return isinstance(filesystem(url)[0], LocalFileSystem)


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def size(url: str) -> int:
    fs, path = filesystem(url)
    return fs.size(path)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    return fs.cat_file(path)


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url))


def listdir(url: str) -> list[str]:
    """Names (not paths) of the entries directly under url; empty if it does not exist."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def makedirs(url: str) -> None:
    fs, path = filesystem(url)
    fs.makedirs(path, exist_ok=True)


def remove(url: str, recursive: bool = False) -> None:
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


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
    with atomic_open(url, "wb") as f:
        f.write(data)


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
    for path in fs.find(remote):
        rel = os.path.relpath(path, remote)
        local = os.path.join(target, rel)
        if keep(rel) and not os.path.exists(local):
            os.makedirs(os.path.dirname(local), exist_ok=True)
            fs.get(path, local + ".part")  # a download cut short is never taken for the file
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
        fs.ls(path.split("/")[0], detail=False)  # the bucket: exists, reachable, credentials accepted
        if write:
            probe = f"{path.rstrip('/')}/.write-check-{uuid.uuid4().hex[:12]}"
            fs.pipe_file(probe, b"")
            fs.rm(probe)
    except Exception as err:
        raise StorageError(f"{url}: {explain(err)}") from None


def explain(err: BaseException) -> str:
    """What a storage client's exception means, in one line (botocore and cloud SDKs, by class name)."""
    names = {c.__name__ for c in type(err).__mro__}
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    if names & {"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError", "RefreshError"}:
        return (f"no credentials for the storage ({first}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                f"(or a profile), or GOOGLE_APPLICATION_CREDENTIALS")
    if names & {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionError", "ClientConnectorError"}:
        return f"cannot reach the storage endpoint ({first}); check AWS_ENDPOINT_URL and the network"
    if isinstance(err, PermissionError):
        return f"permission denied ({first}); the credentials may not read and write here"
    if isinstance(err, FileNotFoundError):
        return f"not found ({first}); create the bucket first"
    return f"{type(err).__name__}: {first}"
