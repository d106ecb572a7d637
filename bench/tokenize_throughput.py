"""Tokens/s of the whole tokenization stage against the machine's limit, side by side in one run.

    python bench/tokenize_throughput.py [--tokens 32e6] [--repeats 2]

Stage: read JSONL from disk, validate, tokenize in Ray Data actors, write shards, sha256, manifest
(Ray already started: cluster start-up is not part of a stage). Limit: tiktoken's
`encode_ordinary_batch` with one thread per core over the same documents already in memory.
The corpus is the built-in prose, repeated with a per-copy prefix (so every document is distinct)
until it holds at least --tokens tokens. Target: stage >= 75% of the limit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import ray

from pipeline.core.config import load_config
from tokenization import builtin, job, tokenizer


def build_corpus(root: Path, min_tokens: float) -> list[str]:
    base = [text for _, text in builtin.documents()]
    per_copy = sum(len(t) for t in tokenizer.encoding().encode_ordinary_batch(base)) + len(base)
    copies = int(min_tokens // per_copy) + 1
    docs = [f"Copy {c}. {text}" for c in range(copies) for text in base]
    per_file = len(docs) // 8 + 1
    for i in range(8):
        with open(root / f"part-{i:02d}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in docs[i * per_file:(i + 1) * per_file])
    return docs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=float, default=32e6)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    cores = os.cpu_count()
    enc = tokenizer.encoding()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        docs = build_corpus(corpus, args.tokens)
        ray.init(address="local", num_cpus=cores, include_dashboard=False, logging_level="WARNING")
        limit, stage, tokens = [], [], 0
        for r in range(args.repeats):  # alternate, so both see the same machine state
            t0 = time.perf_counter()
            n = sum(map(len, enc.encode_ordinary_batch(docs, num_threads=cores))) + len(docs)
            limit.append(n / (time.perf_counter() - t0))
            cfg = load_config("smoke", ["tokenization.val_fraction=0.01", "tokenization.shard_tokens=100000000",
                                        "tokenization.piece_bytes=16777216"],
                              {"data.input": [str(corpus)], "tokenization.output": f"{tmp}/out{r}"})
            t0 = time.perf_counter()
            result = job.run(cfg, log=lambda *_: None)
            stage.append(result.tokens / (time.perf_counter() - t0))
            tokens = result.tokens
            assert tokens == n, (tokens, n)
        ray.shutdown()
    lim, stg = statistics.median(limit), statistics.median(stage)
    print(f"machine: {platform.processor() or platform.machine()}, {cores} CPUs; corpus {tokens / 1e6:.1f}M tokens, "
          f"{len(docs)} documents")
    print(f"limit (encode_ordinary_batch, {cores} threads, in memory): {lim / 1e6:.2f}M tokens/s  runs: "
          + ", ".join(f"{x / 1e6:.2f}M" for x in limit))
    print(f"stage (read+tokenize+write+manifest, {cores} Ray workers): {stg / 1e6:.2f}M tokens/s  runs: "
          + ", ".join(f"{x / 1e6:.2f}M" for x in stage))
    print(f"ratio stage/limit: {stg / lim:.2f} (target >= 0.75)")


if __name__ == "__main__":
    main()
