"""Token shards and their manifest: the contract between tokenization and everything downstream.

A shard is llm.c's format, so llm.c and modded-nanogpt read ours too: a header of 256 little-endian
int32 (magic 20240520, version 1, token count, zeros), then the tokens as little-endian uint16. Every
document is preceded by <|endoftext|> (50256), so every shard starts with it.

`manifest.json` beside the shards names each shard with its split, token and document counts and
sha256 (and, for a mixture of data.sources, its source: shards are cut per source and split, named
SOURCE-SPLIT_NNNNNN.bin, and a `sources` list holds each source's input and counts); readers check each header against it, and `verify` re-hashes every shard. Training reads a
remote split (s3://, gs://) through one verified copy per node (`node_copy`), memory-mapped, so no
process holds the dataset in RAM and a node fetches each shard once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from pipeline.core import storage
from pipeline.core.command import UserError
from pipeline.core.config import SOURCE_NAME
from pipeline.core.storage import join

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
SPLITS = ("train", "val")


class ShardError(UserError, ValueError):
    """A shard or manifest that does not match what it claims to be; the message names the file."""


@dataclass(frozen=True)
class ShardInfo:
    file: str
    split: str
    tokens: int
    documents: int
    sha256: str
    source: str | None = None  # the data.sources name; None without data.sources


def header(num_tokens: int) -> bytes:
    h = np.zeros(HEADER_INTS, dtype="<i4")
    h[0], h[1], h[2] = MAGIC, VERSION, num_tokens
    return h.tobytes()


def parse_header(raw: bytes, name: str) -> int:
    """Token count from a shard header; raises ShardError naming the shard if it is not one."""
    if len(raw) < HEADER_BYTES:
        raise ShardError(f"{name}: {len(raw)} bytes, shorter than the {HEADER_BYTES}-byte header")
    h = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    if h[0] != MAGIC:
        raise ShardError(f"{name}: magic {h[0]} is not {MAGIC}; not an llm.c token shard")
    if h[1] != VERSION:
        raise ShardError(f"{name}: version {h[1]} is not {VERSION} (uint16 GPT-2 tokens)")
    return int(h[2])


def write_shard(url: str, chunks: Iterable[np.ndarray], num_tokens: int) -> str:
    """Write a shard of exactly num_tokens tokens from uint16 chunks, atomically; returns its sha256."""
    digest = hashlib.sha256()
    written = 0
    with storage.atomic_open(url) as f:
        for part in (header(num_tokens), *(np.ascontiguousarray(c, dtype=TOKEN_DTYPE) for c in chunks)):
            data = memoryview(part).cast("B") if isinstance(part, np.ndarray) else part
            digest.update(data)
            f.write(data)
            written += len(data)
        if written != HEADER_BYTES + 2 * num_tokens:
            raise ShardError(f"{url}: wrote {(written - HEADER_BYTES) // 2} tokens, header says {num_tokens}")
    return digest.hexdigest()


def read_tokens(url: str, expected_tokens: int | None = None) -> np.ndarray:
    """A shard's tokens (memory-mapped when local), after checking its header and size."""
    fs, path = storage.filesystem(url)
    if not fs.exists(path):
        raise ShardError(f"{url}: shard missing")
    with fs.open(path, "rb") as f:
        count = parse_header(f.read(HEADER_BYTES), url)
    if expected_tokens is not None and count != expected_tokens:
        raise ShardError(f"{url}: header says {count} tokens, manifest says {expected_tokens}")
    actual = fs.size(path)
    if actual != HEADER_BYTES + 2 * count:
        raise ShardError(f"{url}: {actual} bytes, header says {count} tokens "
                         f"({HEADER_BYTES + 2 * count} bytes); truncated or corrupt")
    if storage.is_local(url):
        return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(count,))
    return np.frombuffer(fs.cat_file(path, start=HEADER_BYTES), dtype=TOKEN_DTYPE)


def sha256_of(url: str, chunk: int = 8 << 20) -> str:
    fs, path = storage.filesystem(url)
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# --- manifest -----------------------------------------------------------------------------------

def load_manifest(dataset_dir: str) -> dict:
    url = join(dataset_dir, MANIFEST)
    if not storage.exists(url):
        raise ShardError(f"{url}: no manifest; is {dataset_dir} a tokenized dataset?")
    try:
        manifest = json.loads(storage.read_bytes(url))
    except ValueError as err:
        raise ShardError(f"{url}: not a JSON manifest ({err})") from None
    validate_manifest(manifest, url)
    return manifest


_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")  # a bare name: no separator, no "..", nothing hidden


