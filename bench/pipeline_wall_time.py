"""Wall time of the embedded default (`python pipeline/run.py`, no arguments), split by stage, and the
orchestration overhead as a share of it.

    python bench/pipeline_wall_time.py [--runs 2]

Each run starts in a fresh directory, as a new user would. The driver times its own phases and logs them
to the parent MLflow run as `pipeline/seconds/*`: each stage's work (its MLflow calls excluded, except in
`register`, whose work is MLflow), Ray's start, MLflow calls, and the bookkeeping left over (fingerprints,
stage markers, the report). Python's start and imports are the wall time the driver cannot see.
Training is further split into optimizer steps (from metrics.jsonl) and the rest (Ray Train's workers,
DeepSpeed's initialization, checkpoints, validation and HellaSwag during training).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from pipeline.core.tracking import read_jsonl

REPO = Path(__file__).resolve().parents[1]
PHASES = ("tokenize", "train", "eval", "register", "ray_start", "mlflow", "bookkeeping")


def one_run(workdir: Path) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "pipeline" / "run.py")], cwd=workdir, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"the embedded default failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("gpt2-pretraining")
    parent = client.search_runs([experiment.experiment_id], filter_string="tags.`gpt2.stage` = 'pipeline'")[0]
    seconds = {k.removeprefix("pipeline/seconds/"): v for k, v in parent.data.metrics.items()
               if k.startswith("pipeline/seconds/")}
    steps = [r["train/step_time_s"] for r in read_jsonl(str(workdir / "runs" / "smoke" / "metrics.jsonl"))
             if "train/step_time_s" in r]
    seconds["train_steps"] = sum(steps)
    seconds["python_start"] = wall - seconds["total"]
    seconds["wall"] = wall
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    runs = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as tmp:
            runs.append(one_run(Path(tmp)))
        print(f"run {i + 1}: {runs[-1]['wall']:.1f} s", flush=True)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    wall = med["wall"]
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"median of {args.runs} runs of `python pipeline/run.py`\n")
    print("| phase | seconds | share of wall time | runs |\n|---|---|---|---|")
    for key in ("python_start", *PHASES):
        print(f"| {key} | {med[key]:.1f} | {med[key] / wall:.1%} | {', '.join(f'{r[key]:.1f}' for r in runs)} |")
    walls = ", ".join(f"{r['wall']:.1f}" for r in runs)
    print(f"| **wall** | **{wall:.1f}** | 100% | {walls} |")
    overhead = med["python_start"] + med["ray_start"] + med["mlflow"] + med["bookkeeping"]
    print(f"\norchestration overhead (Python start + Ray start + MLflow + bookkeeping): {overhead:.1f} s, "
          f"{overhead / wall:.1%} of wall time")
    print(f"train: {med['train_steps']:.1f} s in optimizer steps, {med['train'] - med['train_steps']:.1f} s in "
          f"worker start-up, DeepSpeed init, checkpoints and in-training evaluation")


if __name__ == "__main__":
    main()
