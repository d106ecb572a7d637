"""What a run leaves in <run dir>/diagnostics/: the hang watchdog's timeout and stacks (locally and on S3), the
out-of-memory message with the plan's figure, and profiler traces (per rank, and rank 0's in MLflow).
The hung rank restarted to an uninterrupted run's weights is in tests/test_train.py, beside the killed worker."""

from __future__ import annotations

import json
import os
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_config

from pipeline.core import storage
from pipeline.core.config import ConfigError, load_config
from train import diagnostics, faults, launch, plan, watchdog
from train.engine import Batch


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_step_timeout_is_derived_from_the_measured_step_time_with_a_floor_and_longer_phases():
    cfg = load_config("smoke", ["train.log_interval=2"])
    assert watchdog.step_timeout(42.0, [1.0] * 9, 1, 1800) == 42.0  # configured: as given
    assert watchdog.step_timeout(None, [], 1, 1800) == 1800  # nothing measured yet: the phase allowance
    assert watchdog.step_timeout(None, [0.5, 1.5], 1, 1800) == watchdog.STEP_TIMEOUT_FLOOR_S
    assert watchdog.step_timeout(None, [20.0, 30.0], 2, 1800) == 20 * 25 * 2
    assert watchdog.step_timeout(None, [200.0], 1, 1800) == 1800  # never past the phase allowance
    assert watchdog.collective_timeout_s(cfg) == 1800 + 300  # the process group's: past every allowance

    clock = Clock()
    dog = watchdog.Watchdog(cfg, 0, "unused", clock=clock)
    dog.step = dog.first = 10  # as start(10) sets it, without the thread
    for step in range(11, 16):  # the first two steps (compilation) are slow and not measured
        clock.now += 100.0 if step <= 12 else 30.0
        if step == 14:
            with dog.phase("a checkpoint save"):
                assert dog.deadline == clock.now + 1800
                clock.now += 500.0  # a long save: not a step's time
        dog.beat(step)
        if step <= 11:
            assert dog.deadline == clock.now + 1800 and dog.doing == "the first steps after a start"
    assert list(dog.intervals) == [30.0, 30.0, 30.0]
    assert dog.deadline == clock.now + 20 * 30 * 2 and dog.doing == "a training step"


def test_the_config_refuses_bad_watchdog_profile_and_snapshot_settings():
    assert load_config("smoke", ["train.profile_steps=3-5", "train.step_timeout_s=20"]).train.step_timeout_s == 20
    for bad, key in (("train.profile_steps=5-3", "train.profile_steps"), ("train.profile_steps=0-2", "train.profile_steps"),
                     ("train.profile_steps=x", "train.profile_steps"), ("train.step_timeout_s=0", "train.step_timeout_s"),
                     ("train.memory_snapshot=true", "train.memory_snapshot")):
        with pytest.raises(ConfigError, match=key):
            load_config("smoke", [bad])


def stuck_in_a_collective(release: threading.Event) -> None:
    release.wait()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_rank_whose_step_does_not_complete_writes_its_stacks_naming_step_and_rank(where, tmp_path, request,
                                                                                    monkeypatch):
    if where == "s3":
        for key, value in request.getfixturevalue("s3_server").items():
            monkeypatch.setenv(key, value)
    run_dir = str(tmp_path) if where == "local" else "s3://runs/hang"
    cfg = load_config("smoke", ["train.step_timeout_s=0.5"])
    release, exits = threading.Event(), []
    stuck = threading.Thread(target=stuck_in_a_collective, args=(release,), name="the training step")
    stuck.start()
    dog = watchdog.Watchdog(cfg, 1, diagnostics.directory(run_dir), poll_s=0.05, grace_s=0, on_fire=exits.append)
    dog.start(6)
    for step in (7, 8, 9):  # past the first steps: the configured timeout applies
        dog.beat(step)
    deadline = time.time() + 30
    while not exits and time.time() < deadline:
        time.sleep(0.05)
    release.set()
    stuck.join()
    assert exits == [watchdog.EXIT_CODE]
    text = storage.read_bytes(storage.join(diagnostics.directory(run_dir), "hang-step00000010-rank1.txt")).decode()
    assert "rank 1" in text and "at step 10 (last completed: 9)" in text
    assert "in stuck_in_a_collective" in text  # every thread's stack, the stuck one's included


