"""Tokens/s of the whole tokenization stage against the machine's limit, side by side in one run.

    python bench/tokenize_throughput.py [--tokens 32e6] [--repeats 2]
    python bench/tokenize_throughput.py --readme [--tokens 16e6] [--repeats 2]

--readme: the README's first tokenization command exactly as written, with the defaults it gets (no
--config: production sizes), `python tokenization/run.py --input 'data/*.jsonl.gz' --output runs/web/data`,
run as a user runs it (a fresh process that starts its own Ray) on two corpora of gzipped JSONL, --tokens
and 3x --tokens: the marginal tokens/s (extra tokens over extra seconds, so start-up cancels) against
tiktoken's in-memory limit on the larger corpus, measured alternately in the same run.

Stage: read JSONL from disk, validate, tokenize in Ray Data actors, write shards, sha256, manifest
(Ray already started: cluster start-up is not part of a stage). Limit: tiktoken's
`encode_ordinary_batch` with one thread per core over the same documents already in memory.
The corpus is the built-in prose, repeated with a per-copy prefix (so every document is distinct)
until it holds at least --tokens tokens. Target: stage >= 75% of the limit.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray

from pipeline.core.config import load_config
from tokenization import builtin, job, tokenizer


def build_corpus(root: Path, min_tokens: float, gzipped: bool = False) -> list[str]:
    base = [text for _, text in builtin.documents()]
    per_copy = sum(len(t) for t in tokenizer.encoding().encode_ordinary_batch(base)) + len(base)
    copies = int(min_tokens // per_copy) + 1
    docs = [f"Copy {c}. {text}" for c in range(copies) for text in base]
    per_file = len(docs) // 8 + 1
    for i in range(8):
        with (gzip.open(root / f"part-{i:02d}.jsonl.gz", "wt", compresslevel=1) if gzipped else
              open(root / f"part-{i:02d}.jsonl", "w")) as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in docs[i * per_file:(i + 1) * per_file])
    return docs


README_COMMAND = ["tokenization/run.py", "--input", "data/*.jsonl.gz", "--output", "runs/web/data"]


def readme(args) -> None:
    """The README's command on two corpus sizes: marginal tokens/s against the in-memory limit."""
    cores, enc = os.cpu_count(), tokenizer.encoding()
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        docs = {}
        for label, tokens in (("small", args.tokens), ("large", 3 * args.tokens)):
            (Path(tmp) / label / "data").mkdir(parents=True)
            docs[label] = build_corpus(Path(tmp) / label / "data", tokens, gzipped=True)
        limit, runs = [], {"small": [], "large": []}
        for r in range(args.repeats):  # alternate, so all see the same machine state
            t0 = time.perf_counter()
            n = sum(map(len, enc.encode_ordinary_batch(docs["large"], num_threads=cores))) + len(docs["large"])
            limit.append(n / (time.perf_counter() - t0))
            for label in runs:
                cwd = Path(tmp) / label
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, str(repo / README_COMMAND[0]), *README_COMMAND[1:]], cwd=cwd,
                                      env={**os.environ, "PYTHONPATH": str(repo)}, capture_output=True, text=True)
                seconds = time.perf_counter() - t0
                if proc.returncode:
                    raise SystemExit(f"the README command failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
                manifest = json.loads((cwd / "runs" / "web" / "data" / "manifest.json").read_text())
                tokens = sum(t["tokens"] for t in manifest["totals"].values())
                runs[label].append((tokens, seconds))
                first_line = proc.stdout.splitlines()[0]
                shutil.rmtree(cwd / "runs")  # the next run does the whole job again
        marginal = [(large[0] - small[0]) / (large[1] - small[1]) for small, large in zip(runs["small"], runs["large"])]
    lim, mrg = statistics.median(limit), statistics.median(marginal)
    print(f"machine: {platform.processor() or platform.machine()}, {cores} CPUs")
    print(f"command (cwd holds data/*.jsonl.gz): python {' '.join(README_COMMAND)}; it printed: {first_line}")
    for label, values in runs.items():
        print(f"{label}: {values[0][0] / 1e6:.1f}M tokens, wall s per run: " + ", ".join(f"{s:.1f}" for _, s in values))
    print(f"limit (encode_ordinary_batch, {cores} threads, in memory): {lim / 1e6:.2f}M tokens/s  runs: "
          + ", ".join(f"{x / 1e6:.2f}M" for x in limit))
    print(f"README command, marginal: {mrg / 1e6:.2f}M tokens/s  runs: " + ", ".join(f"{x / 1e6:.2f}M" for x in marginal))
    print(f"ratio marginal/limit: {mrg / lim:.2f} (target >= 0.75)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=float, default=32e6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--readme", action="store_true", help="the README's command, two corpus sizes")
    args = parser.parse_args()
    if args.readme:
        return readme(args)
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
