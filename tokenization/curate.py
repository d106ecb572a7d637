"""What curation decides about each document of a piece, a batch of documents at a time: the quality
rule it fails, and for the documents that pass, their exact-duplicate key, MinHash band keys and the eval
items they share an n-gram with. The corpus-wide choices (which copy stays, which documents are dropped)
come later, in job.py's plan, from what every piece recorded.

A batch is about BATCH_BYTES of text: numpy's per-call cost is then spread over many documents, and the
arrays still fit in a core's cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.core.config import TokenizationConfig
from tokenization import dedup, ngrams, quality
from tokenization.contamination import EvalIndex

BATCH_BYTES = 256 * 1024
BATCH_DOCUMENTS = 1024


@dataclass
class Curated:
    failed: list[str | None]  # per document of the batch: the quality rule it fails, or None (kept)
    keys: np.ndarray  # (kept, 2) uint64 exact-duplicate keys
    bands: np.ndarray  # (kept, bands) uint64 MinHash band keys, (kept, 0) without near dedup
    touched: dict[int, list[int]]  # kept document (its number among the kept) -> eval items it overlaps


def any_curation(tok: TokenizationConfig, index: EvalIndex | None) -> bool:
    """Whether documents are curated at all. With any curation on, a piece carries the exact keys (the
    words are at hand then), so switching dedup alone re-uses every piece; plain tokenization (all off)
    computes no words."""
    return tok.dedup or tok.near_dedup or tok.quality.enabled or index is not None


class Curator:
    def __init__(self, tok: TokenizationConfig, index: EvalIndex | None):
        self.rules = tok.quality if tok.quality.enabled else None
        self.signer = dedup.Signer(tok.near_dedup_ngram, tok.near_dedup_bands, tok.near_dedup_rows) if tok.near_dedup else None
        self.index = index
        self.active = any_curation(tok, index)

    def __call__(self, texts: list[str], utf8: list[bytes]) -> Curated:
        words = ngrams.Words.of(texts)
        failed = quality.failed_rules(texts, self.rules, words) if self.rules else [None] * len(texts)
        keep = np.array([rule is None for rule in failed], dtype=bool)
        if not keep.all():
            words, utf8 = words.select(keep), [u for u, k in zip(utf8, keep) if k]
        keys = dedup.exact_keys(words, utf8)
        bands = self.signer.band_keys(words, keys) if self.signer else np.zeros((len(utf8), 0), dtype=np.uint64)
        return Curated(failed, keys, bands, self.index.touched(words) if self.index else {})
