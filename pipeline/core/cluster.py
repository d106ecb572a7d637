"""The Ray connection every stage shares: the cluster a job was submitted to, or a local one."""

from __future__ import annotations

import logging
import os

from pipeline.core.config import Config, ConfigError


def connect(cfg: Config | None = None, paths: tuple[str, ...] | None = None) -> None:
    """Join $RAY_ADDRESS (set by `ray job submit`) if there is one, else start Ray on this machine
    (a new local instance, never a stray cluster that happens to run here). With cfg, also refuse
    paths (default: the run's) that the cluster's nodes do not share (require_shared_storage).

    Ray starts once per process, so a stage called from the pipeline driver reuses the driver's connection.
    """
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_DEDUP_LOGS", "1")
        if not os.environ.get("RAY_ADDRESS"):
            # Ray starts workers at nice 15 by default, so its own idle daemons preempt the training
            # workers; on a machine that exists to train, they run at normal priority (see BENCHMARKS.md).
            os.environ.setdefault("RAY_worker_niceness", "0")
        # Ray 2.60 turns token authentication on for a new local cluster and says so on stderr at every start:
        # not a line our users need (a refusal must stay one line)
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", logging_level="WARNING")
        _quiet_ray_data()
    if cfg is not None:
        require_shared_storage(cfg, paths)


def _quiet_ray_data() -> None:
    """Ray Data prints its execution plan and stats at INFO; our progress lines say what matters.
    Its full log still goes to the session's ray-data.log."""
    import ray.data  # noqa: F401  (configures the "ray.data" logger)

    for handler in logging.getLogger("ray.data").handlers:
        if handler.name == "console":
            handler.setLevel(logging.WARNING)


def require_shared_storage(cfg: Config, paths: tuple[str, ...] | None = None) -> None:
    """Refuse, before any work, a run whose paths are on local disk when the Ray cluster has several
    nodes: each node would read and write its own disk (shards missing on one, checkpoints on another).
    A local path every node mounts is declared with run.shared_fs=true."""
    import ray

    nodes = sum(1 for n in ray.nodes() if n["Alive"])
    paths = paths or (cfg.run_dir, cfg.data_dir, cfg.checkpoint_dir)
    local = [p for p in paths if "://" not in p]
    if nodes > 1 and local and not cfg.run.shared_fs:
        raise ConfigError(f"{local[0]} is on local disk (run.root, tokenization.output or checkpoint.dir), but the "
                          f"Ray cluster has {nodes} nodes that do not share it; use object storage "
                          f"(run.root=s3://BUCKET/runs, gs://...) or, if every node mounts it, run.shared_fs=true")


def cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))
