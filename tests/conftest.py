"""Shared fixtures: the offline GPT-2 vocabulary, one local Ray for in-process tests, small corpora."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]


def _offline_vocab() -> None:
    # tiktoken downloads GPT-2's vocabulary unless TIKTOKEN_CACHE_DIR holds it; CI has no internet.
    if "TIKTOKEN_CACHE_DIR" not in os.environ:
        shared = REPO.parent / "shared" / "tiktoken-cache"
        if shared.is_dir():
            os.environ["TIKTOKEN_CACHE_DIR"] = str(shared)


_offline_vocab()
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# CI has no internet: a Hub lookup (the official HellaSwag set that tokenization's contamination check
# would fetch) fails at once instead of retrying for half a minute
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _mlflow_tracking_uri_restored():
    """The driver sets MLflow's process-wide tracking URI; a test that runs a stage in-process must not
    leave it pointing at its own (deleted) store for the next test."""
    yield
    if "mlflow" in sys.modules:
        from mlflow.tracking._tracking_service import utils

        utils._tracking_uri = None


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray (2 CPUs) shared by the in-process tests; CLI tests start their own."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def s3_server():
    """A real S3 API on 127.0.0.1 (moto's server) with a bucket "runs"; yields the environment that points
    boto3/s3fs at it. `reset_auth` switches moto's IAM checks on (0) or off (None) for permission tests."""
    moto_server = pytest.importorskip("moto.server")
    import boto3
    import s3fs

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1", aws_access_key_id="test",
                 aws_secret_access_key="test").create_bucket(Bucket="runs")
    # s3fs caches one filesystem per set of arguments, with the endpoint it found in the environment when made:
    # an earlier module's (stopped) server must not answer for this one
    s3fs.S3FileSystem.clear_instance_cache()
    yield env
    server.stop()
    s3fs.S3FileSystem.clear_instance_cache()


