"""The one training loop, run in every Ray Train worker, for every kind of training.

Each worker: join the process group Ray Train set up, find the latest committed checkpoint, build the
DeepSpeed engine (resuming from it), then take optimizer steps over its slice of each global batch until
the schedule's max_steps, evaluating and checkpointing on the way. What differs between pretraining
(train/pretraining.py) and fine-tuning (train/finetuning.py) comes in as a `Recipe`: the model, how a
step's batches are drawn, what "evaluate" means, the schedule and batch shape, where checkpoints and
metrics go. Everything that decides a step's result (data position, learning rate, dropout seed) is a
function of the step number, which is why a restart from a checkpoint repeats the same losses bit for bit.

Bad steps: a step whose loss or gradient norm is not finite, or whose loss spikes (above the schedule's
spike_factor times the median of the latest good steps' losses, a window kept in checkpoints), is not applied, on
any rank (train/engine.py's train_step); it is logged with the data it drew (train/bad_step, train/bad_sequence:
the first of the global sequences it drew; it drew the schedule's batch of them). After the schedule's
max_bad_steps of them in a row the workers load the newest intact checkpoint before them whose loss was finite
and skip those steps' data from then on. Skipped steps (skip_steps, and those of such a rollback, recorded in
every later checkpoint) are not taken: their data is passed over, their numbers and the learning rates after
them stay, so a run that skips step 12 takes the same steps 13, 14, ... as a run whose step 12 was bad.
"""

from __future__ import annotations

import bisect
import math
import os
import statistics
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
from train.diagnostics import Diagnostics
from train.faults import Injector


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

    def evaluated(self, step: int, scores: dict) -> None:
        """After an evaluation's scores are logged (rank 0's metrics record holds them); every rank calls it."""

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
    # GPT2_PIPELINE_FAULTS, a testing aid (train/launch.fit hands the driver's to the workers): nothing when unset
    diagnostics = Diagnostics(cfg, recipe, rank, device, tracking, Injector(rank, recipe.run_dir))
    if diagnostics.stopped():  # an earlier attempt ran out of memory: the driver reports it
        return {}
    nodes = _nodes(world)
    say = _speaker(rank, recipe.name)
    say(f"{world} worker(s) on {nodes} node(s), {'nccl' if cfg.cluster.use_gpu else 'gloo'}, "
        f"ZeRO-{cfg.deepspeed.zero_stage}, {engines.precision(cfg)}")
    with diagnostics.guard():
        engine, state = _engine(cfg, recipe, rank, world, tracking["run_id"] if tracking else None, say)
        # one monitor per node (its first local worker), each under system/node_N/: NVML sees all the node's GPUs
        monitor = (_system_metrics(tracking, ctx.get_node_rank())
                   if tracking and ctx.get_local_rank() == 0 and cfg.tracking.system_metrics else None)
        try:
            state, extra = _train_going_back(cfg, recipe, engine, state, tracking, rank, world, device, diagnostics,
                                             say)
        finally:
            if monitor is not None:
                monitor.finish()
    return {"checkpoint": checkpoints.latest(recipe.checkpoint_dir), "step": state.step, "loss": state.loss,
            "tokens": state.tokens, "nodes": nodes, **extra}


def _train_going_back(cfg: Config, recipe: Recipe, engine, state: TrainerState, tracking: dict | None, rank: int,
                      world: int, device: torch.device, diagnostics: Diagnostics,
                      say) -> tuple[TrainerState, dict]:
    """_train to the schedule's end, going back to the last good checkpoint after a streak of bad steps;
    the final state and the recipe's result."""
    went_back = False
    while True:
        try:  # the metrics record is reopened after going back: it drops the steps that are redone (rewind)
            with worker_metrics(recipe.run_dir, rank, tracking, recipe.schedule.max_steps, state.step) as (
                    metrics, publish):
                for url in _train(cfg, recipe, engine, state, metrics, rank, world, device, diagnostics, publish,
                                  say):
                    say(f"checkpoint {url}")
                return state, recipe.result(engine)
        except BadSteps as bad:
            if went_back and not bad.after_good:
                raise CheckpointError(
                    f"{recipe.name}: steps {bad.first}-{bad.last} were bad too, with no good step since going "
                    f"back: the checkpoint's state, not the data, looks broken; resume from an earlier "
                    f"checkpoint, or skip a longer stretch ({recipe.schedule.section}.skip_steps)") from None
            with diagnostics.phase("going back to a checkpoint"):
                state = _go_back(recipe, engine, state, bad, rank, world, say)
            went_back = True


