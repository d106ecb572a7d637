"""The training stage: Ray Train's TorchTrainer runs the loop of train/loop.py on every worker, with
pretraining's recipe (train/pretraining.py) or fine-tuning's (train/finetuning.py).

The same code path serves one CPU worker on a laptop (gloo) and N GPUs on M nodes (nccl): only
cluster.* changes. A worker that dies makes Ray Train restart the whole group, up to
cluster.max_failures times, and the workers resume from the last committed checkpoint.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.core import cluster, storage
from pipeline.core.command import UserError, one_line
from pipeline.core.config import Config
from pipeline.core.model import checkpoints
from pipeline.core.model.checkpoints import CheckpointError, TrainerState
from pipeline.core.storage import join
from tokenization.shards import load_manifest
from train import checkpoint, diagnostics, faults, watchdog
from train.data import check_order
from train.mixture import Mixture


class TrainingFailed(UserError, RuntimeError):
    pass


@dataclass
class TrainResult:
    checkpoint: str  # the final committed checkpoint
    step: int
    loss: float | None
    tokens: int
    nodes: int  # Ray nodes the workers ran on


def run(cfg: Config, *, resume: bool = False, tracking: dict | None = None) -> TrainResult:
    """Train from cfg.data_dir into cfg.checkpoint_dir. With resume, continue from the latest
    committed checkpoint there; without, refuse to touch a run that already has checkpoints.
    tracking: {"uri", "run_id"} of the MLflow run that receives rank 0's metrics. cfg: resolved
    (Config.with_absolute_paths), as every stage takes it."""
    manifest = load_manifest(cfg.data_dir)  # fail now, not in every worker, if the dataset is missing
    existing = checkpoints.latest(cfg.checkpoint_dir)
    if existing and not resume:
        raise CheckpointError(f"{cfg.checkpoint_dir} already holds checkpoints (latest: {existing}); "
                              f"pass --resume to continue that run, or set run.name for a new one")
    mix = Mixture(cfg, manifest, cfg.data_dir)  # a mixture's: data.sources must name the dataset's sources
    if existing and not checkpoints.damage(existing, hashed=lambda names: []):  # a damaged one: the workers fall back
        check_order(TrainerState.read(existing).data_order, existing, mix.data_order)
        print(f"train: resuming from {existing}", flush=True)
    for source in mix.plan():  # refused here if it passes a source's max_epochs
        print(f"train: {source.line()}", flush=True)

    from train import pretraining

    payload = {"config": cfg.model_dump(), "tracking": tracking}
    out = fit(cfg, pretraining.make_recipe, payload, "train", cfg.run_dir, cfg.checkpoint_dir,
              shared={"hellaswag": _hellaswag(cfg)})
    if tracking:
        drain_metrics(cfg.run_dir, tracking)
    return TrainResult(out["checkpoint"], out["step"], out["loss"], out["tokens"], out["nodes"])


def drain_metrics(run_dir: str, tracking: dict) -> None:
    """Send MLflow whatever rank 0 could not send of the run's metrics, read from the run dir wherever rank 0
    ran (an unreachable server is retried a while; the record stays in the run dir for the next drain)."""
    from pipeline.core.tracking import drain

    drain(run_dir, tracking["run_id"], tracking["uri"])


def fit(cfg: Config, make_recipe: Callable, payload: dict, name: str, run_dir: str, checkpoint_dir: str,
        shared: dict | None = None) -> dict:
    """Run the training loop with make_recipe's recipe (train/loop.py) on cluster.num_workers Ray Train
    workers (restarted up to cluster.max_failures times); rank 0's return value. The workers resume from
    their own checkpoints in checkpoint_dir; when their worker count differs from this run's, they are
    converted to a universal checkpoint first. shared: large payload values, handed to the workers through
    Ray's object store (one copy per node) instead of inside every worker's payload."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    # what the workers write must be on storage every node sees; what they read was checked by the caller
    # (the shards by run(); a fine-tune's task data is read by the driver alone)
    cluster.connect(cfg, (run_dir, checkpoint_dir))
    payload = {**payload, **{k: None if v is None else ray.put(v) for k, v in (shared or {}).items()}}
    c = cfg.cluster
    resources = {"CPU": c.cpus_per_worker, **({"GPU": 1} if c.use_gpu else {})}
    existing = checkpoints.latest(checkpoint_dir)
    if existing and (checkpoints.damage(existing, hashed=lambda names: [])
                     or checkpoints.TrainerState.read(existing).world_size != c.num_workers):
        # once, in a task of its own, so no rank converts while the others wait on a collective's timeout; the
        # task verifies the checkpoints and converts the one the workers will resume from (newest_intact)
        ray.get(ray.remote(_to_universal).options(num_cpus=c.cpus_per_worker).remote(
            checkpoint_dir, c.num_workers, cfg.storage.model_dump()))
    ray_dir = join(run_dir, "ray")
    trainer = TorchTrainer(
        functools.partial(_worker, make_recipe),
        train_loop_config=payload,
        # the collectives' timeout outlasts the hang watchdog's (train/watchdog.py), which reports where each rank was
        torch_config=TorchConfig(backend="nccl" if c.use_gpu else "gloo", timeout_s=watchdog.collective_timeout_s(cfg)),
        scaling_config=ray.train.ScalingConfig(num_workers=c.num_workers, use_gpu=c.use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy=c.placement_strategy),
        run_config=ray.train.RunConfig(
            name=name, storage_path=os.path.abspath(ray_dir) if storage.is_local(ray_dir) else ray_dir,
            failure_config=ray.train.FailureConfig(max_failures=c.max_failures),
            worker_runtime_env={"env_vars": _worker_env(cfg, run_dir)}),
    )
    before = diagnostics.begin(run_dir)
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        diagnostics.report(run_dir, before, name, failed=True)  # an out-of-memory error: its own message
        cause = _user_error(err)
        if cause is not None:  # storage past its retries, a damaged checkpoint, a full disk: one line says it
            raise TrainingFailed(f"{name} stopped: {one_line(cause)}; {CONTINUE}") from None
        raise TrainingFailed(f"{name} failed (after {c.max_failures} automatic restarts); {CONTINUE}. "
                             f"Cause: {err}") from err
    diagnostics.report(run_dir, before, name)
    return result.return_value