def validate_manifest(manifest: object, url: str) -> None:
    """Refuse a manifest any of whose fields could mislead a reader: it names files that are read, and
    hashes that name node-cache paths, so it is checked as hostile input before anything uses it."""
    def fail(field: str, message: str, value: object) -> None:
        raise ShardError(f"{url}: {field}: {message} (got {value!r:.80})")

    if not isinstance(manifest, dict):
        fail("manifest", "must be a JSON object", type(manifest).__name__)
    if manifest.get("format_version") != MANIFEST_VERSION:
        raise ShardError(f"{url}: manifest format_version {manifest.get('format_version')!r}, "
                         f"this code reads {MANIFEST_VERSION}")
    entries = manifest.get("shards")
    if not isinstance(entries, list):
        fail("shards", "must be a list", entries)
    names = _validate_sources(manifest["sources"], fail) if "sources" in manifest else None
    fields = set(ShardInfo.__dataclass_fields__) - ({"source"} if names is None else set())
    for i, entry in enumerate(entries):
        where = f"shards[{i}]"
        if not isinstance(entry, dict) or set(entry) != fields:
            fail(where, f"must be an object with exactly {', '.join(sorted(fields))}", entry)
        name = entry["file"]
        if not isinstance(name, str) or not _FILE_NAME.match(name) or ".." in name:
            fail(f"{where}.file", "must be a bare file name inside the dataset directory", name)
        if entry["split"] not in SPLITS:
            fail(f"{where}.split", f"must be one of {', '.join(SPLITS)}", entry["split"])
        for key in ("tokens", "documents"):
            if not _count(entry[key]):
                fail(f"{where}.{key}", "must be a non-negative integer", entry[key])
        if not isinstance(entry["sha256"], str) or not _SHA256.match(entry["sha256"]):
            fail(f"{where}.sha256", "must be 64 lowercase hex digits", entry["sha256"])
        if names is not None and entry["source"] not in names:
            fail(f"{where}.source", "must be one of the manifest's sources", entry["source"])
    for split, totals in (manifest.get("totals") or {}).items():
        for key, value in (totals.items() if isinstance(totals, dict) else [("", totals)]):
            if not _count(value):
                fail(f"totals.{split}.{key}".rstrip("."), "must be a non-negative integer", value)
    for reason, value in (manifest.get("skipped") or {}).items():
        if not _count(value):
            fail(f"skipped.{reason}", "must be a non-negative integer", value)
    if "input_documents" in manifest and not _count(manifest["input_documents"]):
        fail("input_documents", "must be a non-negative integer", manifest["input_documents"])


def _validate_sources(sources: object, fail) -> set[str]:
    """The names of a manifest's `sources` list, each entry checked: a name that becomes part of file names,
    counts that are counts."""
    keys = {"name", "input", "documents", "tokens", "shards"}
    if not isinstance(sources, list) or not sources:
        fail("sources", "must be a non-empty list", sources)
    names: set[str] = set()
    for i, entry in enumerate(sources):
        where = f"sources[{i}]"
        if not isinstance(entry, dict) or set(entry) != keys:
            fail(where, f"must be an object with exactly {', '.join(sorted(keys))}", entry)
        name = entry["name"]
        if not isinstance(name, str) or not SOURCE_NAME.match(name) or name in names:
            fail(f"{where}.name", "must be a distinct source name (lowercase letters, digits, _ and -)", name)
        names.add(name)
        if not isinstance(entry["input"], dict):
            fail(f"{where}.input", "must be an object", entry["input"])
        for key in ("documents", "tokens", "shards"):
            counts = entry[key]
            if not isinstance(counts, dict) or set(counts) != set(SPLITS):
                fail(f"{where}.{key}", f"must be an object with exactly {', '.join(SPLITS)}", counts)
            for split, value in counts.items():
                if not _count(value):
                    fail(f"{where}.{key}.{split}", "must be a non-negative integer", value)
    return names


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def manifest_hash(dataset_dir: str) -> str:
    """sha256 of the manifest file: names the exact dataset a checkpoint was trained on."""
    return hashlib.sha256(storage.read_bytes(join(dataset_dir, MANIFEST))).hexdigest()


def source_names(manifest: dict) -> list[str]:
    """The data.sources a dataset was cut from, in config order; [] for a dataset of data.input alone."""
    return [s["name"] for s in manifest.get("sources", [])]


def shards(manifest: dict, split: str | None = None, source: str | None = None) -> list[ShardInfo]:
    """The manifest's shards, in order: all, or those of one split and/or one source."""
    if source is not None and source not in source_names(manifest):
        known = ", ".join(source_names(manifest)) or "none: the dataset is not a mixture of data.sources"
        raise ShardError(f"source '{source}' is not in the dataset (sources: {known})")
    return [ShardInfo(**s) for s in manifest["shards"]
            if (split is None or s["split"] == split) and (source is None or s.get("source") == source)]


