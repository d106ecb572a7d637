"""Duplicate documents: the keys each piece computes per document, and the corpus-wide decision of
which copy stays.

Exact: blake2b-128 of the document's normalized words (ngrams.py: lower-cased, punctuation dropped, so
whitespace, case and punctuation do not tell copies apart), or of its whitespace-collapsed text when it
has no words. Near: MinHash over word n-gram shingles, cut into LSH bands (FineWeb's 14 bands of 8 hashes by default); two documents whose hashes
agree on a whole band are linked, and the connected components of those links (scipy's csgraph) are the
clusters, found by Ray tasks (one per band, then one for the components) that read the pieces' band keys
from the run directory, so the driver never holds them. In both cases the kept document is the first in
the global input order, so the choice depends on the input alone, never on how many workers ran.

The MinHash signatures are datasketch's ("affine32" scheme: the 32-bit shingle hash pre-mixed with
MurmurHash3's finalizer, then a*h + b modulo 2^32 per permutation, from datasketch's own permutations),
computed here as numpy over a batch of documents' shingles, each document's minima taken along its own
columns: datasketch's update_batch would convert every shingle in Python first, which cost more than
tokenizing the document.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np

from pipeline.core import storage
from tokenization import ngrams

_SEED = 1  # fixed: the permutations, hence the signatures, are the same in every process and every run
_BLOCK = 4096  # shingles per step of the signature: bounds the (permutations x shingles) block at 1.8 MB


def exact_keys(words: ngrams.Words, texts: list[bytes]) -> np.ndarray:
    """(documents, 2) uint64: each document's key; texts: the documents' UTF-8 bytes (for those without words)."""
    keys = []
    for d, text in enumerate(texts):
        hashes = words.hashes[words.bounds[d]:words.bounds[d + 1]]
        content = hashes.tobytes() if len(hashes) else b"no words:" + b" ".join(text.split())
        keys.append(hashlib.blake2b(content, digest_size=16).digest())
    return np.frombuffer(b"".join(keys), dtype="<u8").reshape(len(texts), 2)


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer (datasketch's pre-mix), modulo 2^32 as uint32 arithmetic is."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


class Signer:
    """MinHash band keys of documents: `bands` uint64 per document."""

    def __init__(self, ngram: int, bands: int, rows: int):
        from datasketch import MinHash

        self.ngram, self.bands, self.rows = ngram, bands, rows
        # the permutations, drawn from the seed as datasketch draws them, as columns: a block of products is
        # (permutations x shingles), so each permutation's minimum runs along a contiguous row
        self._a, self._b = MinHash(num_perm=bands * rows, seed=_SEED, scheme="affine32").permutations[:, :, None]

    def signatures(self, words: ngrams.Words) -> np.ndarray:
        """(documents, permutations) uint32: datasketch's MinHash(seed=1, scheme="affine32", hashfunc=int)
        .update_batch(shingles).hashvalues, the shingles being a document's word n-gram hashes modulo 2^32
        (one n-gram of all its words when it has fewer); all 2^32 - 1 for a document without words."""
        grams, first = words.ngrams(self.ngram, whole_if_shorter=True)
        mixed = _fmix32((grams & np.uint64(0xFFFFFFFF)).astype(np.uint32))
        doc = words.doc_of(first)
        signatures = np.full((len(self._a), len(words)), np.iinfo(np.uint32).max, dtype=np.uint32)
        buffer = np.empty((len(self._a), min(_BLOCK, len(mixed))), dtype=np.uint32)
        for start in range(0, len(mixed), _BLOCK):
            block = buffer[:, :len(mixed[start:start + _BLOCK])]
            np.multiply(self._a, mixed[start:start + _BLOCK], out=block)  # wraps modulo 2^32, as it should
            np.add(block, self._b, out=block)
            # each document's minimum over its part of the block; repeated shingles change no minimum
            block_doc = doc[start:start + _BLOCK]
            runs = np.flatnonzero(np.concatenate([[True], block_doc[1:] != block_doc[:-1]]))
            ids = block_doc[runs]
            signatures[:, ids] = np.minimum(signatures[:, ids], np.minimum.reduceat(block, runs, axis=1))
        return signatures.T

    def band_keys(self, words: ngrams.Words, exact: np.ndarray) -> np.ndarray:
        """(documents, bands) uint64: a hash of each band's rows of the signature; exact: the documents'
        exact_keys, which key a document without words, so that it never joins a cluster by accident."""
        rows = self.signatures(words).reshape(len(words), self.bands, self.rows).astype(np.uint64)
        keys = band_hash(rows)
        empty = words.counts == 0
        with np.errstate(over="ignore"):
            keys[empty] = ngrams.mix(exact[empty, :1] ^ ngrams.mix(exact[empty, 1:] + np.arange(self.bands, dtype=np.uint64)))
        return keys


def band_hash(rows: np.ndarray) -> np.ndarray:
    """(..., rows) uint64 values -> (...) uint64: a polynomial over a band's values, mixed (ngrams.py's hash);
    the same rows give the same key, and different ones collide with odds of about 2^-64."""
    powers = ngrams.mix(np.arange(1, rows.shape[-1] + 1, dtype=np.uint64)) | np.uint64(1)  # odd: one per row
    with np.errstate(over="ignore"):
        return ngrams.mix((rows * powers).sum(axis=-1, dtype=np.uint64))


def exact_duplicates(keys: np.ndarray) -> np.ndarray:
    """keys: (n, 2) uint64 in global order -> a mask of the documents whose text came earlier."""
    if len(keys) == 0:
        return np.zeros(0, dtype=bool)
    records = np.ascontiguousarray(keys).view([("hi", "<u8"), ("lo", "<u8")]).ravel()
    _, first = np.unique(records, return_index=True)  # a stable sort: the first occurrence of each key
    duplicate = np.ones(len(keys), dtype=bool)
    duplicate[first] = False
    return duplicate


def near_duplicates(index_urls: list[str], candidates: np.ndarray, bands: int) -> np.ndarray:
    """index_urls: the pieces' index files (.npz with `doc_bands`), in global order; candidates: mask of the
    documents to cluster. Returns a mask of the candidates that are not the first of their cluster. The
    work runs as Ray tasks: the driver holds the masks alone."""
    import ray

    mask = ray.put(candidates)
    edges = [ray.remote(num_cpus=1)(band_edges).remote(index_urls, band, mask) for band in range(bands)]
    duplicates = ray.get(ray.remote(num_cpus=1)(clustered_duplicates).remote(mask, *edges))
    duplicate = np.zeros(len(candidates), dtype=bool)
    duplicate[duplicates] = True
    return duplicate


def band_edges(index_urls: list[str], band: int, candidates: np.ndarray) -> np.ndarray:
    """One band over the whole corpus: (2, k) document numbers of candidates that share the band's key,
    each linked to its neighbour in key order (a bucket of m documents becomes a chain of m - 1 links)."""
    keys = np.concatenate([np.load(io.BytesIO(storage.read_bytes(url)), allow_pickle=False)["doc_bands"][:, band]
                           for url in index_urls])
    numbers = np.flatnonzero(candidates)
    keys = keys[numbers]
    order = np.argsort(keys, kind="stable")
    same = np.flatnonzero(keys[order][1:] == keys[order][:-1])
    return np.stack([numbers[order[same]], numbers[order[same + 1]]])


def clustered_duplicates(candidates: np.ndarray, *edges: np.ndarray) -> np.ndarray:
    """The document numbers of the candidates that are not the first of their connected component."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(candidates)
    src, dst = np.concatenate([np.zeros((2, 0), dtype=np.int64), *edges], axis=1)
    graph = coo_matrix((np.ones(len(src), dtype=np.int8), (src, dst)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    first = np.zeros(n, dtype=bool)
    first[np.unique(labels, return_index=True)[1]] = True  # the lowest number: the earliest in input order
    return np.flatnonzero(candidates & ~first)  # documents outside the candidates have no links: alone