CONTINUE = ("run the same command again to continue from the last checkpoint (train/run.py and train/finetune.py: "
            "with --resume)")


def _worker_env(cfg: Config, run_dir: str) -> dict[str, str]:
    """Environment the workers need before their process group starts (NCCL's flight recorder), and the
    fault-injection testing aid's spec, which reaches workers of a cluster started before it was set."""
    env = watchdog.flight_recorder_env(run_dir) if cfg.cluster.use_gpu else {}
    if os.environ.get(faults.ENV):
        env[faults.ENV] = os.environ[faults.ENV]
    return env


def _user_error(err: BaseException) -> UserError | None:
    """The UserError a worker raised, out of Ray's wrappers, or None: Ray Train's TrainingFailedError holds each
    rank's failure (worker_failures), which wraps the worker's own exception (_base_exc, Ray's only handle on it),
    and Ray's RayTaskError holds it as .cause."""
    todo, seen = [err], 0
    while todo and seen < 20:
        err, seen = todo.pop(0), seen + 1
        inner = [getattr(err, "cause", None), getattr(err, "_base_exc", None), err.__cause__, err.__context__,
                 *(getattr(err, "worker_failures", None) or {}).values()]
        inner = [e for e in inner if isinstance(e, BaseException)]
        if isinstance(err, UserError) and not any(isinstance(e, UserError) for e in inner):
            return err
        todo += inner
    return None


def _hellaswag(cfg: Config) -> list | None:
    """The in-training HellaSwag items, read (and for "official", downloaded and verified) once by the
    driver; None when not evaluated in training."""
    if not (cfg.eval.hellaswag and cfg.eval.hellaswag_interval):
        return None
    from eval import hellaswag

    return hellaswag.load(cfg.eval.hellaswag, limit=cfg.eval.hellaswag_limit)[0]


def _to_universal(directory: str, workers: int, storage_cfg: dict) -> None:
    storage.configure(**storage_cfg)
    checkpoints.forbid_unpickling()  # DeepSpeed's converter reads the state with torch.load
    url = checkpoint.newest_intact(directory, say=lambda text: print(f"train: {text}", flush=True))
    if url and TrainerState.read(url).world_size != workers:
        print(f"train: converting {url} to a universal checkpoint for {workers} worker(s)", flush=True)
        checkpoint.prepare_universal(url)


def _worker(make_recipe: Callable, payload: dict) -> dict:
    # Imported in the worker so the driver never loads DeepSpeed.
    from train.loop import train_worker

    storage.configure(**payload["config"]["storage"])  # this process's storage timeouts and retries
    return train_worker(make_recipe, payload)
