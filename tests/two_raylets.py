"""Training on a Ray cluster of two raylets on this machine (ray.cluster_utils, one CPU each, the disk shared),
one worker on each (STRICT_SPREAD), for the tests whose ranks must sit on different nodes. Run by
conftest.train_on_two_raylets in a process of its own:

    python tests/two_raylets.py ROOT DATA [OVERRIDE ...]     (prints NODES <nodes the workers ran on>)
"""

from __future__ import annotations

import sys
from pathlib import Path

import ray
from conftest import tiny_config
from ray.cluster_utils import Cluster

from train import launch


def main(root: Path, data: Path, overrides: list[str]) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    try:
        cfg = tiny_config(root, data, *overrides, "cluster.placement_strategy=STRICT_SPREAD", "run.shared_fs=true")
        print("NODES", launch.run(cfg).nodes, flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