def run_tree(argv: list[str], timeout: float, **popen) -> subprocess.CompletedProcess:
    """subprocess.run(argv, capture_output=True, text=True, timeout=timeout), except that a command that
    overruns (or a test that times out while waiting) takes its whole process tree down with it: Ray's
    GCS, raylets and workers would otherwise outlive the script and load the machine under later tests."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"{argv} ran past {timeout} s\nstdout:\n{stdout[-4000:]}\nstderr:\n{stderr[-4000:]}")
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


def kill_tree(pid: int) -> None:
    """SIGKILL pid and every process below it, and return once they are gone. Ray's daemons and workers
    are not all in the process group of the driver that started them, and a worker that outlives its
    driver for a moment can still commit a checkpoint."""
    with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(pid)
        tree = [*root.children(recursive=True), root]
        for p in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(tree, timeout=30)


def kill_newest_train_worker() -> int | None:
    """SIGKILL the newest Ray Train worker among this process's descendants (the Ray it started), never
    another test's or another user's; its pid, or None while there is none yet."""
    workers = [p for p in psutil.Process().children(recursive=True)
               if "ray::RayTrainWorker" in " ".join(_cmdline(p))]
    if not workers:
        return None
    victim = max(workers, key=lambda p: p.pid)
    victim.kill()
    return victim.pid


@contextlib.contextmanager
def killing_a_worker_after(metrics_file: str, step: int, timeout: float = 300) -> Iterator[list[int]]:
    """Around a training run in this process: SIGKILL one of its Ray Train workers (kill_newest_train_worker)
    once `step` is logged in metrics_file; yields the list that receives the killed pid. A run that ends
    without a kill fails the test (one that raises is left to say why)."""
    from pipeline.core.tracking import read_jsonl

    killed: list[int] = []
    done = threading.Event()

    def kill() -> None:
        deadline = time.time() + timeout
        while not done.is_set() and time.time() < deadline:
            if os.path.exists(metrics_file) and any(r.get("step", 0) >= step for r in read_jsonl(metrics_file)):
                pid = kill_newest_train_worker()
                if pid:
                    killed.append(pid)
                    return
            time.sleep(0.02)

    killer = threading.Thread(target=kill)
    killer.start()
    try:
        yield killed
    finally:
        done.set()
        killer.join()
    assert killed, f"no worker was killed (step {step} never logged in {metrics_file} while a worker ran)"


def _cmdline(p) -> list[str]:
    try:
        return p.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def run_cli(*args: str, cwd: Path = REPO, timeout: float = 600, env: dict | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
    """Run one of the project's scripts as a user would, e.g. run_cli("tokenization/run.py", ...)."""
    proc = run_tree([sys.executable, *args], timeout, cwd=cwd, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def config_leaves(model=None, prefix: str = "") -> dict:
    """{dotted key: pydantic FieldInfo} of every leaf field of the config, by walking Config.model_fields
    recursively; a dict of sections (finetune.heads) contributes its entries' fields under `<name>`, a list of
    them (data.sources) under `<i>`."""
    from typing import get_args, get_origin

    from pydantic import BaseModel

    from pipeline.core.config import Config

    def is_model(t) -> bool:
        return isinstance(t, type) and issubclass(t, BaseModel)

    out = {}
    for name, field in (model or Config).model_fields.items():
        annotation, args = field.annotation, get_args(field.annotation)
        if is_model(annotation):
            out.update(config_leaves(annotation, f"{prefix}{name}."))
        elif get_origin(annotation) is dict and is_model(args[1]):
            out.update(config_leaves(args[1], f"{prefix}{name}.<name>."))
        elif get_origin(annotation) is list and is_model(args[0]):
            out.update(config_leaves(args[0], f"{prefix}{name}.<i>."))
        else:
            out[f"{prefix}{name}"] = field
    return out


def write_jsonl(path: Path, records: list) -> Path:
    """Records are dicts (dumped as JSON) or raw bytes/str lines (written as they are)."""
    with open(path, "wb") as f:
        for r in records:
            line = r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode()
            f.write(line.rstrip(b"\n") + b"\n")
    return path


@pytest.fixture(scope="session")
def prose_texts() -> list[str]:
    """About 2 MB of real English (the built-in corpus) plus text that stresses the tokenizer."""
    from tokenization import builtin

    extra = ["naïve café — “quotes”, emoji 🎉 and CJK 漢字", "the literal <|endoftext|> is plain text here",
             "  leading and trailing spaces  ", "tabs\tand\nnewlines\r\n"]
    return [text for _, text in builtin.documents()] + extra


@pytest.fixture(scope="session")
def prose_corpus(tmp_path_factory, prose_texts) -> Path:
    """The prose as four JSONL files in a directory."""
    root = tmp_path_factory.mktemp("prose")
    quarter = len(prose_texts) // 4 + 1
    for i in range(4):
        write_jsonl(root / f"part-{i}.jsonl", [{"text": t, "id": i} for t in prose_texts[i * quarter:(i + 1) * quarter]])
    return root


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under root by relative path: for byte-identity comparisons."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def builtin_dataset(tmp_path_factory, ray_local) -> Path:
    """The built-in corpus tokenized once for every test that trains or evaluates."""
    from pipeline.core.config import load_config
    from tokenization import job

    out = tmp_path_factory.mktemp("builtin") / "data"
    job.run(load_config("smoke", [], {"tokenization.output": str(out)}), log=lambda *_: None)
    return out


# the smoke preset's overrides of tiny_config, also for a command line (train/run.py --config smoke ...)
TINY = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=64", "batch.seq_len=64",
        "batch.micro_batch_size=4", "batch.tokens_per_step=1024", "cluster.num_workers=2", "cluster.cpus_per_worker=1",
        "train.lr=1e-2", "train.warmup_steps=3", "train.max_steps=12", "checkpoint.interval=4", "eval.interval=0",
        "cluster.max_failures=0"]


def tiny_config(root: Path, data: Path, *overrides: str):
    """A GPT-2 small enough to train in seconds on a CPU, two workers by default."""
    from pipeline.core.config import load_config

    return load_config("smoke", [*TINY, *overrides], {"run.root": str(root), "tokenization.output": str(data)})


def train_on_two_raylets(root: Path, data: Path, *overrides: str, env: dict | None = None,
                         timeout: float = 600) -> subprocess.CompletedProcess:
    """tiny_config(root, data, *overrides) trained by launch.run on a Ray cluster of two raylets, one worker on
    each (tests/two_raylets.py, in a process of its own: this one has its local Ray); the finished process,
    whose stdout ends with "NODES <the nodes the workers ran on>"."""
    proc = run_tree([sys.executable, str(REPO / "tests" / "two_raylets.py"), str(root), str(data), *overrides],
                    timeout, cwd=root.parent, env={**os.environ, **(env or {}), "PYTHONPATH": str(REPO / "tests")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc
