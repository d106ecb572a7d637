"""The loss head on the CPU: our chunked cross-entropy (pipeline/core/model/gpt2.py ChunkedCrossEntropy)
against plain F.cross_entropy on the full logits, forward + backward, time and peak memory.

    python bench/loss_head.py [--rows 8192] [--vocab 50304] [--embd 768] [--steps 3]

Each variant runs in a fresh subprocess: its peak resident memory (the kernel's max RSS, which sees
torch's allocations where tracemalloc does not) minus its resident memory once the inputs exist is the
memory the head adds. fp32, as CPU training runs. Liger-Kernel's head (model.loss_impl=liger) needs
CUDA: bench/gpu.py measures it against ours on the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core.model.gpt2 import ChunkedCrossEntropy  # noqa: E402

VOCAB = 50257  # GPT-2's; the weight's rows are padded above it


def one(variant: str, rows: int, vocab: int, embd: int, steps: int) -> dict:
    """Time and added peak memory of one head, in this (fresh) process."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, embd, generator=g).requires_grad_(True)
    w = (torch.randn(vocab, embd, generator=g) * 0.02).requires_grad_(True)
    targets = torch.randint(0, VOCAB, (rows,), generator=g)

    def step() -> float:
        x.grad = w.grad = None
        if variant == "chunked":
            loss = ChunkedCrossEntropy.apply(x, w, targets, VOCAB, 4096)
        else:  # every logit of the batch, the padding rows masked, then cross-entropy
            logits = x @ w.t()
            logits[:, VOCAB:] = float("-inf")
            loss = F.cross_entropy(logits, targets)
        loss.backward()
        return loss.item()

    base = psutil.Process().memory_info().rss
    step()  # the gradients' buffers now exist, as they do in training
    base_with_grads = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    seconds = (time.perf_counter() - t0) / steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    return {"variant": variant, "rows": rows, "vocab": vocab, "embd": embd, "s": seconds, "loss": loss,
            "peak_over_inputs_gib": (peak - base) / 2**30, "grads_gib": (base_with_grads - base) / 2**30,
            "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8 * 1024, help="tokens (micro-batch x sequence): 8 x 1024")
    parser.add_argument("--vocab", type=int, default=50304, help="the padded vocabulary")
    parser.add_argument("--embd", type=int, default=768)
    parser.add_argument("--steps", type=int, default=3, help="timed forward + backward passes (after one warm-up)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(one(args.one, args.rows, args.vocab, args.embd, args.steps)), flush=True)
        return 0
    results = {}
    for variant in ("plain", "chunked"):
        cmd = [sys.executable, __file__, "--one", variant, "--rows", str(args.rows), "--vocab", str(args.vocab),
               "--embd", str(args.embd), "--steps", str(args.steps)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ)
        results[variant] = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    p, c = results["plain"], results["chunked"]
    print(f"{args.rows} rows x vocabulary {args.vocab} x {args.embd}, fp32, {p['threads']} threads, forward + backward:")
    for r in (p, c):
        print(f"  {r['variant']:>8}: {r['s']:.2f} s, peak {r['peak_over_inputs_gib']:.2f} GiB over the inputs "
              f"(of which the gradients {r['grads_gib']:.2f} GiB), loss {r['loss']:.6f}")
    print(f"  chunked / plain: time {c['s'] / p['s']:.2f}x, memory {c['peak_over_inputs_gib'] / p['peak_over_inputs_gib']:.2f}x, "
          f"|loss difference| {abs(c['loss'] - p['loss']):.1e}")
    print("RESULTS " + json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
