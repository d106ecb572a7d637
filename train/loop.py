"""The one training loop, run in every Ray Train worker, for every kind of training.

Each worker: join the process group Ray Train set up, find the latest committed checkpoint, build the
DeepSpeed engine (resuming from it), then take optimizer steps over its slice of each global batch until
the schedule's max_steps, evaluating and checkpointing on the way. What differs between pretraining
(train/pretraining.py) and fine-tuning (train/finetuning.py) comes in as a `Recipe`: the model, how a
step's batches are drawn, what "evaluate" means, the schedule and batch shape, where checkpoints and
metrics go. Everything that decides a step's result (data position, learning rate, dropout seed) is a
function of the step number, which is why a restart from a checkpoint repeats the same losses bit for bit.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import psutil
import torch

from pipeline.core.config import Config, Schedule
from pipeline.core.model import checkpoints
from pipeline.core.model.checkpoints import CheckpointError, TrainerState
from pipeline.core.tracking import worker_metrics
from train import checkpoint
from train import engine as engines
from train.data import check_order


@dataclass
class Recipe:
    """What one kind of training brings to the loop. Built in each worker by a `make_recipe(cfg, payload,
    rank, world, device)` of train/pretraining.py or train/finetuning.py."""

    name: str  # "train" or "finetune": the console's prefix
    schedule: Schedule  # lr, warmup_steps, max_steps, weight_decay: cfg.train or cfg.finetune
    batch: engines.Batch  # sequences per step, per micro-batch, their length
    run_dir: str  # metrics.jsonl (and Ray Train's records) go here
    checkpoint_dir: str
    checkpoint_interval: int
    data_id: str  # the data trained on (manifest sha256, task fingerprint): a checkpoint resumes on the same only
    data_source: str  # the data, as the user named it, for messages
    data_order: str = ""  # the order of the data (train/data.py's ORDER), recorded in checkpoints
    tokens_per_step: int | None = None  # exact for pretraining; None where examples are padded per batch

    def model(self) -> torch.nn.Module | None:
        """The model to train when no checkpoint is resumed; None: a fresh GPT from model.*, seeded by run.seed."""
        return None

    def batches(self, sequences: int, rank: int, world: int, micro: int) -> tuple[torch.Tensor, engines.Targets]:
        """This rank's micro-batch `micro` of the step that starts at data position `sequences` (CPU tensors)."""
        raise NotImplementedError

    def step_metrics(self, state: TrainerState) -> dict:
        """Metrics of the kind of training, logged with each step's (train/epoch, ...)."""
        return {}

    def evaluate(self, engine, step: int, last: bool) -> dict:
        """Metrics of an evaluation due at this step (collective: every rank calls it), or {}."""
        return {}

    def result(self, engine) -> dict:
        """What the run returns besides checkpoint, step, loss and tokens (collective)."""
        return {}


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of one rank for one step (dropout): resume needs no saved RNG state."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def train_worker(make_recipe: Callable[..., Recipe], payload: dict) -> dict:
    """Ray Train's train_loop_per_worker (bound to make_recipe by train/launch.fit). payload: {"config":
    Config dump, "tracking": {"uri", "run_id"} of the MLflow run that receives the metrics, or None, and
    what make_recipe reads}."""
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
    recipe = make_recipe(cfg, payload, rank, world, device)
    tracking = payload.get("tracking")
    nodes = _nodes(world)
    say = _speaker(rank, recipe.name)
    say(f"{world} worker(s) on {nodes} node(s), {'nccl' if cfg.cluster.use_gpu else 'gloo'}, "
        f"ZeRO-{cfg.deepspeed.zero_stage}, {engines.precision(cfg)}")
    engine, state = _engine(cfg, recipe, rank, world, tracking["run_id"] if tracking else None, say)
    # one monitor per node (its first local worker), each under system/node_N/: NVML sees all the node's GPUs
    monitor = (_system_metrics(tracking, ctx.get_node_rank())
               if tracking and ctx.get_local_rank() == 0 and cfg.tracking.system_metrics else None)
    try:
        with worker_metrics(recipe.run_dir, rank, tracking, recipe.schedule.max_steps, state.step) as (metrics, publish):
            for url in _train(cfg, recipe, engine, state, metrics, rank, world, device, publish):
                say(f"checkpoint {url}")
            extra = recipe.result(engine)
    finally:
        if monitor is not None:
            monitor.finish()
    return {"checkpoint": checkpoints.latest(recipe.checkpoint_dir), "step": state.step, "loss": state.loss,
            "tokens": state.tokens, "nodes": nodes, **extra}


