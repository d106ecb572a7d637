"""Validation loss after N steps: our trainer's data order against nanoGPT's uniform sampler, side by side.

    python bench/data_order.py [--steps 200] [--seeds 1337 4242] [--arms uniform ours old]

Corpus: English prose (the built-in corpus) followed by Python source (the standard library's modules),
in that order, tokenized into many shards of 50k tokens: a corpus that arrives sorted by kind. Model:
GPT-2 with 4 layers, 4 heads, 256 wide, context 256, 8 sequences per step, AdamW lr 1e-3, 20 warm-up
steps then cosine to 10% (train/engine.py's schedule and parameter groups), fp32, on the CPU.
Every arm has the same initialisation, optimizer, schedule and validation tokens; only which windows
each step trains on differs:
  uniform: nanoGPT's get_batch, windows at uniform random starts over the concatenated train tokens
  ours:    train/data.py's ShardLoader, the global order the trainer uses (tests/test_train.py holds
           the Ray Train + DeepSpeed stack equal to this plain loop on the same loader)
  old:     the shard-by-shard order train/data.py had before (loaded from git at OLD_COMMIT)
Target: ours / uniform <= 1.01.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import ray
import torch

from eval import val_loss
from pipeline.core.config import load_config
from pipeline.core.model.gpt2 import GPT
from tokenization import builtin, job, shards
from train import engine
from train.data import ShardLoader

OLD_COMMIT = "306d9b1"  # the last commit with the shard-by-shard order
REPO = Path(__file__).resolve().parents[1]


def old_loader_class():
    source = subprocess.run(["git", "show", f"{OLD_COMMIT}:train/data.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    module = sys.modules["old_data"] = types.ModuleType("old_data")  # dataclasses look their module up
    exec(compile(source, f"{OLD_COMMIT}:train/data.py", "exec"), module.__dict__)
    return module.ShardLoader


def sorted_corpus(root: Path) -> list[Path]:
    prose = [text for _, text in builtin.documents()]
    stdlib = os.path.dirname(os.__file__)
    code = [open(f, encoding="utf-8", errors="replace").read() for f in sorted(glob.glob(f"{stdlib}/*.py"))]
    files = []
    for name, docs in (("prose", prose), ("code", code)):
        files.append(root / f"{name}.jsonl")
        files[-1].write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    return files


def train(cfg, batch_at, val_x, val_y) -> float:
    """A plain PyTorch loop; batch_at(step) gives (x, y). Returns the validation loss at the end."""
    torch.manual_seed(cfg.run.seed)
    model = GPT(engine.gpt_config(cfg))
    opt = torch.optim.AdamW(engine.param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr,
                            betas=tuple(cfg.train.betas), eps=cfg.train.eps)
    for step in range(cfg.train.max_steps):
        for group in opt.param_groups:
            group["lr"] = engine.lr_at(step, cfg)
        x, y = batch_at(step)
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return val_loss.evaluate(lambda idx, tgt: model(idx, tgt)[1], val_x, val_y, 16, torch.device("cpu"))["loss"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 4242])
    parser.add_argument("--arms", nargs="+", default=["uniform", "ours", "old"], choices=["uniform", "ours", "old"])
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    with tempfile.TemporaryDirectory() as tmp:
        files = sorted_corpus(Path(tmp))
        data = f"{tmp}/data"
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
        job.run(load_config("smoke", ["tokenization.shard_tokens=50000"],
                            {"data.input": [str(f) for f in files], "tokenization.output": data}), log=lambda *_: None)
        ray.shutdown()
        manifest = shards.load_manifest(data)
        train_tokens = np.concatenate(shards.read_split(data, "train")).astype(np.int64)
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
        totals = manifest["totals"]
        print(f"corpus: {totals['train']['tokens']:,} train tokens in {len(shards.shards(manifest, 'train'))} "
              f"shards (prose, then code), {totals['val']['tokens']:,} val tokens")
        old = old_loader_class()
        rows = []
        for seed in args.seeds:
            cfg = load_config("smoke", [
                "model.n_layer=4", "model.n_head=4", "model.n_embd=256", "model.block_size=256", "batch.seq_len=256",
                "batch.micro_batch_size=8", "batch.tokens_per_step=2048", "train.lr=1e-3",
                f"train.warmup_steps={min(20, args.steps)}", f"train.max_steps={args.steps}", f"run.seed={seed}"])
            T, B = cfg.batch.seq_len, cfg.batch.tokens_per_step // cfg.batch.seq_len
            val_x, val_y = val_loss.val_sequences(data, T, 65536)
            rng = torch.Generator().manual_seed(seed)

            def uniform(step: int):  # nanoGPT's get_batch
                ix = torch.randint(len(train_tokens) - T, (B,), generator=rng)
                x = torch.stack([torch.from_numpy(train_tokens[i:i + T]) for i in ix.tolist()])
                y = torch.stack([torch.from_numpy(train_tokens[i + 1:i + 1 + T]) for i in ix.tolist()])
                return x, y

            ours, before = ShardLoader(data, T, seed), old(data, T, seed)
            result = {"seed": seed}
            arms = {"uniform": uniform, "ours": lambda s: ours.sequences(s * B, B),
                    "old": lambda s: before.sequences(s * B, B)}
            for name in args.arms:
                batch_at = arms[name]
                t0 = time.perf_counter()
                result[name] = train(cfg, batch_at, val_x, val_y)
                print(f"seed {seed} {name}: val loss {result[name]:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
            rows.append(result)
        others = [a for a in args.arms if a != "uniform"]
        print("| seed | " + " | ".join(args.arms) + " | " + " | ".join(f"{a} / uniform" for a in others) + " |")
        print("|---" * (1 + len(args.arms) + len(others)) + "|")
        for r in rows:
            print(f"| {r['seed']} | " + " | ".join(f"{r[a]:.4f}" for a in args.arms) + " | "
                  + " | ".join(f"{r[a] / r['uniform']:.4f}" for a in others) + " |")


if __name__ == "__main__":
    main()
