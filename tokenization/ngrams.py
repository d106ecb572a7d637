"""Words and word n-grams as numbers: what exact and near-duplicate detection, the repetition rules and
eval decontamination compare.

A document's words are its lower-cased runs of word characters: ASCII letters and digits and every
non-ASCII character except the General Punctuation block (dashes, curly quotes, ellipses) and Latin-1's
punctuation (and signs); everything else (ASCII punctuation, spacing) separates words, as GPT-3's and
lm-evaluation-harness's decontamination drop punctuation. Each word's hash is a polynomial over its
UTF-8 bytes, then mixed (splitmix64); an n-gram's hash is a polynomial over its words' hashes.

Documents are handled in batches: one numpy pass over a batch's bytes costs about half as much as one
pass per document, whose small arrays spend their time in numpy's per-call overhead. Both polynomials
come from prefix sums, so a word's or an n-gram's hash does not depend on where it sits in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_BASE = 0x100000001B3  # FNV-64's prime; odd, so it has an inverse modulo 2^64 (used below)
_INVERSE = pow(_BASE, -1, 2**64)


def mix(x: np.ndarray) -> np.ndarray:
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


def _polynomials(values: np.ndarray, first: np.ndarray, end: np.ndarray) -> np.ndarray:
    """sum over first <= k < end of values[k] * BASE^(end-1-k), modulo 2^64, for each (first, end) pair:
    (prefix[end] - prefix[first]) * BASE^(end-1), where prefix sums values[k] * BASE^-k."""
    up, down = _powers(len(values) + 1)
    prefix = np.zeros(len(values) + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):  # arithmetic modulo 2^64 is the point
        np.multiply(values, down[:len(values)], out=prefix[1:])
        np.cumsum(prefix[1:], out=prefix[1:])
        return (prefix[end] - prefix[first]) * up[end - 1]


class Words:
    """The words of a batch of documents, end to end: word i has hashes[i] and lengths[i] (its UTF-8
    bytes, uint64), and document d's words are bounds[d]:bounds[d + 1]."""

    def __init__(self, hashes: np.ndarray, lengths: np.ndarray, bounds: np.ndarray):
        self.hashes, self.lengths, self.bounds = hashes, lengths, bounds
        self.counts = np.diff(bounds)  # words per document

    @classmethod
    def of(cls, texts: Sequence[str]) -> Words:
        encoded = [t.lower().encode("utf-8", "replace") for t in texts]
        data = np.frombuffer(b"\n".join(encoded), dtype=np.uint8)  # "\n" is no word byte: no word spans two
        word = np.zeros(len(data) + 2, dtype=bool)  # padded with a separator at each end
        _word_bytes(data, word[1:-1])
        _separate_punctuation(data, word[1:-1])
        edges = np.flatnonzero(word[1:] != word[:-1])
        starts, ends = edges[0::2], edges[1::2]  # each word is data[start:end]
        doc_starts = np.cumsum([0] + [len(e) + 1 for e in encoded[:-1]])
        bounds = np.append(np.searchsorted(starts, doc_starts), len(starts)) if texts else np.zeros(1, dtype=np.int64)
        lengths = (ends - starts).astype(np.uint64)
        with np.errstate(over="ignore"):
            hashes = mix(_polynomials(data, starts, ends) + lengths) if len(starts) else lengths
        return cls(hashes, lengths, bounds)

    def __len__(self) -> int:
        return len(self.counts)

    def document(self, d: int) -> tuple[np.ndarray, np.ndarray]:
        """Document d's (hashes, lengths)."""
        return self.hashes[self.bounds[d]:self.bounds[d + 1]], self.lengths[self.bounds[d]:self.bounds[d + 1]]

    def doc_of(self, word: np.ndarray) -> np.ndarray:
        """The document each word (by its number in the batch) belongs to."""
        return np.searchsorted(self.bounds, word, side="right") - 1

    def ngrams(self, n: int, whole_if_shorter: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(hash, first word) of every run of n consecutive words within one document, in order. A document
        of fewer than n words has none, or with whole_if_shorter one made of all its words."""
        size = np.minimum(n, np.repeat(self.counts, self.counts)) if whole_if_shorter else n
        first = np.flatnonzero(np.arange(len(self.hashes)) + size <= np.repeat(self.bounds[1:], self.counts))
        sizes = size[first] if whole_if_shorter else n
        return _polynomials(self.hashes, first, first + sizes), first

    def select(self, keep: np.ndarray) -> Words:
        """The documents where `keep` (a mask over documents) is set."""
        words = np.repeat(keep, self.counts)
        return Words(self.hashes[words], self.lengths[words], np.concatenate([[0], np.cumsum(self.counts[keep])]))


def _word_bytes(data: np.ndarray, word: np.ndarray) -> None:
    """Set `word` where data (lower-cased UTF-8) holds a-z, 0-9 or a non-ASCII byte. Comparisons, not a
    256-entry table: numpy's fancy indexing costs about 2 ns a byte, a uint8 comparison a tenth of that."""
    np.less(data - np.uint8(ord("a")), 26, out=word)  # uint8 subtraction wraps: each range is one test
    word |= data - np.uint8(ord("0")) < 10
    word |= data >= 0x80


def _separate_punctuation(data: np.ndarray, word: np.ndarray) -> None:
    """Clear `word` on the UTF-8 bytes of U+2000-U+206F (E2 80-81 xx) and of Latin-1's punctuation
    U+00A1-U+00BF (C2 A1-BF), U+00D7 and U+00F7 (C3 97, C3 B7)."""
    at = np.flatnonzero(data[:-1] >= 0xC2)  # one pass over the batch, then only the few non-ASCII lead bytes
    lead, second = data[at], data[at + 1]
    general = at[(lead == 0xE2) & ((second == 0x80) | (second == 0x81))]
    latin = at[((lead == 0xC2) & (second >= 0xA1) & (second <= 0xBF))
               | ((lead == 0xC3) & ((second == 0x97) | (second == 0xB7)))]
    for starts, width in ((general, 3), (latin, 2)):
        for k in range(width):
            word[np.minimum(starts + k, len(word) - 1)] = False
