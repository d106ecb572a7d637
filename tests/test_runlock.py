"""A run directory is owned by one run at a time: a second driver is refused naming the holder, and a holder
that died is taken over (at once on local disk, once its lease expires on object storage)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from conftest import REPO, kill_tree, run_cli

from pipeline.core import runlock
from pipeline.core.runlock import RunDirBusy

# holds the lock of argv[1] (lease argv[2] s) and says so, then sleeps until killed
HOLDER = """
import sys, time
from pipeline.core import runlock
with runlock.hold(sys.argv[1], float(sys.argv[2])):
    print("HOLDING", flush=True)
    time.sleep(600)
"""


def start_holder(run_dir: str, lease_s: float, env: dict | None = None) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, run_dir, str(lease_s)], stdout=subprocess.PIPE,
                            text=True, cwd=REPO, env={**os.environ, **(env or {})})
    assert proc.stdout.readline().strip() == "HOLDING"
    return proc


def test_a_local_run_directory_is_held_by_one_run_and_freed_when_its_holder_dies(tmp_path):
    run_dir = str(tmp_path / "runs" / "smoke")
    with runlock.hold(run_dir):
        with pytest.raises(RunDirBusy, match=rf"{run_dir} is in use by pid {os.getpid()} on "):
            with runlock.hold(run_dir):
                pass
    with runlock.hold(run_dir):  # released at the end of the block
        pass
    holder = start_holder(run_dir, 120)
    try:
        with pytest.raises(RunDirBusy, match=rf"in use by pid {holder.pid} "):
            with runlock.hold(run_dir):
                pass
    finally:
        kill_tree(holder.pid)
    with runlock.hold(run_dir):  # SIGKILLed: the kernel dropped its lock
        pass


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    return s3_server


def test_an_s3_run_directory_is_leased_and_an_expired_lease_is_taken_over(s3_env):
    run_dir, lines = "s3://runs/locked/smoke", []
    with runlock.hold(run_dir, lease_s=2):
        time.sleep(1.5)  # renewed meanwhile (every lease/4): still held after the first lease would have ended
        with pytest.raises(RunDirBusy, match=rf"{run_dir} is in use by pid {os.getpid()} .* lease valid for"):
            with runlock.hold(run_dir, lease_s=2):
                pass
    with runlock.hold(run_dir, lease_s=2, log=lines.append):  # released: the lock object is gone
        pass
    assert not lines
    holder = start_holder(run_dir, 3, s3_env)
    kill_tree(holder.pid)  # dies holding it: its lease runs out, nobody renews it
    with pytest.raises(RunDirBusy, match=rf"in use by pid {holder.pid} "):
        with runlock.hold(run_dir, lease_s=3):
            pass
    time.sleep(3.5)
    with runlock.hold(run_dir, lease_s=3, log=lines.append):
        pass
    assert len(lines) == 1 and f"took over the lock of {run_dir} from pid {holder.pid}" in lines[0]


def pipeline_argv(*overrides: str) -> list[str]:
    return ["pipeline/run.py", "--stages", "tokenize,train", "tracking.enabled=false", "train.max_steps=400",
            "eval.interval=0", *overrides]


def wait_for_lock(proc: subprocess.Popen, present, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not present():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the first driver never took the lock"
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_second_driver_is_refused_while_the_first_runs_and_takes_over_after_it_is_killed(where, tmp_path, s3_env):
    from pipeline.core import storage

    # the lease outlasts a driver's start-up (it takes the lock after starting Ray), so a dead holder's still holds
    root, lease = (str(tmp_path / "runs"), 120) if where == "local" else (f"s3://runs/two-drivers-{os.getpid()}", 30)
    overrides = [f"run.root={root}", f"run.lock_lease_s={lease}"]
    lock = storage.join(root, "smoke", runlock.NAME)
    first = subprocess.Popen([sys.executable, *pipeline_argv(*overrides)], cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env={**os.environ, **s3_env})
    try:
        wait_for_lock(first, lambda: storage.exists(lock) and str(first.pid) in storage.read_bytes(lock).decode())
        second = run_cli(*pipeline_argv(*overrides), check=False, env=s3_env, timeout=120)
        assert second.returncode == 2, second.stderr
        error = second.stderr.strip().splitlines()
        assert len(error) == 1 and f"is in use by pid {first.pid}" in error[0] and "Traceback" not in second.stderr
    finally:
        kill_tree(first.pid)
    if where == "s3":  # dead, but its lease has not run out yet
        assert run_cli(*pipeline_argv(*overrides), check=False, env=s3_env, timeout=120).returncode == 2
        time.sleep(lease + 0.5)
    after = run_cli("pipeline/run.py", "--stages", "tokenize", *overrides[:2], "tracking.enabled=false",
                    env=s3_env, timeout=400)
    assert ("took over the lock" in after.stdout) == (where == "s3")
    assert not storage.exists(lock) or where == "local"  # an object-storage lock is removed by its holder
