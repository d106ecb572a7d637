"""Eval contamination: which training documents share a word 13-gram with a HellaSwag item.

The items are the ones the eval stage scores (eval.hellaswag: the bundled smoke items, a file, or the
official validation set), each as its context followed by one ending, four texts per item, bracketed
WikiHow tags removed as lm-evaluation-harness's preprocessing removes them. An item text shorter than n
words is matched whole. Words and n-grams are normalized and hashed as in ngrams.py; the index is two
sorted arrays (n-gram hash, item number), small enough to ship to every tokenizer actor.
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
        keys, owners, lengths = [], [], set()
        for item, texts in enumerate(item_texts):
            for text in texts:
                hashes, _ = ngrams.word_hashes(text)
                size = min(n, len(hashes))
                if size:
                    grams = np.unique(ngrams.ngram_hashes(hashes, size))
                    keys.append(grams)
                    owners.append(np.full(len(grams), item, dtype=np.int32))
                    lengths.add(size)
        keys_all = np.concatenate(keys) if keys else np.zeros(0, dtype=np.uint64)
        owners_all = np.concatenate(owners) if owners else np.zeros(0, dtype=np.int32)
        order = np.lexsort((owners_all, keys_all))
        self.keys, self.owners, self.lengths = keys_all[order], owners_all[order], sorted(lengths)

    def describe(self) -> dict:
        return {"eval": "hellaswag", "spec": self.spec, "path": self.path, "sha256": self.sha256,
                "items": self.items, "ngram": self.n}

    def touched(self, hashes: np.ndarray) -> list[int]:
        """The items sharing an n-gram with a document (given its ngrams.word_hashes), ascending."""
        found = []
        for size in self.lengths:
            grams = ngrams.ngram_hashes(hashes, size)
            if len(grams) == 0:
                continue
            lo = np.searchsorted(self.keys, grams, side="left")
            hi = np.searchsorted(self.keys, grams, side="right")
            for a, b in zip(lo[hi > lo], hi[hi > lo]):
                found.append(self.owners[a:b])
        return sorted(set(np.concatenate(found).tolist())) if found else []
