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

from eval import hellaswag, val_loss
from pipeline.core.config import Config
from pipeline.core.model import checkpoints
from pipeline.core.tracking import worker_metrics
from tokenization.shards import manifest_hash
from tokenization.tokenizer import encoding
from train import checkpoint
from train import engine as engines
from pipeline.core.model.checkpoints import TrainerState
from train.data import ORDER, ShardLoader, check_order


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of one rank for one step (dropout): resume needs no saved RNG state."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def train_worker(payload: dict) -> dict:
    """Ray Train's train_loop_per_worker. payload: {"config": Config dump,
    "tracking": {"uri", "run_id"} of the MLflow run that receives the metrics, or None,
    "hellaswag": an object ref to the in-training HellaSwag items, or None}."""
    import ray
    import ray.train
    import ray.train.torch

    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    checkpoints.forbid_unpickling()
    cfg = Config.model_validate(payload["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    engines.init_distributed(cfg.cluster.use_gpu)
    if cfg.cluster.use_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    tracking = payload.get("tracking")
    nodes = _nodes(world)
    _say(rank, f"{world} worker(s) on {nodes} node(s), {'nccl' if cfg.cluster.use_gpu else 'gloo'}, "
               f"ZeRO-{cfg.deepspeed.zero_stage}, {engines.precision(cfg)}")
    engine, state = _engine(cfg, rank, world, tracking["run_id"] if tracking else None)
    # HellaSwag items: read once by the driver (launch._hellaswag), not by every rank
    swag = ray.get(payload["hellaswag"]) if payload.get("hellaswag") is not None else None

    # one monitor per node (its first local worker), each under system/node_N/: NVML sees all the node's GPUs
    monitor = (_system_metrics(tracking, ctx.get_node_rank())
               if tracking and ctx.get_local_rank() == 0 and cfg.tracking.system_metrics else None)
    try:
        with worker_metrics(cfg, rank, tracking, cfg.train.max_steps) as (metrics, publish):
            _train(cfg, engine, state, metrics, rank, world, device, swag, publish)
    finally:
        if monitor is not None:
            monitor.finish()
    return {"checkpoint": checkpoints.latest(cfg.checkpoint_dir), "step": state.step, "loss": state.loss,
            "tokens": state.tokens, "nodes": nodes}


def _nodes(world: int) -> int:
    """How many Ray nodes the workers run on."""
    import ray
    import torch.distributed as dist

    ids = [None] * world
    dist.all_gather_object(ids, ray.get_runtime_context().get_node_id())
    return len(set(ids))


def _engine(cfg: Config, rank: int, world: int, run_id: str | None):
    """The DeepSpeed engine and the trainer state: from the latest committed checkpoint when there is one
    (through its universal checkpoint, converted by the launcher, when the number of workers changed),
    else fresh."""
    state = TrainerState(world_size=world, zero_stage=cfg.deepspeed.zero_stage,
                         manifest_sha256=manifest_hash(cfg.data_dir), data_order=ORDER, run_id=run_id)
    return engine_and_state(cfg, rank, world, state)


def engine_and_state(cfg: Config, rank: int, world: int, state: TrainerState, model: torch.nn.Module | None = None):
    """The DeepSpeed engine around model (default: a fresh GPT) and the trainer state, resumed from the latest
    committed checkpoint in cfg.checkpoint_dir when there is one. state.manifest_sha256 names the data."""
    import torch.distributed as dist

    # one decision per job: rank 0 picks the checkpoint and every rank loads that one, even if another
    # is committed meanwhile or a rank's listing of object storage lags
    chosen = [checkpoints.latest(cfg.checkpoint_dir) if rank == 0 else None]
    dist.broadcast_object_list(chosen, src=0)
    resume_from = chosen[0]
    if not resume_from:
        return engines.initialize(cfg, world, model=model), state
    saved = TrainerState.read(resume_from)
    _check_resumable(saved, state, cfg, resume_from)
    engine = engines.initialize(cfg, world, load_universal=saved.world_size != world, model=model)
    checkpoint.load(engine, resume_from, saved, world)
    _say(rank, f"resumed from {resume_from} at step {saved.step} ({saved.sequences} sequences consumed)")
    return engine, TrainerState(**{**saved.__dict__, "world_size": world, "run_id": saved.run_id or state.run_id})


def _train(cfg: Config, engine, state: TrainerState, metrics, rank: int, world: int, device: torch.device,
           swag: list | None, publish_metrics=None) -> None:
    import torch.distributed as dist

    model, b = engine.module, cfg.batch
    loader = ShardLoader(cfg.data_dir, b.seq_len, cfg.run.seed, cache=cfg.cluster.node_cache)
    val_x, val_y = (val_loss.val_sequences(cfg.data_dir, b.seq_len, cfg.eval.val_tokens)
                    if cfg.eval.interval else (None, None))
    global_batch = b.tokens_per_step // b.seq_len
    accum = engine.gradient_accumulation_steps()
    peak = engines.peak_flops(device)
    started, steps_at_start = time.perf_counter(), state.step

    while state.step < cfg.train.max_steps:
        t0 = time.perf_counter()
        torch.manual_seed(step_seed(cfg.run.seed, state.step, rank))
        lr = engines.lr_at(state.step, cfg)
        engines.set_lr(engine, lr)
        batches = (loader.micro_batch(state.sequences, global_batch, rank, world, micro, b.micro_batch_size)
                   for micro in range(accum))
        loss_sum, grad_norm = engines.train_step(engine, batches, device)
        dist.all_reduce(loss_sum)
        state.loss = loss_sum.item() / (accum * world)  # the global batch's mean loss
        state.step += 1
        state.sequences += global_batch
        state.tokens += b.tokens_per_step
        step_time = time.perf_counter() - t0
        eta = (time.perf_counter() - started) / (state.step - steps_at_start) * (cfg.train.max_steps - state.step)
        metrics.log({"train/loss": state.loss, "train/lr": lr,
                     "train/grad_norm": None if grad_norm is None else float(grad_norm),
                     "train/tokens_per_s": b.tokens_per_step / step_time,
                     "train/mfu": engines.mfu(engine, cfg, step_time, peak, world),
                     "train/step_time_s": step_time, "train/memory_gb": _memory_gb(device),
                     "train/eta_s": eta, "train/tokens_seen": state.tokens,
                     "train/epoch": loader.order.locate(state.sequences)[0]}, state.step)

        last = state.step == cfg.train.max_steps
        if val_x is not None and (state.step % cfg.eval.interval == 0 or last):
            engine.eval()
            val = val_loss.evaluate(lambda idx, tgt: engine(idx, tgt)[1], val_x, val_y, b.micro_batch_size, device, rank, world)
            engine.train()
            metrics.log({f"val/{k}": v for k, v in val.items()}, state.step)
        if swag and (state.step % cfg.eval.hellaswag_interval == 0 or last):
            scores = hellaswag.score(engine, encoding().encode_ordinary, swag, device, model.config.block_size,
                                     rank=rank, world=world, collective=True)
            metrics.log(hellaswag.metrics(swag, scores), state.step)
        if state.step % cfg.checkpoint.interval == 0 or last:
            url = checkpoint.save(engine, model, cfg.checkpoint_dir, state, cfg.checkpoint.keep_last,
                                  before_commit=publish_metrics)  # the metrics up to it are in the run dir first
            _say(rank, f"checkpoint {url}")


def _system_metrics(tracking: dict, node: int):
    """CPU, memory, disk, network and GPU use (nvidia-ml-py, the `gpu` extra) of one node, on the train run.
    Without a GPU or NVML, MLflow leaves the GPU metrics out and logs the rest."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(tracking["run_id"], sampling_interval=10, node_id=f"node_{node}",
                                   tracking_uri=tracking["uri"])
    monitor.start()
    return monitor


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return psutil.Process(os.getpid()).memory_info().rss / 2**30


def _check_resumable(saved: TrainerState, now: TrainerState, cfg: Config, url: str) -> None:
    check_order(saved.data_order, url, now.data_order)  # fine-tuning (train/finetuning.py) records none
    if saved.manifest_sha256 != now.manifest_sha256:
        raise checkpoints.CheckpointError(
            f"{url} was trained on dataset {saved.manifest_sha256[:12]}, but {cfg.data_dir} is "
            f"{now.manifest_sha256[:12]}; resume on the same data or start a new run (run.name)")
    if saved.zero_stage != cfg.deepspeed.zero_stage and saved.world_size == now.world_size:
        raise checkpoints.CheckpointError(
            f"{url} was written with deepspeed.zero_stage={saved.zero_stage}, this run uses "
            f"{cfg.deepspeed.zero_stage}; resume with the same stage")


def _say(rank: int, text: str) -> None:
    if rank == 0:  # write, not print: see pipeline/core/tracking.Console
        sys.stdout.write(f"train: {text}\n")
        sys.stdout.flush()