def _train(cfg: Config, recipe: Recipe, engine, state: TrainerState, metrics, rank: int, world: int,
           device: torch.device, diagnostics: Diagnostics, publish_metrics=None,
           say: Callable[[str], None] = lambda _: None) -> Iterator[str]:
    """The steps from state.step to the schedule's end; yields each committed checkpoint's URL. diagnostics:
    the hang watchdog, profiler and fault injection around each step (train/diagnostics.py). Raises
    BadSteps after the schedule's max_bad_steps bad steps in a row."""
    accum = engine.gradient_accumulation_steps()
    max_steps = recipe.schedule.max_steps
    state.skip_steps = merged_ranges(state.skip_steps + [list(r) for r in recipe.schedule.skipped_ranges()])
    skipped = 0
    log = _StepLog(cfg, recipe, engine, state, metrics, accum * world, device, say)
    diagnostics.started(state.step)
    while state.step < max_steps:
        diagnostics.before_step(state.step + 1)
        t0 = time.perf_counter()
        step, first = state.step + 1, state.sequences  # the step about to be taken (as logged), its data position
        if in_ranges(state.skip_steps, step):
            state.step, state.sequences = step, first + recipe.batch.sequences
            log.flush()  # the steps before it are logged first
            metrics.log({"train/skipped_step": 1, "train/skipped_sequence": first}, step)
            skipped += 1
        else:
            torch.manual_seed(step_seed(cfg.run.seed, state.step, rank))
            lr = engines.lr_at(state.step, cfg, recipe.schedule)
            engines.set_lr(engine, lr)
            batches = (recipe.batches(first, rank, world, micro) for micro in range(accum))
            loss_sum, grad_norm = engines.train_step(engine, batches, device, max_loss=log.max_loss,
                                                     fault=diagnostics.injector.loss_factor(step))
            state.step, state.sequences = step, first + recipe.batch.sequences
            state.tokens += recipe.tokens_per_step or 0
            logged = {"train/lr": lr, "train/memory_gb": _memory_gb(device), **recipe.step_metrics(state)}
            if recipe.tokens_per_step:
                logged["train/tokens_seen"] = state.tokens
            log.add(loss_sum, grad_norm, time.perf_counter() - t0, logged, first)

        last = state.step == max_steps
        checkpoint_due = state.step % recipe.checkpoint_interval == 0 or last
        if checkpoint_due or state.step % cfg.train.log_interval == 0:  # a checkpoint records state.loss
            log.flush()
        with diagnostics.phase("an evaluation"):
            scores = recipe.evaluate(engine, state.step, last)
        if scores:
            log.flush()  # this step's metrics before its evaluation's
            metrics.log(scores, state.step)
            recipe.evaluated(state.step, scores)
        if checkpoint_due:
            with diagnostics.phase("a checkpoint save"):  # the metrics up to it are in the run dir first
                url = checkpoint.save(engine, engine.module, recipe.checkpoint_dir, state, cfg.checkpoint.keep_last,
                                      before_commit=publish_metrics)
            yield url
        diagnostics.after_step(state.step)
    diagnostics.finished()
    if skipped or log.bad:
        say(f"{skipped} step(s) skipped ({skipped * recipe.batch.sequences} sequences not trained on), "
            f"{log.bad} bad step(s) not applied")


def merged_ranges(ranges: list[list[int]]) -> list[list[int]]:
    """[first, last] step ranges, sorted, overlapping and adjacent ones joined."""
    out: list[list[int]] = []
    for first, last in sorted(ranges):
        if out and first <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], last)
        else:
            out.append([first, last])
    return out


def in_ranges(ranges: list[list[int]], step: int) -> bool:
    """Whether step lies in one of the merged ranges."""
    i = bisect.bisect_right(ranges, [step, float("inf")]) - 1
    return i >= 0 and ranges[i][0] <= step <= ranges[i][1]


class BadSteps(Exception):
    """The schedule's max_bad_steps bad steps in a row: steps first..last. after_good: whether a good step was
    taken since the steps began (or went back)."""

    def __init__(self, first: int, last: int, after_good: bool):
        super().__init__(f"steps {first}-{last} were bad")
        self.first, self.last, self.after_good = first, last, after_good


def _go_back(recipe: Recipe, engine, state: TrainerState, bad: BadSteps, rank: int, world: int, say) -> TrainerState:
    """Load the newest intact checkpoint before the bad steps whose loss was finite into the engine (collective);
    the state to continue from, which skips their data."""
    # the ranks verify the candidates together and load the one chosen, as a resume does
    url = checkpoint.newest_intact(recipe.checkpoint_dir, rank, world, say, before=bad.first)
    skip = f"{recipe.schedule.section}.skip_steps={bad.first}-{bad.last}"
    saved = TrainerState.read(url) if url else None
    if saved is None or saved.world_size != world:
        raise CheckpointError(
            f"{recipe.name}: steps {bad.first}-{bad.last} were bad ({recipe.schedule.section}.max_bad_steps="
            f"{recipe.schedule.max_bad_steps} in a row) and {recipe.checkpoint_dir} holds no checkpoint of "
            f"{world} worker(s) before them to go back to; skip their data by hand: {skip}")
    checkpoint.load(engine, url, saved, world)
    say(f"steps {bad.first}-{bad.last} were bad: back to {url}; their data is skipped from now on ({skip})")
    return TrainerState(**{**saved.__dict__, "run_id": saved.run_id or state.run_id,
                           "skip_steps": merged_ranges(saved.skip_steps + state.skip_steps + [[bad.first, bad.last]])})


