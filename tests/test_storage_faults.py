"""Storage and tracking under faults: object storage behind a proxy of our own (tests/fault_proxy.py) that
resets connections, answers 503 SlowDown or never answers; an MLflow server that never answers; a full disk.
Transient faults are retried for storage.retry_s and cost only their length; past it, or on a full disk, the
command stops with one line naming the endpoint or the path."""

from __future__ import annotations

import errno
import os
import threading
import time

import pytest
import torch
from conftest import REPO, TINY, run_cli, tiny_config
from fault_proxy import FaultProxy

from pipeline.core import storage
from pipeline.core.command import one_line


@pytest.fixture
def proxied_s3(s3_server, monkeypatch):
    """The moto server of s3_server behind a FaultProxy, which this process's storage calls go through."""
    import s3fs

    host, port = s3_server["AWS_ENDPOINT_URL"].rsplit("/", 1)[1].split(":")
    proxy = FaultProxy((host, int(port)))
    for key, value in {**s3_server, "AWS_ENDPOINT_URL": proxy.url}.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    yield proxy
    proxy.close()
    s3fs.S3FileSystem.clear_instance_cache()
    storage.configure(300, 60)


def test_resets_then_503s_cost_their_length_and_the_bytes_arrive_whole(proxied_s3):
    storage.configure(retry_s=60, timeout_s=5)
    url = "s3://runs/faults/blob.bin"
    data = os.urandom(3 << 20)
    outage = proxied_s3.schedule(("reset", 3.0), ("503", 3.0))
    started = time.monotonic()
    storage.write_bytes(url, data)
    assert storage.read_bytes(url) == data and storage.sha256(url) == storage.sha256(url)
    outage.join()
    assert 5.0 <= time.monotonic() - started < 30.0  # waited the outage out, no more
    assert storage.files("s3://runs/faults") == {"blob.bin": len(data)}


@pytest.mark.parametrize("mode", ["reset", "503", "silent"])
def test_past_storage_retry_s_a_call_stops_with_one_line_naming_the_endpoint(proxied_s3, mode):
    storage.configure(retry_s=3, timeout_s=1)
    proxied_s3.mode = mode
    started = time.monotonic()
    with pytest.raises(storage.StorageUnavailable) as err:
        storage.exists("s3://runs/faults/anything")
    elapsed = time.monotonic() - started
    message = str(err.value)
    assert one_line(message) == message and proxied_s3.url in message and "storage.retry_s" in message, message
    assert 3.0 <= elapsed < 3 + 2 * 1 + 5, elapsed  # retry_s, then the last try's request timeout at most (+ slack)
    with pytest.raises(storage.StorageError, match=proxied_s3.url):
        storage.check("s3://runs/faults")  # the up-front check says the same, as a StorageError


def test_a_full_disk_is_one_line_naming_the_path(tmp_path, monkeypatch):
    target = tmp_path / "out" / "manifest.json"

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(storage.StorageError) as err:
        storage.write_json(str(target), {"a": 1})
    assert str(target) in str(err.value) and "disk full" in str(err.value)
    assert not target.exists() and os.listdir(tmp_path / "out") == []  # nothing half-written is left


@pytest.mark.slow
def test_the_tokenize_command_reports_a_full_disk_in_one_line(tmp_path):
    # the write layer fails as a full disk does, in the command's own process (a sitecustomize of the test's)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import errno, os\n"
        "def _full(fd):\n"
        "    raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "os.fsync = _full\n")
    out = tmp_path / "data"
    proc = run_cli("tokenization/run.py", "--config", "smoke", "--input", "builtin", "--output", str(out),
                   check=False, env={"PYTHONPATH": f"{hook}{os.pathsep}{REPO}"}, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines[-1].startswith("error: ") and "disk full" in lines[-1], proc.stderr[-3000:]
    assert str(out) in lines[-1] and "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_an_upload_to_storage_that_never_answers_stops_within_the_timeouts(proxied_s3):
    storage.configure(retry_s=3, timeout_s=1)
    proxied_s3.mode = "silent"
    started = time.monotonic()
    with pytest.raises(storage.StorageUnavailable, match=proxied_s3.url):
        storage.write_bytes("s3://runs/faults/never.bin", os.urandom(1 << 20))
    assert time.monotonic() - started < 3 + 1 + 8


@pytest.mark.slow
def test_an_mlflow_server_that_never_answers_costs_bounded_time_and_the_metrics_are_sent_later(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from pipeline.core.lineage import Lineage
    from pipeline.core.tracking import JsonLines, MlflowUploader

    silent = FaultProxy(None, mode="silent")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")  # the user's bound wins over ours (15 s)
    said: list[str] = []
    started = time.monotonic()
    track = Lineage(silent.url, "gpt2-pretraining", str(tmp_path / "run"), log=said.append)
    # the up-front check (1 s), then 4 tries of 1 s with 1 + 2 + 4 s between them: the driver goes on without it
    assert not track.available and time.monotonic() - started < 20
    assert len(said) == 1 and silent.url in said[0] and "continuing without it" in said[0], said

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = MlflowClient(store).create_run(MlflowClient(store).create_experiment("x")).info.run_id
    path = str(tmp_path / "metrics.jsonl")
    record = JsonLines(path)
    uploader = MlflowUploader(path, run_id, silent.url, interval_s=0.2, log=said.append).start()
    for step in range(1, 4):  # training logs on while the uploader's requests time out in its own thread
        record.log({"train/loss": 10.0 - step}, step)
    record.close()
    started = time.monotonic()
    assert uploader.close(timeout_s=2) is False and time.monotonic() - started < 10
    assert any("unreachable" in line for line in said) and any("not yet in MLflow" in line for line in said)
    silent.close()
    assert MlflowUploader(path, run_id, store, log=said.append).drain(timeout_s=30)  # the server is back
    history = MlflowClient(store).get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 9.0), (2, 8.0), (3, 7.0)]


