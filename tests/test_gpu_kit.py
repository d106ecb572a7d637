"""bench/gpu.py, the GPU acceptance kit, runs end to end in its CPU smoke mode with only what the GPU
machine has: every process runs under tests/gpu_machine's import guard (sitecustomize on PYTHONPATH),
which hides every installed package the GPU machine lacks (Ray, MLflow, ...)."""

from __future__ import annotations

import json
import os

import pytest
from conftest import REPO, run_cli

GUARD = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "tests" / "gpu_machine"), os.environ.get("PYTHONPATH")])),
         "DS_ACCELERATOR": "cpu"}


def test_the_guard_hides_what_the_gpu_machine_lacks(tmp_path):
    code = ("import sys; assert any(type(f).__name__ == 'Absent' for f in sys.meta_path), sys.meta_path\n"
            "import torch, numpy, yaml, pydantic, deepspeed, pipeline.core.config\n"
            "for name in ('ray', 'mlflow', 'boto3'):\n"
            "    try:\n"
            "        __import__(name)\n"
            "    except ModuleNotFoundError:\n"
            "        continue\n"
            "    raise AssertionError(name + ' was importable')\n"
            "import importlib.util; assert importlib.util.find_spec('ray') is None\n")
    run_cli("-c", code, env=GUARD)
    # what a kit that needed Ray would do: fail at import, naming it
    (tmp_path / "kit.py").write_text("import train.engine\nimport ray\n")
    proc = run_cli(str(tmp_path / "kit.py"), env={**GUARD, "PYTHONPATH": f"{GUARD['PYTHONPATH']}{os.pathsep}{REPO}"},
                   check=False)
    assert proc.returncode != 0 and "No module named 'ray'" in proc.stderr
    assert "gpu-machine imports: refused ray" in proc.stderr


def test_the_kit_and_what_it_imports_load_with_only_the_gpu_machines_packages():
    code = ("import runpy, sys; runpy.run_path('bench/gpu.py', run_name='kit'); "
            "bad = [m for m in ('ray', 'mlflow', 'tiktoken') if m in sys.modules]; assert not bad, bad")
    proc = run_cli("-c", code, env=GUARD)
    assert "Error in sitecustomize" not in proc.stderr


@pytest.mark.slow
def test_smoke_mode_checks_logits_and_measures_each_micro_batch_through_the_trainer_step(tmp_path):
    proc = run_cli("bench/gpu.py", "--smoke", "--out", str(tmp_path / "gpu.json"), env=GUARD)
    assert "Error in sitecustomize" not in proc.stderr
    assert "logits vs CPU" in proc.stdout and ": OK" in proc.stdout
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["kit"] == "smoke" and result["logits"]["fp32_max_diff"] == 0.0
    assert result["logits"]["bf16_argmax_agreement"] > 0.9
    measured = [r for r in result["runs"] if "skipped" not in r]
    assert [(r["micro_batch"], r["loss_impl"]) for r in measured] == [(2, "chunked"), (4, "chunked")]
    for r in measured:
        assert r["tokens_per_s"] > 0 and 9 < r["loss"] < 12 and r["plan_gib"] > 0 and r["mfu"] is None
    # Liger's head needs CUDA: reported as skipped, both as a step and among the heads
    assert [r["loss_impl"] for r in result["runs"] if "skipped" in r] == ["liger"]
    heads = {r["impl"]: r for r in result["loss_heads"]}
    assert heads["chunked"]["ms"] > 0 and 9 < heads["chunked"]["loss"] < 12 and "skipped" in heads["liger"]


def test_every_configuration_has_its_own_cap_and_the_eager_sweep_comes_first():
    import runpy

    kit = runpy.run_path(str(REPO / "bench" / "gpu.py"), run_name="kit")
    for mode in (kit["FULL"], kit["QUICK"]):
        jobs = mode["jobs"]
        assert all(0 < j["cap_s"] < mode["budget"] for j in jobs)
        firsts = [(j["kind"], j["compiled"], j["loss_impl"]) for j in jobs[:2]]
        assert firsts == [("step", False, "chunked")] * 2  # the main question first
        assert {(j["kind"], j["loss_impl"]) for j in jobs} >= {("heads", "chunked"), ("step", "liger")}
    assert [j["micro_batch"] for j in kit["FULL"]["jobs"][:3]] == [16, 32, 64]
    # --quick fits 4 minutes: its budget, with the logits check and a process start inside it
    assert kit["QUICK"]["budget"] <= 220 and kit["QUICK"]["steps"] < kit["FULL"]["steps"]


def test_a_configuration_that_hangs_is_stopped_at_its_cap_with_its_children():
    import runpy
    import sys
    import time

    import psutil

    kit = runpy.run_path(str(REPO / "bench" / "gpu.py"), run_name="kit")
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    started = time.monotonic()
    result, error = kit["_child"]([sys.executable, "-c", code], 2)
    assert (result, error) == (None, "timeout") and time.monotonic() - started < 10
    time.sleep(0.5)
    assert not [p for p in psutil.process_iter(["cmdline"]) if "time.sleep(60)" in " ".join(p.info["cmdline"] or [])]