class _StepLog:
    """Steps whose loss and gradient norm are still on the device: `flush` reads them off in one copy (the one
    wait for the device in train.log_interval steps), logs every step, judges it good or bad, adds the good ones'
    losses to state.loss_window and sets state.loss to the last one's. max_loss: the spike bound of the steps
    until the next flush, from the window as it was at the last one (at a checkpoint too, which is why a resume
    from the window saved there bounds the same)."""

    def __init__(self, cfg: Config, recipe: Recipe, engine, state: TrainerState, metrics, replicas: int,
                 device: torch.device, say: Callable[[str], None]):
        self.cfg, self.recipe, self.engine, self.state, self.metrics = cfg, recipe, engine, state, metrics
        self.say = say
        self.bad, self.in_a_row, self.after_good = 0, 0, False  # bad steps; of them, the last ones in a row
        self.first_bad = 0  # the first step of those in a row
        self.replicas = replicas  # micro-batches summed into a step's loss: accumulation steps x workers
        self.world = replicas // engine.gradient_accumulation_steps()
        self.peak = engines.peak_flops(device)
        self.started, self.steps_at_start = time.perf_counter(), state.step
        self.pending: list[tuple[int, torch.Tensor, object, float, dict, int, float | None]] = []
        del state.loss_window[:-recipe.schedule.spike_window]  # the latest ones, should the window have shrunk
        self.max_loss = self._spike_bound()

    def _spike_bound(self) -> float | None:
        """The loss sum above which a step is a spike (schedule.spike_factor x the median of the loss window, on
        the sum's scale), rounded to float32 as the device compares it; None while there is no spike check."""
        schedule, window = self.recipe.schedule, self.state.loss_window
        if schedule.spike_factor is None or len(window) < schedule.spike_window:
            return None
        return float(np.float32(schedule.spike_factor * statistics.median(window) * self.replicas))

    def add(self, loss_sum: torch.Tensor, grad_norm, host_seconds: float, logged: dict, first_sequence: int) -> None:
        """A step taken with self.max_loss as its spike bound."""
        self.pending.append((self.state.step, loss_sum, grad_norm, host_seconds, logged, first_sequence,
                             self.max_loss))

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
        for (step, _, _, _, logged, first, max_loss), loss_sum, norm in zip(self.pending, losses, norms):
            self.state.loss = loss_sum / self.replicas  # the global batch's mean loss
            eta = elapsed / (self.pending[-1][0] - self.steps_at_start) * (max_steps - step)
            per_step = {"train/loss": self.state.loss, "train/grad_norm": norm, "train/step_time_s": step_time,
                        "train/eta_s": eta, **logged}
            if tokens:
                per_step.update({"train/tokens_per_s": tokens / step_time,
                                 "train/mfu": engines.mfu(self.engine, self.cfg, step_time, self.peak, self.world)})
            spike = max_loss is not None and loss_sum > max_loss  # the device's test (train_step), on the same bits
            if math.isfinite(loss_sum) and (norm is None or math.isfinite(norm)) and not spike:
                self.in_a_row, self.after_good = 0, True
                self.state.loss_window.append(self.state.loss)
                del self.state.loss_window[:-self.recipe.schedule.spike_window]
            else:  # not applied (train/engine.py's train_step)
                self.bad, self.in_a_row = self.bad + 1, self.in_a_row + 1
                self.first_bad = step if self.in_a_row == 1 else self.first_bad
                per_step.update({"train/bad_step": 1, "train/bad_sequence": first})
                why = (f"above {max_loss / self.replicas:.4g}, {self.recipe.schedule.spike_factor} x the median of "
                       f"the last {self.recipe.schedule.spike_window} good steps' losses" if spike else
                       f"gradient norm {norm}")
                self.say(f"step {step} is bad (loss {self.state.loss}, {why}): not applied; it drew "
                         f"sequences {first}-{first + self.recipe.batch.sequences - 1}")
            self.metrics.log(per_step, step)
        self.pending.clear()
        self.max_loss = self._spike_bound()
        limit = self.recipe.schedule.max_bad_steps
        if limit and self.in_a_row >= limit:  # the last step logged is the last bad one
            raise BadSteps(self.first_bad, step, self.after_good)


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