def local_split(dataset_dir: str, split: str, cache: str | None = None, source: str | None = None,
                manifest: dict | None = None) -> list[tuple[str, int]]:
    """(local path, token count) of every shard of a split (of one source, when given), header-checked
    against the manifest (read here unless given), in manifest order: local shards where they are,
    remote ones as this node's copy in `cache`."""
    local, out = storage.is_local(dataset_dir), []
    for info in shards(manifest or load_manifest(dataset_dir), split, source):
        url = join(dataset_dir, info.file)
        path = storage.filesystem(url)[1] if local else node_copy(url, info, cache or default_cache())
        read_tokens(path, info.tokens)  # header and size against the manifest
        out.append((path, info.tokens))
    return out


def read_split(dataset_dir: str, split: str, cache: str | None = None, source: str | None = None) -> list[np.ndarray]:
    """Every shard of a split (of one source, when given), header-checked and memory-mapped (see local_split)."""
    return [np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(n,))
            for path, n in local_split(dataset_dir, split, cache, source)]


# --- one copy per node ----------------------------------------------------------------------------

def default_cache() -> str:
    return os.path.join(tempfile.gettempdir(), "gpt2-pipeline", "shards")


def node_copy(url: str, info: ShardInfo, cache: str) -> str:
    """Local path of a verified copy of the remote shard `url`, shared by every process of the node.

    The copy is named by the manifest's sha256, so a restart, or another run on the same data, reuses
    it. A file lock lets one process of the node download while the others wait for it. A copy is
    hashed against the manifest before first use, and again whenever its size or modification time
    differ from when it was verified: a truncated or rewritten copy is fetched again, never read.
    """
    os.makedirs(cache, exist_ok=True)
    path = os.path.join(cache, f"{info.sha256}.bin")
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if _still_verified(path, info):
            return path
        fs, remote = storage.filesystem(url)
        part = f"{path}.part"
        fs.get_file(remote, part)
        actual = sha256_of(part)
        if actual != info.sha256:
            os.remove(part)
            raise ShardError(f"{url}: sha256 {actual} does not match the manifest's {info.sha256}")
        os.replace(part, path)
        _mark_verified(path)
    return path


def _stat(path: str) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def _mark_verified(path: str) -> None:
    with open(f"{path}.verified", "w") as f:
        json.dump(_stat(path), f)


def _still_verified(path: str, info: ShardInfo) -> bool:
    if not os.path.exists(path):
        return False
    try:
        with open(f"{path}.verified") as f:
            if json.load(f) == _stat(path):
                return True
    except (OSError, ValueError):
        pass
    if sha256_of(path) == info.sha256:  # changed since, or never marked: hash it again
        _mark_verified(path)
        return True
    os.remove(path)
    return False


def verify(dataset_dir: str, threads: int = 4) -> list[str]:
    """Check every shard's presence, header, size and sha256 against the manifest.

    Returns one line per failing shard (empty when all are intact).
    """
    manifest = load_manifest(dataset_dir)

    def check(info: ShardInfo) -> str | None:
        url = join(dataset_dir, info.file)
        try:
            read_tokens(url, info.tokens)
            actual = sha256_of(url)
        except (ShardError, OSError) as err:
            return f"{info.file}: {err}"
        if actual != info.sha256:
            return f"{info.file}: sha256 {actual} does not match the manifest's {info.sha256}"
        return None

    with ThreadPoolExecutor(threads) as pool:  # hashlib releases the GIL on large blocks
        return [r for r in pool.map(check, shards(manifest)) if r is not None]


def splits_as_datasets(dataset_dir: str) -> list[dict]:
    """The splits of a tokenized dataset as MLflow datasets (pipeline/core/lineage.Lineage.log_datasets): named by
    corpus and split (by source and split for a mixture of data.sources), the manifest's sha256 as digest,
    its URL as source, each split's counts as profile."""
    manifest, digest = load_manifest(dataset_dir), manifest_hash(dataset_dir)
    if "sources" in manifest:
        parts = [(s["name"], {split: {key: s[key][split] for key in ("tokens", "documents", "shards")}
                              for split in SPLITS}) for s in manifest["sources"]]
    else:
        source = manifest.get("source", {})
        corpus = {"hf": f"hf:{source.get('repo')}", "builtin": "builtin"}.get(source.get("kind"),
                                                                              source.get("kind", "files"))
        parts = [(corpus, manifest["totals"])]
    return [{"name": f"{corpus}/{split}", "digest": digest, "source": join(dataset_dir, MANIFEST),
             "context": {"train": "training", "val": "validation"}.get(split, split),
             "profile": {"corpus": corpus, **totals}}
            for corpus, splits in parts for split, totals in splits.items()]