def _train(cfg: Config, recipe: Recipe, engine, state: TrainerState, metrics, rank: int, world: int,
           device: torch.device, publish_metrics=None) -> Iterator[str]:
    """The steps from state.step to the schedule's end; yields each committed checkpoint's URL."""
    import torch.distributed as dist

    accum = engine.gradient_accumulation_steps()
    max_steps = recipe.schedule.max_steps
    log = _StepLog(cfg, recipe, engine, state, metrics, accum * world, device)
    while state.step < max_steps:
        t0 = time.perf_counter()
        torch.manual_seed(step_seed(cfg.run.seed, state.step, rank))
        lr = engines.lr_at(state.step, cfg, recipe.schedule)
        engines.set_lr(engine, lr)
        batches = (recipe.batches(state.sequences, rank, world, micro) for micro in range(accum))
        loss_sum, grad_norm = engines.train_step(engine, batches, device)
        dist.all_reduce(loss_sum)  # queued on the device: no wait here
        state.step += 1
        state.sequences += recipe.batch.sequences
        state.tokens += recipe.tokens_per_step or 0
        logged = {"train/lr": lr, "train/memory_gb": _memory_gb(device), **recipe.step_metrics(state)}
        if recipe.tokens_per_step:
            logged["train/tokens_seen"] = state.tokens
        log.add(loss_sum, grad_norm, time.perf_counter() - t0, logged)

        last = state.step == max_steps
        checkpoint_due = state.step % recipe.checkpoint_interval == 0 or last
        if checkpoint_due or state.step % cfg.train.log_interval == 0:  # a checkpoint records state.loss
            log.flush()
        scores = recipe.evaluate(engine, state.step, last)
        if scores:
            log.flush()  # this step's metrics before its evaluation's
            metrics.log(scores, state.step)
        if checkpoint_due:
            yield checkpoint.save(engine, engine.module, recipe.checkpoint_dir, state, cfg.checkpoint.keep_last,
                                  before_commit=publish_metrics)  # the metrics up to it are in the run dir first


class _StepLog:
    """Steps whose loss and gradient norm are still on the device: `flush` reads them off in one copy (the one
    wait for the device in train.log_interval steps), logs every step and sets state.loss to the last one's."""

    def __init__(self, cfg: Config, recipe: Recipe, engine, state: TrainerState, metrics, replicas: int,
                 device: torch.device):
        self.cfg, self.recipe, self.engine, self.state, self.metrics = cfg, recipe, engine, state, metrics
        self.replicas = replicas  # micro-batches summed into a step's loss: accumulation steps x workers
        self.world = replicas // engine.gradient_accumulation_steps()
        self.peak = engines.peak_flops(device)
        self.started, self.steps_at_start = time.perf_counter(), state.step
        self.pending: list[tuple[int, torch.Tensor, object, float, dict]] = []

    def add(self, loss_sum: torch.Tensor, grad_norm, host_seconds: float, logged: dict) -> None:
        self.pending.append((self.state.step, loss_sum, grad_norm, host_seconds, logged))

    def flush(self) -> None:
        if not self.pending:
            return
        t0 = time.perf_counter()
        losses = torch.stack([p[1] for p in self.pending]).tolist()
        norms = [p[2] for p in self.pending]
        on_device = [i for i, n in enumerate(norms) if isinstance(n, torch.Tensor)]
        for i, value in zip(on_device, torch.stack([norms[i] for i in on_device]).tolist() if on_device else []):
            norms[i] = value
        # the device's share of these steps' time is the host's time in them plus this wait
        step_time = (sum(p[3] for p in self.pending) + time.perf_counter() - t0) / len(self.pending)
        elapsed, max_steps = time.perf_counter() - self.started, self.recipe.schedule.max_steps
        tokens = self.recipe.tokens_per_step
        for (step, _, _, _, logged), loss_sum, norm in zip(self.pending, losses, norms):
            self.state.loss = loss_sum / self.replicas  # the global batch's mean loss
            eta = elapsed / (self.pending[-1][0] - self.steps_at_start) * (max_steps - step)
            per_step = {"train/loss": self.state.loss, "train/grad_norm": norm, "train/step_time_s": step_time,
                        "train/eta_s": eta, **logged}
            if tokens:
                per_step.update({"train/tokens_per_s": tokens / step_time,
                                 "train/mfu": engines.mfu(self.engine, self.cfg, step_time, self.peak, self.world)})
            self.metrics.log(per_step, step)
        self.pending.clear()


