"""The Ray connection every stage shares: the cluster a job was submitted to, or a local one."""

from __future__ import annotations

import logging
import os


def connect() -> None:
    """Join $RAY_ADDRESS (set by `ray job submit`) if there is one, else start Ray on this machine
    (a new local instance, never a stray cluster that happens to run here).

    A no-op when Ray is already initialised, so a stage called from the pipeline driver reuses the
    driver's connection.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if not os.environ.get("RAY_ADDRESS"):
        # Ray starts workers at nice 15 by default, so its own idle daemons preempt the training
        # workers; on a machine that exists to train, they run at normal priority (see BENCHMARKS.md).
        os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(address=os.environ.get("RAY_ADDRESS") or "local", logging_level="WARNING")
    _quiet_ray_data()


def _quiet_ray_data() -> None:
    """Ray Data prints its execution plan and stats at INFO; our progress lines say what matters.
    Its full log still goes to the session's ray-data.log."""
    import ray.data  # noqa: F401  (configures the "ray.data" logger)

    for handler in logging.getLogger("ray.data").handlers:
        if handler.name == "console":
            handler.setLevel(logging.WARNING)


def cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))