def test_a_cuda_out_of_memory_error_ends_the_run_with_one_line_naming_the_settings_and_the_plan(tmp_path):
    cfg = load_config("smoke", ["batch.micro_batch_size=8", "deepspeed.zero_stage=2"])
    recipe = SimpleNamespace(name="train", run_dir=str(tmp_path), batch=Batch.of(cfg))
    diag = diagnostics.Diagnostics(cfg, recipe, 1, torch.device("cpu"), None,
                                   faults.Injector(1, str(tmp_path), "oom@5:rank=1"))
    before = diagnostics.begin(str(tmp_path))
    diag.before_step(4)
    with pytest.raises(torch.OutOfMemoryError), diag.guard():
        diag.before_step(5)
    assert diag.stopped()  # a restarted group does no work
    with pytest.raises(diagnostics.OutOfMemory) as err:
        diagnostics.report(str(tmp_path), before, "train")
    message = str(err.value)
    figure = f"{plan.plan(cfg).total / plan.GIB:.2f} GiB"
    assert "\n" not in message and message.startswith("train: CUDA out of memory at step 5 on rank 1")
    for part in ("batch.micro_batch_size=8", f"batch.seq_len={cfg.batch.seq_len}", "deepspeed.zero_stage=2",
                 "deepspeed.activation_checkpointing=false", f"--plan estimates {figure}"):
        assert part in message, (part, message)
    diagnostics.begin(str(tmp_path))  # the next job (with other settings) starts afresh
    assert not diag.stopped()


@pytest.mark.slow
def test_profiled_steps_leave_a_trace_per_rank_and_rank_0s_in_mlflow_then_an_oom_ends_the_run(
        tmp_path, builtin_dataset, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("t", artifact_location=str(tmp_path / "artifacts"))).info.run_id
    cfg = tiny_config(tmp_path, builtin_dataset, "train.profile_steps=2-3", "train.max_steps=8",
                      "cluster.max_failures=1")
    monkeypatch.setenv(faults.ENV, "oom@5:rank=1")
    with pytest.raises(diagnostics.OutOfMemory, match="CUDA out of memory at step 5 on rank 1 .* --plan estimates"):
        launch.run(cfg, tracking={"uri": uri, "run_id": run_id})
    out = capsys.readouterr().out
    folder = diagnostics.directory(cfg.run_dir)
    assert f"train: diagnostics in {folder}/: profile-steps2-3-rank0.json, profile-steps2-3-rank1.json" in out
    for rank in (0, 1):
        with open(os.path.join(folder, f"profile-steps2-3-rank{rank}.json")) as f:
            events = json.load(f)["traceEvents"]
        names = {e.get("name") for e in events}
        assert "aten::mm" in names or "aten::addmm" in names, sorted(n for n in names if n)[:50]
    [artifact] = client.list_artifacts(run_id, "profile")
    logged = client.download_artifacts(run_id, artifact.path, str(tmp_path / "down"))
    with open(logged) as a, open(os.path.join(folder, "profile-steps2-3-rank0.json")) as b:
        assert a.read() == b.read()
    # the restarted group did no work: the record ends at the step-4 checkpoint
    steps = [json.loads(line)["step"] for line in open(cfg.metrics_file)]
    assert max(steps) == 4


def test_gpu_workers_get_the_flight_recorders_environment_and_upload_what_nccls_timeout_dumped(tmp_path, monkeypatch):
    env = watchdog.flight_recorder_env("s3://runs/big/run")
    assert int(env["TORCH_NCCL_TRACE_BUFFER_SIZE"]) > 0 and env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    prefix = env["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"]
    assert env["TORCH_FR_DUMP_TEMP_FILE"] == prefix and "runs_big_run" in prefix  # a folder per run directory
    prefix = str(tmp_path / "nccl" / "run" / "rank_")
    monkeypatch.setenv("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", prefix)
    folder = str(tmp_path / "diagnostics")
    assert watchdog.upload_nccl_dumps(folder) == [] and os.path.isdir(os.path.dirname(prefix))  # made for NCCL
    with open(prefix + "1", "wb") as f:  # what an NCCL timeout in an earlier worker left on this node
        f.write(b"trace of rank 1")
    assert watchdog.upload_nccl_dumps(folder) == [os.path.join(folder, "nccl-timeout-rank_1.pickle")]
    assert storage.read_bytes(os.path.join(folder, "nccl-timeout-rank_1.pickle")) == b"trace of rank 1"
    assert not os.path.exists(prefix + "1")
