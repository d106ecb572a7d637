"""Token shards and their manifest: the contract between tokenization and everything downstream.

A shard is llm.c's format, so llm.c and modded-nanogpt read ours too: a header of 256 little-endian
int32 (magic 20240520, version 1, token count, zeros), then the tokens as little-endian uint16. Every
document is preceded by <|endoftext|> (50256), so every shard starts with it.

`manifest.json` beside the shards names each shard with its split, token and document counts and
sha256; readers check each header against it, and `verify` re-hashes every shard.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from pipeline.core import storage
from pipeline.core.storage import join

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
SPLITS = ("train", "val")


class ShardError(ValueError):
    """A shard or manifest that does not match what it claims to be; the message names the file."""


@dataclass(frozen=True)
class ShardInfo:
    file: str
    split: str
    tokens: int
    documents: int
    sha256: str


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
    manifest = storage.read_json(url)
    if manifest.get("format_version") != MANIFEST_VERSION:
        raise ShardError(f"{url}: manifest format_version {manifest.get('format_version')!r}, "
                         f"this code reads {MANIFEST_VERSION}")
    return manifest


def manifest_hash(dataset_dir: str) -> str:
    """sha256 of the manifest file: names the exact dataset a checkpoint was trained on."""
    return hashlib.sha256(storage.read_bytes(join(dataset_dir, MANIFEST))).hexdigest()


def shards(manifest: dict, split: str | None = None) -> list[ShardInfo]:
    return [ShardInfo(**s) for s in manifest["shards"] if split is None or s["split"] == split]


def read_split(dataset_dir: str, split: str) -> list[np.ndarray]:
    """Every shard of a split, header-checked against the manifest, in manifest order."""
    manifest = load_manifest(dataset_dir)
    return [read_tokens(join(dataset_dir, s.file), s.tokens) for s in shards(manifest, split)]


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
