"""The cluster path end to end, run by tests/test_cluster.py in a process of its own:

a Ray cluster of two raylets (each node with its own TMPDIR: no local disk shared through the run), the
run directory on S3 (moto's server, from the environment), and

1. the pipeline with a local run.root: refused before any work (the nodes do not share it);
2. the whole pipeline on s3://, two training workers on two nodes, one of them SIGKILLed once the step-8
   checkpoint is committed: Ray Train restarts the group, which resumes from S3;
3. the same training uninterrupted (the reference);
4. the reference's step-8 checkpoint resumed on one worker (universal checkpoint, converted in a Ray task).

    python tests/cluster_run.py OUT_DIR     (writes OUT_DIR/result.json)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import threading
import time
from pathlib import Path

import ray
from conftest import kill_newest_train_worker
from ray.cluster_utils import Cluster

from pipeline import run as pipeline
from pipeline.core import storage
from pipeline.core.config import load_config
from pipeline.core.model import checkpoints
from train import launch

# Small enough for two CPUs; fp32 on CPU, so a resumed run repeats the uninterrupted one bit for bit.
TINY = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=64", "batch.seq_len=64",
        "batch.micro_batch_size=4", "batch.tokens_per_step=1024", "train.lr=1e-2", "train.warmup_steps=3",
        "train.max_steps=16", "checkpoint.interval=4", "deepspeed.zero_stage=2", "eval.interval=0",
        "eval.val_tokens=2048", "eval.max_new_tokens=4", "eval.hellaswag_limit=4", "cluster.num_workers=2",
        "cluster.cpus_per_worker=1", "cluster.placement_strategy=STRICT_SPREAD", "tracking.system_metrics=false"]
ROOT = "s3://runs/cluster"


def losses(cfg) -> dict[int, list[float]]:
    """Every training loss in the run directory's metrics.jsonl, by step (one record per step, also after a restart)."""
    out: dict[int, list[float]] = {}
    for line in storage.read_bytes(cfg.metrics_url).decode().splitlines():
        record = json.loads(line)
        if "train/loss" in record:
            out.setdefault(record["step"], []).append(record["train/loss"])
    return out


def kill_a_worker_once_committed(ckpt_dir: str, step: int, killed: list) -> None:
    """SIGKILL one training worker of this cluster (a descendant of this process) once the checkpoint of
    `step` is committed on S3."""
    deadline = time.time() + 900
    while time.time() < deadline and not killed:
        if checkpoints.step_name(step) in checkpoints.committed(ckpt_dir):
            pid = kill_newest_train_worker()
            if pid:
                killed.append(pid)
                return
        time.sleep(0.2)


def main(out: Path) -> None:
    result: dict = {}
    nodes = {name: out / name for name in ("head", "node2")}
    for d in nodes.values():
        d.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "env_vars": {"TMPDIR": str(nodes["head"])}})
    cluster.add_node(num_cpus=1, env_vars={"TMPDIR": str(nodes["node2"])})
    os.environ["RAY_ADDRESS"] = cluster.address
    try:
        # 1. a local run directory on a cluster of two nodes
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):  # the command as a user runs it: its shell reports the refusal
            code = pipeline.main(["--config", "smoke", "--stages", "tokenize,train", *TINY, f"run.root={out / 'local-runs'}"])
            result["local_root"] = {"code": code, "stderr": stderr.getvalue(), "created": (out / "local-runs").exists()}

        # 2. the pipeline on S3, a worker killed after the step-8 checkpoint
        cfg = load_config("smoke", [*TINY, f"run.root={ROOT}", "cluster.max_failures=2",
                                    f"tracking.uri=sqlite:///{out / 'mlflow.db'}"]).with_absolute_paths()
        killed: list[int] = []
        killer = threading.Thread(target=kill_a_worker_once_committed, args=(cfg.checkpoint_dir, 8, killed))
        killer.start()
        result["pipeline"] = {"code": pipeline.run(cfg, ["tokenize", "train", "eval", "register"], set()),
                              "killed": killed}
        killer.join()
        result["pipeline"]["losses"] = losses(cfg)
        result["pipeline"]["final"] = checkpoints.latest(cfg.checkpoint_dir)
        result["pipeline"]["run_dir"] = sorted(storage.filesystem(cfg.run_dir)[0].find(
            storage.filesystem(cfg.run_dir)[1]))

        # 3. the same training, uninterrupted, on the dataset the pipeline tokenized
        ref = load_config("smoke", [*TINY, f"run.root={ROOT}", "run.name=reference",
                                    f"tokenization.output={cfg.data_dir}"])
        trained = launch.run(ref)
        result["reference"] = {"losses": losses(ref), "final": checkpoints.latest(ref.checkpoint_dir),
                               "nodes": trained.nodes}

        # 4. its step-8 checkpoint resumed on one worker
        one = load_config("smoke", [*TINY, f"run.root={ROOT}", "run.name=one-worker", "cluster.num_workers=1",
                                    f"tokenization.output={cfg.data_dir}"])
        fs, _ = storage.filesystem(ROOT)
        step8 = checkpoints.step_name(8)
        fs.copy(storage.filesystem(f"{ref.checkpoint_dir}/{step8}")[1],
                storage.filesystem(f"{one.checkpoint_dir}/{step8}")[1], recursive=True)
        launch.run(one, resume=True)
        result["one_worker"] = {"losses": losses(one), "final": checkpoints.latest(one.checkpoint_dir),
                                "universal": storage.exists(f"{one.checkpoint_dir}/{step8}/deepspeed/universal.json")}
        result["temp_dirs"] = {name: sorted(str(p.relative_to(d)) for p in d.rglob("metrics.jsonl"))
                               for name, d in nodes.items()}
    finally:
        (out / "result.json").write_text(json.dumps(result, indent=1))
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
