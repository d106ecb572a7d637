"""Duplicate documents: the keys each piece computes per document, and the corpus-wide decision of
which copy stays.

Exact: blake2b-128 of the text with whitespace runs collapsed to one space. Near: MinHash (datasketch)
over word n-gram shingles, cut into LSH bands (FineWeb's 14 bands of 8 hashes by default); two documents
whose hashes agree on a whole band are linked, and the connected components of those links (scipy's
csgraph) are the clusters. In both cases the kept document is the first in the global input order, so
the choice depends on the input alone, never on how many workers ran.
"""

from __future__ import annotations

import hashlib

import numpy as np

from tokenization import ngrams

_SEED = 1  # fixed: the permutations, hence the signatures, are the same in every process and every run


def exact_key(text: str) -> bytes:
    return hashlib.blake2b(" ".join(text.split()).encode(), digest_size=16).digest()


class Signer:
    """MinHash band keys of documents: `bands` uint64 per document."""

    def __init__(self, ngram: int, bands: int, rows: int):
        from datasketch import MinHash

        self.ngram, self.bands, self.rows = ngram, bands, rows
        # the permutations are drawn once from the seed; every document's MinHash reuses them
        self._template = MinHash(num_perm=bands * rows, seed=_SEED, hashfunc=int)

    def band_keys(self, hashes: np.ndarray, exact: bytes) -> np.ndarray:
        """hashes: the document's ngrams.word_hashes; exact: its exact_key."""
        if len(hashes) == 0:  # no words to shingle: a key of its own, so it never joins a cluster by accident
            return np.frombuffer(hashlib.blake2b(exact, digest_size=8 * self.bands).digest(), dtype="<u8").copy()
        shingles = ngrams.ngram_hashes(hashes, min(self.ngram, len(hashes))) & np.uint64(0xFFFFFFFF)
        m = self._template.copy()
        m.update_batch(np.unique(shingles).tolist())
        rows = np.ascontiguousarray(m.hashvalues, dtype="<u8").reshape(self.bands, self.rows)
        return np.array([int.from_bytes(hashlib.blake2b(r.tobytes(), digest_size=8).digest(), "little")
                         for r in rows], dtype=np.uint64)


def exact_duplicates(keys: np.ndarray) -> np.ndarray:
    """keys: (n, 2) uint64 in global order -> a mask of the documents whose text came earlier."""
    if len(keys) == 0:
        return np.zeros(0, dtype=bool)
    records = np.ascontiguousarray(keys).view([("hi", "<u8"), ("lo", "<u8")]).ravel()
    _, first = np.unique(records, return_index=True)  # a stable sort: the first occurrence of each key
    duplicate = np.ones(len(keys), dtype=bool)
    duplicate[first] = False
    return duplicate


def near_duplicates(band_keys: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """band_keys: (n, bands) uint64 in global order; candidates: mask of the documents to cluster.
    Returns a mask of the candidates that are not the first of their cluster."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    index = np.flatnonzero(candidates)
    n = len(index)
    duplicate = np.zeros(len(band_keys), dtype=bool)
    if n < 2:
        return duplicate
    sources, targets = [], []
    for band in range(band_keys.shape[1]):
        keys = band_keys[index, band]
        order = np.argsort(keys, kind="stable")
        same = np.flatnonzero(keys[order][1:] == keys[order][:-1])  # neighbours in sort order sharing a key
        sources.append(order[same])
        targets.append(order[same + 1])
    src, dst = np.concatenate(sources), np.concatenate(targets)
    graph = coo_matrix((np.ones(len(src), dtype=np.int8), (src, dst)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    _, first = np.unique(labels, return_index=True)  # candidates are in global order: first = earliest
    keep = np.zeros(n, dtype=bool)
    keep[first] = True
    duplicate[index[~keep]] = True
    return duplicate
