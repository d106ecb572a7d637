"""Eval contamination: which training documents share a word 13-gram with a HellaSwag item.

The items are the ones the eval stage scores (eval.hellaswag: the bundled smoke items, a file, or the
official validation set), each as its context followed by one ending, four texts per item, bracketed
WikiHow tags removed as lm-evaluation-harness's preprocessing removes them. An item text shorter than n
words is matched whole. Words and n-grams are normalized and hashed as in ngrams.py; the index is two
sorted arrays (n-gram hash, item number), small enough to ship to every tokenizer actor, and a bitmap
each actor builds that lets all but a few percent of a document's n-grams skip the binary search.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from pipeline.core import storage
from tokenization import ngrams
from tokenization.sources import CorpusError

SMOKE = Path(__file__).resolve().parents[1] / "eval" / "data" / "hellaswag_smoke.jsonl"
# where the official validation set comes from, and where the eval stage keeps its verified copy
HUB_REPO, HUB_REVISION, HUB_FILE = "Rowan/hellaswag", "refs/convert/parquet", "default/validation/0000.parquet"


def official_cache(cache_dir: str | None = None) -> Path:
    """The eval stage's copy of the official validation set (hellaswag_val.jsonl)."""
    return Path(cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gpt2-pipeline")


def _locate(spec: str) -> str:
    if spec == "smoke":
        return str(SMOKE)
    if spec != "official":
        return spec
    cached = official_cache() / "hellaswag_val.jsonl"
    if cached.exists():
        return str(cached)
    from huggingface_hub import hf_hub_download  # the same items in the Hub's Parquet layout

    return hf_hub_download(HUB_REPO, HUB_FILE, repo_type="dataset", revision=HUB_REVISION)


def _texts(path: str) -> tuple[list[list[str]], str]:
    """Each item's four texts (context + ending), and the file's sha256."""
    data = storage.read_bytes(path)
    if path.endswith(".parquet"):
        import io

        import pyarrow.parquet as pq

        rows = [(f"{path}: row {n}", r) for n, r in enumerate(pq.read_table(io.BytesIO(data)).to_pylist(), 1)]
    else:
        rows = []
        for n, line in enumerate(data.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((f"{path}:{n}", json.loads(line)))
                except (json.JSONDecodeError, UnicodeDecodeError) as err:
                    raise CorpusError(f"{path}:{n}: not a JSON object ({err})") from None
    items = []
    for where, row in rows:
        try:
            context = row["ctx"] if row.get("ctx") else row["ctx_a"] + " " + row["ctx_b"]
            items.append([re.sub(r"\[.*?\]", " ", f"{context} {ending}") for ending in row["endings"]])
        except (KeyError, TypeError, AttributeError) as err:
            raise CorpusError(f"{where}: not a HellaSwag item ({type(err).__name__}: {err})") from None
    return items, hashlib.sha256(data).hexdigest()


class EvalIndex:
    """The n-grams of the eval items, and the items each belongs to."""

    def __init__(self, spec: str, n: int):
        self.path = _locate(spec)
        item_texts, self.sha256 = _texts(self.path)
        self.spec, self.n, self.items = spec, n, len(item_texts)
        words = ngrams.Words.of([text for texts in item_texts for text in texts])
        owner_of_text = np.repeat(np.arange(len(item_texts), dtype=np.int32), [len(t) for t in item_texts])
        grams, first = words.ngrams(n, whole_if_shorter=True)
        owners = owner_of_text[words.doc_of(first)]
        pairs = np.unique(np.stack([grams, owners.astype(np.uint64)], axis=1), axis=0)  # sorted by n-gram
        self.keys, self.owners = pairs[:, 0].copy(), pairs[:, 1].astype(np.int32)
        self.lengths = sorted(set(np.minimum(n, words.counts[words.counts > 0]).tolist()))
        self._bitmap: np.ndarray | None = None  # built where it is used: not shipped to every actor

    def _maybe(self, grams: np.ndarray) -> np.ndarray:
        """A mask of the n-grams that may be eval n-grams: a bitmap over the hashes' top bits, about 32 bits
        per eval n-gram, so that about 3% of a document's n-grams are looked up in the sorted keys (a
        binary search over a million keys costs more than tokenizing)."""
        shift = np.uint64(64 - max(16, int(np.ceil(np.log2(32 * max(len(self.keys), 1))))))
        if self._bitmap is None:
            top = (self.keys >> shift).astype(np.int64)
            self._bitmap = np.zeros((int(2 ** (64 - int(shift))) + 7) // 8, dtype=np.uint8)
            np.bitwise_or.at(self._bitmap, top >> 3, (1 << (top & 7)).astype(np.uint8))
        top = (grams >> shift).astype(np.int64)
        return (self._bitmap[top >> 3] >> (top & 7).astype(np.uint8)) & 1 == 1

    def describe(self) -> dict:
        return {"eval": "hellaswag", "spec": self.spec, "path": self.path, "sha256": self.sha256,
                "items": self.items, "ngram": self.n}

    def touched(self, words: ngrams.Words) -> dict[int, list[int]]:
        """document -> the items sharing an n-gram with it (ascending), for the documents that share one."""
        found: dict[int, set[int]] = {}
        for size in self.lengths if len(self.keys) else ():
            grams, first = words.ngrams(size)
            maybe = np.flatnonzero(self._maybe(grams))
            lo = np.searchsorted(self.keys, grams[maybe], side="left")
            hi = np.searchsorted(self.keys, grams[maybe], side="right")
            for a, b, doc in zip(lo[hi > lo], hi[hi > lo], words.doc_of(first[maybe[hi > lo]])):
                found.setdefault(int(doc), set()).update(self.owners[a:b].tolist())
        return {doc: sorted(items) for doc, items in sorted(found.items())}
