"""What curation costs: tokenization with exact + near dedup, quality rules and the contamination count
against plain tokenization of the same corpus, side by side in one run (same Ray, alternating).

    python bench/curation_throughput.py [--tokens 8e6] [--repeats 2]

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

PLAIN = ["tokenization.dedup=false", "tokenization.decontaminate=off"]
CURATED = ["tokenization.near_dedup=true", "tokenization.quality.enabled=true", "tokenization.decontaminate=count"]


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=float, default=8e6)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    cores = os.cpu_count()
    with tempfile.TemporaryDirectory() as tmp:
        sizes = {}
        for label, tokens in (("small", args.tokens), ("large", 3 * args.tokens)):
            (Path(tmp) / label).mkdir()
            build_corpus(Path(tmp) / label, tokens)
        ray.init(address="local", num_cpus=cores, include_dashboard=False, logging_level="WARNING")
        times = {(kind, label): [] for kind in ("plain", "curated") for label in ("small", "large")}
        peaks = {"plain": [0, 0], "curated": [0, 0]}
        for r in range(args.repeats):  # alternate, so both see the same machine state
            for label in ("small", "large"):
                for kind, overrides in (("plain", PLAIN), ("curated", CURATED)):
                    seconds, peak, manifest = run(Path(tmp) / label, f"{tmp}/out-{kind}-{label}-{r}", overrides)
                    times[kind, label].append(seconds)
                    peaks[kind] = [max(peaks[kind][0], peak.worker), max(peaks[kind][1], peak.driver)]
                    if kind == "plain":
                        sizes[label] = sum(t["tokens"] for t in manifest["totals"].values())
                    else:
                        curation = manifest["curation"]
        ray.shutdown()
    extra = sizes["large"] - sizes["small"]
    marginal = {kind: statistics.median(extra / (large - small) for small, large in
                                        zip(times[kind, "small"], times[kind, "large"]))
                for kind in ("plain", "curated")}
    print(f"machine: {platform.processor() or platform.machine()}, {cores} CPUs, {cores} tokenizer actors; "
          f"corpora {sizes['small'] / 1e6:.1f}M and {sizes['large'] / 1e6:.1f}M input tokens")
    for kind in ("plain", "curated"):
        print(f"{kind:8s} marginal {marginal[kind] / 1e6:.2f}M tokens/s; wall s small "
              + ", ".join(f"{s:.1f}" for s in times[kind, "small"]) + "; large "
              + ", ".join(f"{s:.1f}" for s in times[kind, "large"])
              + f"; peak RSS per actor {peaks[kind][0] / 2**20:.0f} MiB, driver {peaks[kind][1] / 2**20:.0f} MiB")
    print(f"curated/plain marginal throughput: {marginal['curated'] / marginal['plain']:.2f} (aim >= 0.5)")
    print("last curated run removed: " + ", ".join(
        f"{k} {curation[k]['documents']}" for k in ("exact_duplicates", "near_duplicates"))
        + f", quality {sum(curation['quality']['failed'].values())}"
        + f", contaminated (counted) {curation['contamination'].get('train_documents')}")


if __name__ == "__main__":
    main()
