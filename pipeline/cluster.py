"""The Ray connection every stage shares: the cluster a job was submitted to, or a local one."""

from __future__ import annotations

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
    ray.init(address=os.environ.get("RAY_ADDRESS") or "local", logging_level="WARNING")


def cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))
