"""Document quality rules after Gopher (Rae et al. 2021, appendix A: quality and repetition filters) and
C4 (Raffel et al. 2020), as datatrove's GopherQualityFilter / GopherRepetitionFilter / C4QualityFilter
state them; each threshold is a key of tokenization.quality. `failed_rule` names the first rule a
document fails, which the manifest counts with examples.

Written here rather than taken from datatrove: its filters need its whole pipeline framework (and
NLTK for word splitting) inside every tokenizer actor for a dozen lines of arithmetic.
"""

from __future__ import annotations

import numpy as np

from pipeline.core.config import QualityConfig
from tokenization import ngrams

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
_BULLETS = ("•", "●", "○", "■", "□", "▪", "▫", "–", "-", "*", "·")
_STOP_WORD_HASHES = ngrams.word_hashes(" ".join(sorted(STOP_WORDS)))[0]
# Each code point's class. Gopher's words are str.split()'s: runs of non-whitespace (str.isspace, no
# whitespace lies above U+3000); a word "has a letter" if it holds A-Z, a-z or a non-ASCII character
# outside Latin-1's punctuation (U+0080-U+00BF) and the General Punctuation block (U+2000-U+206F).
_OTHER, _SPACE, _LETTER = 0, 1, 2
_CLASS = np.zeros(0x110000, dtype=np.uint8)
for _first, _last in ((ord("A"), ord("Z")), (ord("a"), ord("z")), (0xC0, 0x1FFF), (0x2070, 0x10FFFF)):
    _CLASS[_first:_last + 1] = _LETTER
_CLASS[[c for c in range(0x3001) if chr(c).isspace()]] = _SPACE


def _is_bullet(line: str) -> bool:
    return line.startswith(_BULLETS)


def _ends_in_ellipsis(line: str) -> bool:
    return line.endswith(("...", "…"))


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


def failed_rule(text: str, q: QualityConfig, hashes: np.ndarray, lengths: np.ndarray) -> str | None:
    """The first rule `text` fails, or None; hashes and lengths: its ngrams.word_hashes (for the stop words
    and the repetition rules, which compare normalized words). The word rules read one numpy array of the
    text's code point classes, not a Python list of its words."""
    kind = _CLASS[np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)]
    space = np.ones(len(kind) + 2, dtype=bool)  # padded with whitespace at each end
    space[1:-1] = kind == _SPACE
    edges = np.flatnonzero(space[1:] != space[:-1])
    starts, ends = edges[0::2], edges[1::2]  # each word is text[start:end]
    n = len(starts)
    if n < q.min_words or n == 0:
        return "too_few_words"
    if n > q.max_words:
        return "too_many_words"
    mean = (len(kind) - int(space.sum()) + 2) / n  # the words' characters: all but the whitespace
    if not q.min_mean_word_length <= mean <= q.max_mean_word_length:
        return "mean_word_length"
    if (text.count("#") + text.count("...") + text.count("…")) / n > q.max_symbol_word_ratio:
        return "symbol_ratio"
    lines = [line for line in (raw.strip() for raw in text.splitlines()) if line]
    if lines and sum(map(_is_bullet, lines)) / len(lines) > q.max_bullet_lines:
        return "bullet_lines"
    if lines and sum(map(_ends_in_ellipsis, lines)) / len(lines) > q.max_ellipsis_lines:
        return "ellipsis_lines"
    letters = np.concatenate([[0], np.cumsum(kind == _LETTER)])
    if int(np.count_nonzero(letters[ends] > letters[starts])) / n < q.min_alpha_words:
        return "alpha_words"
    if (_STOP_WORD_HASHES[:, None] == hashes).any(axis=1).sum() < q.min_stop_words:  # distinct stop words present
        return "stop_words"
    if lines and (len(lines) - len(set(lines))) / len(lines) > q.max_duplicate_lines:
        return "duplicate_lines"
    chars = int(lengths.sum())
    if chars and _top_ngram_chars(hashes, lengths, 2) / chars > q.max_top_2gram:
        return "top_2gram"
    if chars and _repeated_ngram_chars(hashes, lengths, 5) / chars > q.max_duplicate_5grams:
        return "duplicate_5grams"
    if q.c4_rules:
        if "lorem ipsum" in text.lower():
            return "c4_lorem_ipsum"
        if "{" in text or "}" in text:
            return "c4_curly_bracket"
    return None


def _top_ngram_chars(hashes: np.ndarray, lengths: np.ndarray, n: int) -> int:
    """Characters in all occurrences of the most frequent n-gram (0 when none repeats)."""
    grams = ngrams.ngram_hashes(hashes, n)
    if len(grams) == 0:
        return 0
    values, counts = np.unique(grams, return_counts=True)
    top = int(np.argmax(counts))  # ties: the smallest hash, so the same in every run
    if counts[top] < 2:
        return 0
    start = int(np.argmax(grams == values[top]))  # its first occurrence
    return int(counts[top] * lengths[start:start + n].sum())


def _repeated_ngram_chars(hashes: np.ndarray, lengths: np.ndarray, n: int) -> int:
    """Characters of the words covered by an n-gram that occurred earlier in the document (each word once)."""
    grams = ngrams.ngram_hashes(hashes, n)
    if len(grams) == 0:
        return 0
    order = np.argsort(grams, kind="stable")  # equal n-grams side by side, the earliest first
    repeat = np.zeros(len(grams), dtype=bool)
    repeat[order[1:][grams[order[1:]] == grams[order[:-1]]]] = True
    starts = np.flatnonzero(repeat)  # +1 where a repeated n-gram starts, -1 past its end
    cover = np.bincount(starts, minlength=len(hashes) + 1) - np.bincount(starts + n, minlength=len(hashes) + 1)
    return int(lengths[np.cumsum(cover[:-1]) > 0].sum())
