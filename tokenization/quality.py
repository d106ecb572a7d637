"""Document quality rules after Gopher (Rae et al. 2021, appendix A: quality and repetition filters) and
C4 (Raffel et al. 2020), as datatrove's GopherQualityFilter / GopherRepetitionFilter / C4QualityFilter
state them; each threshold is a key of tokenization.quality. `failed_rule` names the first rule a
document fails, which the manifest counts with examples.

Written here rather than taken from datatrove: its filters need its whole pipeline framework (and
NLTK for word splitting) inside every tokenizer actor for a dozen lines of arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import repeat
from typing import Literal

import numpy as np
import pandas as pd

from pipeline.core.config import QualityConfig
from tokenization import ngrams

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
MAX_DOCUMENTS = 4096  # per batch: the repetition rules' sort key holds the document's number in 12 bits
_BULLETS = ("•", "●", "○", "■", "□", "▪", "▫", "–", "-", "*", "·")
_ELLIPSES = ("...", "…")
_STOP_WORD_HASHES = ngrams.Words.of([" ".join(sorted(STOP_WORDS))]).hashes
# Each code point's class. Gopher's words are str.split()'s: runs of non-whitespace (str.isspace, no
# whitespace lies above U+3000); a word "has a letter" if it holds A-Z, a-z or a non-ASCII character
# outside Latin-1's punctuation (U+0080-U+00BF) and the General Punctuation block (U+2000-U+206F).
_OTHER, _SPACE, _LETTER = 0, 1, 2
_CLASS = np.zeros(0x110000, dtype=np.uint8)
for _first, _last in ((ord("A"), ord("Z")), (ord("a"), ord("z")), (0xC0, 0x1FFF), (0x2070, 0x10FFFF)):
    _CLASS[_first:_last + 1] = _LETTER
_CLASS[[c for c in range(0x3001) if chr(c).isspace()]] = _SPACE


# rule -> what the manifest and the summary call it
RULES = {
    "too_few_words": "fewer than quality.min_words words",
    "too_many_words": "more than quality.max_words words",
    "mean_word_length": "mean word length outside quality.min/max_mean_word_length",
    "symbol_ratio": "'#' and ellipses per word above quality.max_symbol_word_ratio",
    "bullet_lines": "bullet lines above quality.max_bullet_lines",
    "ellipsis_lines": "lines ending in an ellipsis above quality.max_ellipsis_lines",
    "alpha_words": "words with a letter below quality.min_alpha_words",
    "stop_words": "fewer stop words than quality.min_stop_words",
    "duplicate_lines": "repeated lines above quality.max_duplicate_lines",
    "top_2gram": "most frequent 2-gram's characters above quality.max_top_2gram",
    "duplicate_5grams": "repeated 5-grams' characters above quality.max_duplicate_5grams",
    "c4_lorem_ipsum": "'lorem ipsum' (C4)",
    "c4_curly_bracket": "a curly bracket (C4)",
}


def failed_rules(texts: Sequence[str], q: QualityConfig, words: ngrams.Words) -> list[str | None]:
    """The first rule each text fails, or None; words: the texts' ngrams.Words (for the stop words and the
    repetition rules, which compare normalized words). The word counts and letters are numpy over the
    whole batch (its texts' code point classes); what reads lines runs per document, and only for a
    document that passed the rules before it; the repetition rules, which sort every document's n-grams,
    run (numpy, over the batch) only on the documents that passed all the others."""
    kind = _CLASS[np.frombuffer("\n".join(texts).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)]
    first_char = np.cumsum([0] + [len(t) + 1 for t in texts[:-1]])  # "\n" (whitespace) between texts
    space = np.ones(len(kind) + 2, dtype=bool)  # padded with whitespace at each end
    space[1:-1] = kind == _SPACE
    edges = np.flatnonzero(space[1:] != space[:-1])
    starts, ends = edges[0::2], edges[1::2]  # each whitespace-separated word is the batch's [start:end]
    bounds = np.append(np.searchsorted(starts, first_char), len(starts))
    n = np.diff(bounds)
    non_space = _per_document(~space[1:-1], np.append(first_char, len(kind)))
    has_letter = np.cumsum(np.concatenate([[0], kind == _LETTER]))
    alpha = _per_document(has_letter[ends] > has_letter[starts], bounds)
    is_stop = _STOP_WORD_HASHES[:, None] == words.hashes  # (stop words, words)
    stop = (np.stack([_per_document(row, words.bounds) for row in is_stop]) > 0).sum(axis=0)  # distinct ones
    failed = [_word_or_line_failure(text, q, int(n[d]), non_space[d] / max(n[d], 1), alpha[d], stop[d])
              for d, text in enumerate(texts)]

    passed = np.array([rule is None for rule in failed], dtype=bool)
    if passed.any():
        rest = words.select(passed)
        chars = _per_document(rest.lengths, rest.bounds)
        for d, *counts in zip(np.flatnonzero(passed), chars, _top_ngram_chars(rest, 2), _repeated_ngram_chars(rest, 5)):
            failed[d] = _repetition_or_c4_failure(texts[d], q, *counts)
    return failed


def _word_or_line_failure(text: str, q: QualityConfig, n: int, mean: float, alpha: int, stop: int) -> str | None:
    if n < q.min_words or n == 0:
        return "too_few_words"
    if n > q.max_words:
        return "too_many_words"
    if not q.min_mean_word_length <= mean <= q.max_mean_word_length:
        return "mean_word_length"
    if (text.count("#") + text.count("...") + text.count("…")) / n > q.max_symbol_word_ratio:
        return "symbol_ratio"
    lines = list(filter(None, map(str.strip, text.splitlines())))  # C loops: no Python call per line
    if lines and sum(map(str.startswith, lines, repeat(_BULLETS))) / len(lines) > q.max_bullet_lines:
        return "bullet_lines"
    if lines and sum(map(str.endswith, lines, repeat(_ELLIPSES))) / len(lines) > q.max_ellipsis_lines:
        return "ellipsis_lines"
    if alpha / n < q.min_alpha_words:
        return "alpha_words"
    if stop < q.min_stop_words:
        return "stop_words"
    if lines and (len(lines) - len(set(lines))) / len(lines) > q.max_duplicate_lines:
        return "duplicate_lines"
    return None


def _repetition_or_c4_failure(text: str, q: QualityConfig, chars: int, top_2gram: int, repeated_5grams: int) -> str | None:
    if chars and top_2gram / chars > q.max_top_2gram:
        return "top_2gram"
    if chars and repeated_5grams / chars > q.max_duplicate_5grams:
        return "duplicate_5grams"
    if q.c4_rules:
        if "lorem ipsum" in text.lower():
            return "c4_lorem_ipsum"
        if "{" in text or "}" in text:
            return "c4_curly_bracket"
    return None


def _per_document(values: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """The sum of values[bounds[d]:bounds[d + 1]] for each document d."""
    total = np.concatenate([[0], np.cumsum(values, dtype=np.int64)])
    return total[bounds[1:]] - total[bounds[:-1]]


def _keys_within_documents(words: ngrams.Words, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The n-grams' (keys, first words), in order: a key is equal for equal n-grams of one document. It keeps
    the hash's top 52 bits under the document's number: two different n-grams of one document share a key
    with odds of about m^2 / 2^53 for m n-grams."""
    if len(words) > MAX_DOCUMENTS:
        raise ValueError(f"{len(words)} documents in one batch: at most {MAX_DOCUMENTS} fit the n-gram key")
    grams, first = words.ngrams(n)
    return (words.doc_of(first).astype(np.uint64) << np.uint64(52)) | (grams >> np.uint64(12)), first


def _repeats(keys: np.ndarray, keep: Literal["first", False]) -> np.ndarray:
    """pandas' hash table marks repeated keys (all but the first of each, or all) in one pass: several times
    faster than sorting them."""
    return pd.Series(keys, copy=False).duplicated(keep=keep).to_numpy()


def _top_ngram_chars(words: ngrams.Words, n: int) -> np.ndarray:
    """Per document: characters in all occurrences of its most frequent n-gram (0 when none repeats);
    between equally frequent ones, the smallest hash's (the same in every run)."""
    top = np.zeros(len(words), dtype=np.int64)
    keys, first = _keys_within_documents(words, n)
    repeated = _repeats(keys, keep=False)  # only n-grams that occur twice or more can be the top one
    keys, first = keys[repeated], first[repeated]
    if len(keys) == 0:
        return top
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    run = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))  # each distinct n-gram's first
    count = np.diff(np.append(run, len(keys)))
    run_doc = (keys[run] >> np.uint64(52)).astype(np.int64)
    doc_first_run = np.flatnonzero(np.concatenate([[True], run_doc[1:] != run_doc[:-1]]))
    most = np.maximum.reduceat(count, doc_first_run)  # per document that has repeated n-grams
    best = np.flatnonzero(count == np.repeat(most, np.diff(np.append(doc_first_run, len(run)))))
    best = best[np.concatenate([[True], run_doc[best][1:] != run_doc[best][:-1]])]  # its smallest hash
    at = first[order[run[best]]]  # an occurrence: every occurrence has the same words, so the same length
    top[run_doc[best]] = count[best] * sum(words.lengths[at + k].astype(np.int64) for k in range(n))
    return top


def _repeated_ngram_chars(words: ngrams.Words, n: int) -> np.ndarray:
    """Per document: characters of the words covered by an n-gram that occurred earlier in it (each word once)."""
    keys, first = _keys_within_documents(words, n)
    starts = first[_repeats(keys, keep="first")]  # +1 where a repeated n-gram starts, -1 past its end
    size = len(words.hashes) + 1
    cover = np.bincount(starts, minlength=size) - np.bincount(starts + n, minlength=size)
    covered = np.cumsum(cover[:-1]) > 0
    return _per_document(np.where(covered, words.lengths, 0), words.bounds)
