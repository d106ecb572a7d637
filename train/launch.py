"""The training stage: Ray Train's TorchTrainer runs train/loop.py on every worker.

The same code path serves one CPU worker on a laptop (gloo) and N GPUs on M nodes (nccl): only
cluster.* changes. A worker that dies makes Ray Train restart the whole group, up to
cluster.max_failures times, and the workers resume from the last committed checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.core import cluster, storage
from pipeline.core.command import UserError
from pipeline.core.config import Config
from pipeline.core.storage import join
from tokenization.shards import load_manifest
from train import checkpoint
from train.checkpoint import CheckpointError, TrainerState
from train.data import check_order


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
    tracking: {"uri", "run_id"} of the MLflow run that receives rank 0's metrics."""
    cfg = cfg.with_absolute_paths()
    load_manifest(cfg.data_dir)  # fail now, not in every worker, if the dataset is missing
    existing = checkpoint.latest(cfg.checkpoint_dir)
    if existing and not resume:
        raise CheckpointError(f"{cfg.checkpoint_dir} already holds checkpoints (latest: {existing}); "
                              f"pass --resume to continue that run, or set run.name for a new one")
    if existing:
        check_order(TrainerState.read(existing).data_order, existing)
        print(f"train: resuming from {existing}", flush=True)

    cluster.connect(cfg)  # before the object store holds the HellaSwag items
    out = fit(cfg, _worker, {"config": cfg.model_dump(), "tracking": tracking, "hellaswag": _hellaswag(cfg)}, "train")
    return TrainResult(out["checkpoint"], out["step"], out["loss"], out["tokens"], out["nodes"])


def fit(cfg: Config, worker: Callable[[dict], dict], payload: dict, name: str) -> dict:
    """Run worker(payload) on cluster.num_workers Ray Train workers (restarted up to cluster.max_failures
    times); rank 0's return value. The worker resumes from its own checkpoints in cfg.checkpoint_dir;
    when their worker count differs from this run's, they are converted to a universal checkpoint first."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    # what the workers write must be on storage every node sees; what they read was checked by the caller
    # (the shards by run(); a fine-tune's task data is read by the driver alone)
    cluster.connect(cfg, (cfg.run_dir, cfg.checkpoint_dir))
    c = cfg.cluster
    resources = {"CPU": c.cpus_per_worker, **({"GPU": 1} if c.use_gpu else {})}
    existing = checkpoint.latest(cfg.checkpoint_dir)
    if existing and checkpoint.TrainerState.read(existing).world_size != c.num_workers:
        # once, in a task of its own, so no rank converts while the others wait on a collective's timeout
        print(f"train: converting {existing} to a universal checkpoint for {c.num_workers} worker(s)", flush=True)
        ray.get(ray.remote(_to_universal).options(num_cpus=c.cpus_per_worker).remote(existing))
    ray_dir = join(cfg.run_dir, "ray")
    trainer = TorchTrainer(
        worker,
        train_loop_config=payload,
        torch_config=TorchConfig(backend="nccl" if c.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=c.num_workers, use_gpu=c.use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy=c.placement_strategy),
        run_config=ray.train.RunConfig(
            name=name, storage_path=os.path.abspath(ray_dir) if storage.is_local(ray_dir) else ray_dir,
            failure_config=ray.train.FailureConfig(max_failures=c.max_failures)),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        raise TrainingFailed(f"{name} failed (after {c.max_failures} automatic restarts); it resumes from "
                             f"its last checkpoint with --resume. Cause: {err}") from err
    return result.return_value


def _hellaswag(cfg: Config):
    """The in-training HellaSwag items, read (and for "official", downloaded and verified) once by the
    driver and handed to every rank through Ray's object store; None when not evaluated in training."""
    if not (cfg.eval.hellaswag and cfg.eval.hellaswag_interval):
        return None
    import ray

    from eval import hellaswag

    return ray.put(hellaswag.load(cfg.eval.hellaswag, limit=cfg.eval.hellaswag_limit)[0])


def _to_universal(url: str) -> None:
    checkpoint.forbid_unpickling()  # DeepSpeed's converter reads the state with torch.load
    checkpoint.prepare_universal(url)


def _worker(payload: dict) -> dict:
    # Imported in the worker so the driver never loads DeepSpeed.
    from train.loop import train_worker

    return train_worker(payload)