def _engine(cfg: Config, recipe: Recipe, rank: int, world: int, run_id: str | None, say):
    """The DeepSpeed engine and the trainer state: from the latest committed checkpoint when there is one
    (through its universal checkpoint, converted by the launcher, when the number of workers changed),
    else fresh."""
    now = TrainerState(world_size=world, zero_stage=cfg.deepspeed.zero_stage, manifest_sha256=recipe.data_id,
                       data_order=recipe.data_order, run_id=run_id)
    # one decision per job: rank 0 lists the checkpoints, the ranks verify the newest together (falling back
    # past damaged ones) and every rank loads the one chosen, even if another is committed meanwhile or a
    # rank's listing of object storage lags
    resume_from = checkpoint.newest_intact(recipe.checkpoint_dir, rank, world, say)
    model = recipe.model()
    if not resume_from:
        return engines.initialize(cfg, world, model=model, batch=recipe.batch, schedule=recipe.schedule), now
    saved = TrainerState.read(resume_from)
    _check_resumable(saved, now, cfg, recipe, resume_from)
    engine = engines.initialize(cfg, world, load_universal=saved.world_size != world, model=model,
                                batch=recipe.batch, schedule=recipe.schedule)
    checkpoint.load(engine, resume_from, saved, world)
    say(f"resumed from {resume_from} at step {saved.step} ({saved.sequences} sequences consumed)")
    return engine, TrainerState(**{**saved.__dict__, "world_size": world, "run_id": saved.run_id or run_id})


def _check_resumable(saved: TrainerState, now: TrainerState, cfg: Config, recipe: Recipe, url: str) -> None:
    check_order(saved.data_order, url, now.data_order)
    if saved.manifest_sha256 != now.manifest_sha256:
        raise CheckpointError(
            f"{url} was trained on data {saved.manifest_sha256[:12]}, but {recipe.data_source} is "
            f"{now.manifest_sha256[:12]}; resume on the same data or start a new run (run.name)")
    if saved.zero_stage != cfg.deepspeed.zero_stage and saved.world_size == now.world_size:
        raise CheckpointError(
            f"{url} was written with deepspeed.zero_stage={saved.zero_stage}, this run uses "
            f"{cfg.deepspeed.zero_stage}; resume with the same stage")


def _nodes(world: int) -> int:
    """How many Ray nodes the workers run on."""
    import ray
    import torch.distributed as dist

    ids = [None] * world
    dist.all_gather_object(ids, ray.get_runtime_context().get_node_id())
    return len(set(ids))


def _system_metrics(tracking: dict, node: int):
    """CPU, memory, disk, network and GPU use (nvidia-ml-py, the `gpu` extra) of one node, on the training run.
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


def _speaker(rank: int, name: str) -> Callable[[str], None]:
    def say(text: str) -> None:
        if rank == 0:  # write, not print: see pipeline/core/tracking.Console
            sys.stdout.write(f"{name}: {text}\n")
            sys.stdout.flush()
    return say
