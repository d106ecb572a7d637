"""Tokens/s of the full training stack against a plain PyTorch loop, side by side in one run.

    python bench/train_throughput.py [--steps 30] [--warmup 5] [--cpus 2]
    python bench/train_throughput.py --guards [--steps 200]

Full stack: Ray Train's TorchTrainer, one worker, DeepSpeed (ZeRO stage from the config), our loader,
metrics and LR schedule; its per-step times come from the run's metrics.jsonl. Plain loop: the same
GPT, batch, data and AdamW in this process with as many threads as the worker has CPUs (--cpus, the
worker's cluster.cpus_per_worker). Both exclude start-up and the first --warmup steps.
Target: full stack / plain >= 0.95.

--guards: the cost of the bad-step guard (train/engine.train_step: the loss summed over ranks before the last
backward pass, the last loss scaled by 1 or NaN) on the step. One DeepSpeed engine in this process takes
steps through train_step and through the bare DeepSpeed calls of the same step (forward, backward, step,
then the loss sum's all-reduce, as the loop did before the guard) in pairs, ordered ABBA, so both see the
same machine state; the ratio of the medians is the guard's cost, and the spread of the pairs' ratios says
how far to trust it. Target: guarded / bare >= 0.99.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import ray
import torch

from pipeline.core import cluster
from pipeline.core.config import load_config
from pipeline.core.model.gpt2 import GPT
from pipeline.core.tracking import read_jsonl
from tokenization import job
from train import launch
from train.data import ShardLoader
from train.engine import gpt_config, lr_at, param_groups

OVERRIDES = ["model.n_layer=4", "model.n_head=4", "model.n_embd=256", "model.block_size=256",
             "batch.seq_len=256", "batch.micro_batch_size=8", "batch.tokens_per_step=8192",
             "cluster.num_workers=1", "eval.interval=0", "checkpoint.interval=100000",
             "train.warmup_steps=10"]


def plain_loop(cfg, steps: int) -> list[float]:
    """Seconds per optimizer step of the textbook loop."""
    torch.set_num_threads(int(cfg.cluster.cpus_per_worker))
    torch.manual_seed(cfg.run.seed)
    model = GPT(gpt_config(cfg))
    opt = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr,
                            betas=tuple(cfg.train.betas), eps=cfg.train.eps)
    loader = ShardLoader(cfg.data_dir, cfg.batch.seq_len, cfg.run.seed)
    per_step, micro = cfg.batch.tokens_per_step // cfg.batch.seq_len, cfg.batch.micro_batch_size
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        for i in range(0, per_step, micro):
            x, y = loader.sequences(step * per_step + i, micro)
            _, loss = model(x, y)
            (loss * micro / per_step).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - t0)
    return times


def guard_cost(cfg, steps: int) -> tuple[list[float], list[float]]:
    """Seconds per step through train_step (guarded) and through the bare DeepSpeed calls, in pairs ordered
    guarded-bare, bare-guarded, ... (ABBA), so that neither kind always runs right after the other."""
    import torch.distributed as dist

    from train import engine as engines

    torch.set_num_threads(int(cfg.cluster.cpus_per_worker))
    engines.local_process_group(use_gpu=False)
    engine = engines.initialize(cfg, world_size=1)
    loader = ShardLoader(cfg.data_dir, cfg.batch.seq_len, cfg.run.seed)
    per_step, micro, cpu = cfg.batch.tokens_per_step // cfg.batch.seq_len, cfg.batch.micro_batch_size, torch.device("cpu")

    def bare(batches) -> torch.Tensor:
        loss_sum = torch.zeros(())
        for x, y in batches:
            loss = engine(x, y)[1]
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach().float()
        dist.all_reduce(loss_sum)
        return loss_sum

    times: dict[str, list[float]] = {"guarded": [], "bare": []}
    for step in range(2 * steps):
        kind = ("guarded", "bare", "bare", "guarded")[step % 4]
        batches = [loader.sequences(step * per_step + i, micro) for i in range(0, per_step, micro)]
        engines.set_lr(engine, lr_at(step, cfg))
        t0 = time.perf_counter()
        loss = engines.train_step(engine, batches, cpu)[0] if kind == "guarded" else bare(batches)
        loss.item()
        times[kind].append(time.perf_counter() - t0)
    return times["guarded"], times["bare"]


def full_stack(cfg) -> list[float]:
    launch.run(cfg)
    return [r["train/step_time_s"] for r in read_jsonl(cfg.metrics_file) if "train/step_time_s" in r]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--cpus", type=int, default=2, help="the worker's CPUs = the plain loop's threads")
    parser.add_argument("--guards", action="store_true", help="measure the bad-step guard's cost instead")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if args.guards:
        with tempfile.TemporaryDirectory() as tmp:
            cluster.connect()  # the tokenization job's Ray
            cfg = load_config("smoke", OVERRIDES + [f"cluster.cpus_per_worker={args.cpus}"], {"run.root": tmp})
            cfg = cfg.with_absolute_paths()
            job.run(cfg, log=lambda *_: None)
            guarded_s, bare_s = (t[args.warmup:] for t in guard_cost(cfg, args.steps))
            ray.shutdown()
        guarded, bare = statistics.median(guarded_s), statistics.median(bare_s)
        pairs = sorted(b / g for g, b in zip(guarded_s, bare_s))  # each pair's throughput ratio
        quartiles = statistics.quantiles(pairs, n=4)
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads; model: {' '.join(OVERRIDES[:3])}, ZeRO-{cfg.deepspeed.zero_stage}, fp32")
        print(f"step with the bad-step guard: {guarded * 1000:.1f} ms, without: {bare * 1000:.1f} ms (medians of "
              f"{args.steps - args.warmup} each, ABBA pairs); guarded / bare throughput: {bare / guarded:.4f} "
              f"(target >= 0.99); per pair: median {statistics.median(pairs):.4f}, quartiles "
              f"{quartiles[0]:.4f}-{quartiles[2]:.4f}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        cluster.connect()  # the Ray a user's run gets
        overrides = OVERRIDES + [f"train.max_steps={args.steps}", f"cluster.cpus_per_worker={args.cpus}"]
        base = load_config("smoke", overrides, {"run.root": tmp})
        job.run(base, log=lambda *_: None)
        results: dict[str, list[float]] = {"plain": [], "full": []}
        for i, kind in enumerate(["plain", "full", "plain", "full"]):
            cfg = base.model_copy(update={"run": base.run.model_copy(update={"name": f"bench{i}"})})
            cfg = cfg.model_copy(update={"tokenization": cfg.tokenization.model_copy(
                update={"output": base.with_absolute_paths().data_dir})}).with_absolute_paths()
            times = plain_loop(cfg, args.steps) if kind == "plain" else full_stack(cfg)
            results[kind].append(cfg.batch.tokens_per_step / statistics.median(times[args.warmup:]))
        ray.shutdown()
    plain, full = statistics.median(results["plain"]), statistics.median(results["full"])
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"(plain loop threads: {torch.get_num_threads()})")
    print(f"model: {' '.join(OVERRIDES[:3])}, {base.batch.tokens_per_step} tokens/step, "
          f"ZeRO-{base.deepspeed.zero_stage}, fp32")
    print(f"plain PyTorch loop: {plain:,.0f} tokens/s  runs: " + ", ".join(f"{x:,.0f}" for x in results["plain"]))
    print(f"Ray Train + DeepSpeed, 1 worker: {full:,.0f} tokens/s  runs: " + ", ".join(f"{x:,.0f}" for x in results["full"]))
    print(f"ratio full stack / plain: {full / plain:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