def outage_once(s3, key: str, proxy: FaultProxy, *phases: tuple[str, float]) -> tuple[threading.Thread, list]:
    """From the moment `key` appears (read from moto itself, past the proxy), play the proxy's fault phases; the
    thread, and a list that receives the time they started."""
    started: list[float] = []

    def watch() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if s3.list_objects_v2(Bucket="runs", Prefix=key).get("KeyCount"):
                started.append(time.monotonic())
                proxy.schedule(*phases).join()
                return
            time.sleep(0.05)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread, started


def s3_weights(s3, prefix: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    name = s3.get_object(Bucket="runs", Key=f"{prefix}/latest")["Body"].read().decode()
    return load(s3.get_object(Bucket="runs", Key=f"{prefix}/{name}/model.safetensors")["Body"].read())


@pytest.mark.slow
def test_training_waits_out_an_outage_in_a_checkpoint_upload_and_stops_in_one_line_past_storage_retry_s(
        s3_server, builtin_dataset, tmp_path):
    import boto3
    from safetensors.torch import load_file

    from pipeline.core.model import checkpoints
    from train import launch

    reference = tiny_config(tmp_path, builtin_dataset, "cluster.num_workers=1")  # the same run on local disk
    launch.run(reference)
    expected = load_file(os.path.join(checkpoints.latest(reference.checkpoint_dir), "model.safetensors"))

    s3 = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"], region_name="us-east-1",
                      aws_access_key_id="test", aws_secret_access_key="test")
    host, port = s3_server["AWS_ENDPOINT_URL"].rsplit("/", 1)[1].split(":")
    proxy = FaultProxy((host, int(port)))
    env = {**s3_server, "AWS_ENDPOINT_URL": proxy.url}  # the trainer, its workers and Ray reach S3 through it
    command = ["train/run.py", "--config", "smoke", "--data", str(builtin_dataset), *TINY, "cluster.num_workers=1",
               "run.root=s3://runs/outage"]
    try:
        # 10 s of resets, then 5 s of 503 SlowDown, from the commit of step 4: step 8's upload meets them
        watcher, began = outage_once(s3, "outage/held/checkpoints/step_00000004/trainer_state.json", proxy,
                                     ("reset", 10.0), ("503", 5.0))
        proc = run_cli(*command, "run.name=held", "storage.retry_s=120", "storage.timeout_s=5", env=env)
        ended = time.monotonic()
        watcher.join()
        assert began and ended - began[0] > 15, "the run did not meet the outage"
        assert "train: done at step 12" in proc.stdout
        got = s3_weights(s3, "outage/held/checkpoints")
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)

        # past storage.retry_s: one line naming the endpoint and how to continue; then, healed, it continues
        watcher, began = outage_once(s3, "outage/cut/checkpoints/step_00000004/trainer_state.json", proxy,
                                     ("reset", 30.0))
        # (a short lock lease: the stopped driver cannot free its lock in the outage; it expires before the re-run)
        cut = ["run.name=cut", "run.lock_lease_s=10"]
        proc = run_cli(*command, *cut, "storage.retry_s=6", "storage.timeout_s=2", env=env, check=False)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and began, proc.stderr[-3000:]
        assert last.startswith("error: train stopped: ") and proxy.url in last and "storage.retry_s" in last, last
        assert "run the same command again" in last
        watcher.join()
        proc = run_cli(*command, *cut, "--resume", env=env)
        assert "resumed from s3://runs/outage/cut/checkpoints/step_00000004" in proc.stdout, proc.stdout[-3000:]
        got = s3_weights(s3, "outage/cut/checkpoints")
        assert all(torch.equal(got[k], expected[k]) for k in got)
    finally:
        proxy.close()


def test_a_checkpoint_staged_on_a_full_disk_is_one_line_naming_the_path(tmp_path, monkeypatch):
    import shutil

    from train.checkpoint import _disk_full_named

    staging = str(tmp_path / "ckpt-staging")
    with pytest.raises(storage.StorageError, match=f"{staging}: no space left on the device"):
        with _disk_full_named(staging), open("/dev/full", "wb") as f:  # a real ENOSPC
            f.write(b"x" * 4096)
            f.flush()
    # torch.save says only "unexpected pos ..." when its write fails: the free space tells
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 30, 1 << 30, 0))
    with pytest.raises(storage.StorageError, match=f"{staging}: no space left on the device"):
        with _disk_full_named(staging):
            torch.save({"w": torch.zeros(100_000)}, "/dev/full")
