"""Words and word n-grams as numbers: what near-duplicate detection, the repetition rules and eval
decontamination compare.

A document's words are its lower-cased runs of word characters: ASCII letters and digits and every
non-ASCII character except the General Punctuation block (dashes, curly quotes, ellipses) and Latin-1's
punctuation (and signs); everything else (ASCII punctuation, spacing) separates words, as GPT-3's and
lm-evaluation-harness's decontamination drop punctuation. Each word's hash is a polynomial over its
UTF-8 bytes, then mixed (splitmix64); an n-gram's hash is a polynomial over its words' hashes. All of it
is numpy over the document's bytes, with no Python loop per word: it runs on every document.
"""

from __future__ import annotations

import numpy as np

_BASE = 0x100000001B3  # FNV-64's prime; odd, so it has an inverse modulo 2^64 (used below)
_INVERSE = pow(_BASE, -1, 2**64)
_WORD_BYTE = np.zeros(256, dtype=bool)
_WORD_BYTE[[*range(ord("a"), ord("z") + 1), *range(ord("0"), ord("9") + 1), *range(0x80, 0x100)]] = True


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: every input bit reaches every output bit."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


_POWERS = (np.ones(1, dtype=np.uint64), np.ones(1, dtype=np.uint64))


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """BASE^i and BASE^-i modulo 2^64 for i < n, from a table grown by doubling."""
    global _POWERS
    if len(_POWERS[0]) < n:
        size = max(n, 2 * len(_POWERS[0]))
        with np.errstate(over="ignore"):
            _POWERS = tuple(np.concatenate([[np.uint64(1)], np.cumprod(np.full(size - 1, b, dtype=np.uint64))])
                            for b in (_BASE, _INVERSE))
    return _POWERS[0][:n], _POWERS[1][:n]


def word_hashes(text: str) -> tuple[np.ndarray, np.ndarray]:
    """(hash, length in bytes) of each word, in order; both uint64 arrays."""
    data = np.frombuffer(text.lower().encode("utf-8", "replace"), dtype=np.uint8)
    word = np.zeros(len(data) + 2, dtype=bool)  # padded with a separator at each end
    word[1:-1] = _WORD_BYTE[data]
    _separate_punctuation(data, word[1:-1])
    edges = np.flatnonzero(word[1:] != word[:-1])
    starts, ends = edges[0::2], edges[1::2]  # each word is data[start:end]
    if len(starts) == 0:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.uint64)
    up, down = _powers(len(data))
    with np.errstate(over="ignore"):  # arithmetic modulo 2^64 is the point
        prefix = np.concatenate([[np.uint64(0)], np.cumsum(data.astype(np.uint64) * down)])
        # sum over the word's bytes of b_k * BASE^(end-1-k): (prefix[end] - prefix[start]) * BASE^(end-1)
        polynomial = (prefix[ends] - prefix[starts]) * up[ends - 1]
        return _mix(polynomial + (ends - starts).astype(np.uint64)), (ends - starts).astype(np.uint64)


def _separate_punctuation(data: np.ndarray, word: np.ndarray) -> None:
    """Clear `word` on the UTF-8 bytes of U+2000-U+206F (E2 80-81 xx) and of Latin-1's punctuation
    U+00A1-U+00BF (C2 A1-BF), U+00D7 and U+00F7 (C3 97, C3 B7)."""
    lead, second = data[:-1], data[1:]
    general = np.flatnonzero((lead == 0xE2) & ((second == 0x80) | (second == 0x81)))
    latin = np.flatnonzero(((lead == 0xC2) & (second >= 0xA1) & (second <= 0xBF))
                           | ((lead == 0xC3) & ((second == 0x97) | (second == 0xB7))))
    for starts, width in ((general, 3), (latin, 2)):
        for k in range(width):
            word[np.minimum(starts + k, len(word) - 1)] = False


def ngram_hashes(hashes: np.ndarray, n: int) -> np.ndarray:
    """The hash of every run of n consecutive words (none when there are fewer than n): the polynomial
    sum over k < n of hashes[i + k] * BASE^(n-1-k), from prefix sums as word_hashes computes its words'."""
    count = len(hashes) - n + 1
    if count <= 0:
        return np.zeros(0, dtype=np.uint64)
    up, down = _powers(len(hashes))
    with np.errstate(over="ignore"):
        prefix = np.concatenate([[np.uint64(0)], np.cumsum(hashes * down)])
        return (prefix[n:] - prefix[:count]) * up[n - 1:]
