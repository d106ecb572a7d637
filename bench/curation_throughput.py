"""What curation costs: tokenization with exact + near dedup, quality rules and the contamination count
("curated"), and with the defaults alone (exact dedup, contamination counted against the smoke items:
"default"), against plain tokenization of the same corpus, side by side in one run (same Ray, alternating).

    python bench/curation_throughput.py [--tokens 8e6] [--repeats 2]
    python bench/curation_throughput.py --breakdown    # where the time goes, one process, no Ray

Corpus: the built-in prose repeated with a per-copy prefix (bench/tokenize_throughput.py's), at --tokens
and 3x --tokens; every copy after the first is a near duplicate of it, so near dedup has real clusters.
Throughput is input tokens (what plain tokenization writes) per second; marginal = the extra tokens of
the larger corpus over its extra seconds, so start-up and the fixed costs cancel. Peak memory: the
largest resident set of any tokenizer actor, and of the driver (which plans the shards and clusters the
near duplicates), sampled every 50 ms. Aim: curation >= 0.5 of plain's marginal throughput.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psutil
import ray
from tokenize_throughput import build_corpus

from pipeline.core.config import load_config
from tokenization import job

KINDS = {  # plain tokenization; the defaults (exact dedup, contamination counted); everything
    "plain": ["tokenization.dedup=false", "tokenization.decontaminate=off"],
    "default": [],
    "curated": ["tokenization.near_dedup=true", "tokenization.quality.enabled=true"],
}


class PeakMemory:
    """Peak RSS of the driver and of any one Ray worker process while the block runs."""

    def __enter__(self):
        self.driver = self.worker = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        me = psutil.Process()
        while not self._stop.wait(0.05):
            self.driver = max(self.driver, me.memory_info().rss)
            for p in psutil.process_iter(["cmdline"]):
                try:
                    if any("ray::" in part and "PieceTokenizer" in part for part in p.info["cmdline"] or ()):
                        self.worker = max(self.worker, p.memory_info().rss)
                except psutil.Error:
                    pass

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run(corpus: Path, out: str, overrides: list[str]) -> tuple[float, PeakMemory, dict]:
    cfg = load_config("smoke", ["tokenization.val_fraction=0.01", "tokenization.shard_tokens=100000000",
                                "tokenization.piece_bytes=16777216", *overrides],
                      {"data.input": [str(corpus)], "tokenization.output": out})
    with PeakMemory() as peak:
        t0 = time.perf_counter()
        result = job.run(cfg, log=lambda *_: None)
        seconds = time.perf_counter() - t0
    return seconds, peak, result.manifest


def breakdown() -> None:
    """Seconds per step of an actor's work on the built-in documents, one thread, in the batches a
    tokenizer actor curates (curate.BATCH_BYTES of text): what curation adds to tokenizing."""
    from pipeline.core.config import QualityConfig
    from tokenization import builtin, curate, dedup, ngrams, quality, tokenizer
    from tokenization.contamination import EvalIndex

    docs = [text for _, text in builtin.documents()]
    batches, size = [[]], 0
    for text in docs:
        batches[-1].append(text)
        size += len(text.encode())
        if size >= curate.BATCH_BYTES:
            batches.append([])
            size = 0
    encoder, rules = tokenizer.encoding(), QualityConfig(enabled=True)
    signer, index = dedup.Signer(5, 14, 8), EvalIndex("smoke", 13)
    seconds: dict[str, float] = {}

    def timed(step, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        seconds[step] = seconds.get(step, 0.0) + time.perf_counter() - t0
        return out

    for _ in range(3):
        for texts in batches:
            for text in texts:
                timed("tokenize (encode_to_numpy)", encoder.encode_to_numpy, text)
            words = timed("words + hashes (ngrams.Words)", ngrams.Words.of, texts)
            timed("quality rules", quality.failed_rules, texts, rules, words)
            keys = timed("exact keys (blake2b of the words)", dedup.exact_keys, words, [t.encode() for t in texts])
            timed("MinHash bands (datasketch's)", signer.band_keys, words, keys)
            timed("13-gram lookup (contamination)", index.touched, words)
    base = seconds["tokenize (encode_to_numpy)"]
    print(f"{len(docs)} documents in {len(batches)} batches x 3, one thread; seconds per step and as a "
          "multiple of tokenizing:")
    for step, s in seconds.items():
        print(f"  {step:38s} {s:6.2f} s  {s / base:5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=float, default=8e6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--breakdown", action="store_true", help="time each step of an actor's work instead")
    args = parser.parse_args()
    if args.breakdown:
        return breakdown()
    cores = os.cpu_count()
    with tempfile.TemporaryDirectory() as tmp:
        sizes = {}
        for label, tokens in (("small", args.tokens), ("large", 3 * args.tokens)):
            (Path(tmp) / label).mkdir()
            build_corpus(Path(tmp) / label, tokens)
        ray.init(address="local", num_cpus=cores, include_dashboard=False, logging_level="WARNING")
        times = {(kind, label): [] for kind in KINDS for label in ("small", "large")}
        peaks = {kind: [0, 0] for kind in KINDS}
        for r in range(args.repeats):  # alternate, so both see the same machine state
            for label in ("small", "large"):
                for kind, overrides in KINDS.items():
                    seconds, peak, manifest = run(Path(tmp) / label, f"{tmp}/out-{kind}-{label}-{r}", overrides)
                    times[kind, label].append(seconds)
                    peaks[kind] = [max(peaks[kind][0], peak.worker), max(peaks[kind][1], peak.driver)]
                    if kind == "plain":
                        sizes[label] = sum(t["tokens"] for t in manifest["totals"].values())
                    elif kind == "curated":
                        curation = manifest["curation"]
        ray.shutdown()
    extra = sizes["large"] - sizes["small"]
    marginal = {kind: statistics.median(extra / (large - small) for small, large in
                                        zip(times[kind, "small"], times[kind, "large"]))
                for kind in KINDS}
    print(f"machine: {platform.processor() or platform.machine()}, {cores} CPUs, {cores} tokenizer actors; "
          f"corpora {sizes['small'] / 1e6:.1f}M and {sizes['large'] / 1e6:.1f}M input tokens")
    for kind in KINDS:
        print(f"{kind:8s} marginal {marginal[kind] / 1e6:.2f}M tokens/s; wall s small "
              + ", ".join(f"{s:.1f}" for s in times[kind, "small"]) + "; large "
              + ", ".join(f"{s:.1f}" for s in times[kind, "large"])
              + f"; peak RSS per actor {peaks[kind][0] / 2**20:.0f} MiB, driver {peaks[kind][1] / 2**20:.0f} MiB")
    for kind in ("default", "curated"):
        print(f"{kind}/plain marginal throughput: {marginal[kind] / marginal['plain']:.2f}"
              + (" (aim >= 0.5)" if kind == "curated" else ""))
    print(f"load average (1, 5, 15 min) at the end: {os.getloadavg()}")
    print("last curated run removed: " + ", ".join(
        f"{k} {curation[k]['documents']}" for k in ("exact_duplicates", "near_duplicates"))
        + f", quality {sum(curation['quality']['failed'].values())}"
        + f", contaminated (counted) {curation['contamination'].get('train_documents')}")


if __name__ == "__main__":
    main()
