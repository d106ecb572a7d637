"""The training loop that runs in every Ray Train worker.

Each worker: join the process group Ray Train set up, find the run's latest committed checkpoint,
build the DeepSpeed engine (resuming from it), then take optimizer steps over its slice of each global
batch until train.max_steps, evaluating and checkpointing on the way. Everything that decides a step's
result (data position, learning rate, dropout seed) is a function of the step number, which is why a
restart from a checkpoint repeats the same losses bit for bit.
"""

from __future__ import annotations

import os
import sys
import time
import warnings

import numpy as np
import psutil
import torch
import torch.nn.functional as F

from pipeline.config import Config
from pipeline.tracking import Console, JsonLines, for_rank
from tokenization.shards import manifest_hash
from train import checkpoint, engine as engines
from train.checkpoint import TrainerState
from train.data import ShardLoader, val_sequences


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of one rank for one step (dropout): resume needs no saved RNG state."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def train_worker(payload: dict) -> dict:
    """Ray Train's train_loop_per_worker. payload: {"config": Config dump, "run_id": tracking run}."""
    import deepspeed
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    checkpoint.forbid_unpickling()
    cfg = Config.model_validate(payload["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    deepspeed.init_distributed(dist_backend="nccl" if cfg.cluster.use_gpu else "gloo")
    if cfg.cluster.use_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    resume_from = checkpoint.latest(cfg.checkpoint_dir)
    state = TrainerState(world_size=world, zero_stage=cfg.deepspeed.zero_stage,
                         manifest_sha256=manifest_hash(cfg.data_dir), run_id=payload.get("run_id"))
    if resume_from:
        saved = TrainerState.read(resume_from)
        _check_resumable(saved, state, cfg, resume_from)
        if saved.world_size != world and rank == 0:
            checkpoint.prepare_universal(resume_from)
        dist.barrier()
    engine = engines.initialize(cfg, world, load_universal=bool(resume_from) and saved.world_size != world)
    model = engine.module
    if resume_from:
        checkpoint.load(engine, resume_from, saved, world)
        state = TrainerState(**{**saved.__dict__, "world_size": world, "run_id": saved.run_id or state.run_id})

    metrics = for_rank(rank, lambda: [Console(cfg.train.max_steps),
                                      *([JsonLines(cfg.metrics_file)] if cfg.metrics_file else [])])
    if resume_from:
        _say(rank, f"resumed from {resume_from} at step {state.step} ({state.sequences} sequences consumed)")
    loader = ShardLoader(cfg.data_dir, cfg.batch.seq_len, cfg.run.seed)
    val_x, val_y = val_sequences(cfg.data_dir, cfg.batch.seq_len, cfg.eval.val_tokens) if cfg.eval.interval else (None, None)
    b = cfg.batch
    global_batch = b.tokens_per_step // b.seq_len
    accum = engine.gradient_accumulation_steps()
    flops_per_step = engines.flops_per_token(model.config, b.seq_len, model.num_params(embeddings=False)) * b.tokens_per_step
    peak = engines.peak_flops(device)
    started, steps_at_start = time.perf_counter(), state.step

    while state.step < cfg.train.max_steps:
        t0 = time.perf_counter()
        torch.manual_seed(step_seed(cfg.run.seed, state.step, rank))
        engines.set_lr(engine, engines.lr_at(state.step, cfg))
        loss_sum = torch.zeros((), device=device)
        grad_norm = None
        for micro in range(accum):
            x, y = loader.micro_batch(state.sequences, global_batch, rank, world, micro, b.micro_batch_size)
            _, loss = engine(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            engine.backward(loss)
            if micro == accum - 1 and engine.zero_optimization_stage() == 0:
                grad_norm = _grad_norm(model)  # ZeRO-0 does not report it; gradients are reduced now
            engine.step()
            loss_sum += loss.detach().float()
        dist.all_reduce(loss_sum)
        loss_value = loss_sum.item() / (accum * world)  # the global batch's mean loss
        if grad_norm is None:
            grad_norm = engine.get_global_grad_norm()
        state.step += 1
        state.sequences += global_batch
        state.tokens += b.tokens_per_step
        state.loss = loss_value
        step_time = time.perf_counter() - t0
        done = state.step - steps_at_start
        eta = (time.perf_counter() - started) / done * (cfg.train.max_steps - state.step)
        metrics.log({"train/loss": loss_value, "train/lr": engines.lr_at(state.step - 1, cfg),
                     "train/grad_norm": None if grad_norm is None else float(grad_norm),
                     "train/tokens_per_s": b.tokens_per_step / step_time,
                     "train/mfu": flops_per_step / step_time / (peak * world) if peak else None,
                     "train/step_time_s": step_time, "train/memory_gb": _memory_gb(device),
                     "train/eta_s": eta, "train/tokens_seen": state.tokens,
                     "train/epoch": loader.order.locate(state.sequences)[0]}, state.step)

        last = state.step == cfg.train.max_steps
        if val_x is not None and (state.step % cfg.eval.interval == 0 or last):
            val_loss, val_tokens = evaluate(engine, val_x, val_y, b.micro_batch_size, rank, world, device)
            metrics.log({"val/loss": val_loss, "val/perplexity": float(np.exp(val_loss)), "val/tokens": val_tokens},
                        state.step)
        if state.step % cfg.checkpoint.interval == 0 or last:
            url = checkpoint.save(engine, model, cfg.checkpoint_dir, state, cfg.checkpoint.keep_last)
            _say(rank, f"checkpoint {url}")

    metrics.close()
    final = checkpoint.latest(cfg.checkpoint_dir)
    dist.barrier()
    return {"checkpoint": final, "step": state.step, "loss": state.loss, "tokens": state.tokens}


def evaluate(engine, x: torch.Tensor, y: torch.Tensor, micro_batch: int, rank: int, world: int,
             device: torch.device) -> tuple[float, int]:
    """Mean cross-entropy over the fixed validation sequences, split across ranks.

    Every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively);
    ranks with fewer sequences pad with ignored targets.
    """
    import torch.distributed as dist

    mine_x, mine_y = x[rank::world], y[rank::world]
    per_rank = -(-len(x) // world)
    passes = -(-per_rank // micro_batch)
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, token count
    engine.eval()
    with torch.no_grad():
        for i in range(passes):
            bx, by = mine_x[i * micro_batch:(i + 1) * micro_batch], mine_y[i * micro_batch:(i + 1) * micro_batch]
            if len(bx) < micro_batch:  # pad to a full batch of ignored rows
                pad = micro_batch - len(bx)
                bx = torch.cat([bx, torch.zeros(pad, x.shape[1], dtype=x.dtype)])
                by = torch.cat([by, torch.full((pad, y.shape[1]), -1, dtype=y.dtype)])
            logits, _ = engine(bx.to(device))
            by = by.to(device)
            totals[0] += F.cross_entropy(logits.float().flatten(0, 1), by.flatten(), ignore_index=-1, reduction="sum")
            totals[1] += (by != -1).sum()
    engine.train()
    dist.all_reduce(totals)
    return (totals[0] / totals[1]).item(), int(totals[1].item())


def _grad_norm(model: torch.nn.Module) -> float:
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return psutil.Process(os.getpid()).memory_info().rss / 2**30


def _check_resumable(saved: TrainerState, now: TrainerState, cfg: Config, url: str) -> None:
    if saved.manifest_sha256 != now.manifest_sha256:
        raise checkpoint.CheckpointError(
            f"{url} was trained on dataset {saved.manifest_sha256[:12]}, but {cfg.data_dir} is "
            f"{now.manifest_sha256[:12]}; resume on the same data or start a new run (run.name)")
    if saved.zero_stage != cfg.deepspeed.zero_stage and saved.world_size == now.world_size:
        raise checkpoint.CheckpointError(
            f"{url} was written with deepspeed.zero_stage={saved.zero_stage}, this run uses "
            f"{cfg.deepspeed.zero_stage}; resume with the same stage")


def _say(rank: int, text: str) -> None:
    if rank == 0:  # write, not print: see pipeline/tracking.Console
        sys.stdout.write(f"train: {text}\n")
        sys.stdout.flush()
