"""bench/gpu.py, the GPU acceptance kit, runs end to end in its CPU smoke mode and needs no Ray or MLflow."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli


def test_the_kit_imports_neither_ray_nor_mlflow():
    code = ("import runpy, sys; runpy.run_path('bench/gpu.py', run_name='kit'); "
            "bad = [m for m in ('ray', 'mlflow', 'tiktoken') if m in sys.modules]; assert not bad, bad")
    run_cli("-c", code)


@pytest.mark.slow
def test_smoke_mode_checks_logits_and_measures_each_micro_batch_through_the_trainer_step(tmp_path):
    proc = run_cli("bench/gpu.py", "--smoke", "--out", str(tmp_path / "gpu.json"), env={"DS_ACCELERATOR": "cpu"})
    assert "logits vs CPU" in proc.stdout and ": OK" in proc.stdout
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["logits"]["fp32_max_diff"] == 0.0 and result["logits"]["bf16_argmax_agreement"] > 0.9
    assert [r["micro_batch"] for r in result["runs"]] == [2, 4]
    for r in result["runs"]:
        assert r["tokens_per_s"] > 0 and 9 < r["loss"] < 12 and r["plan_gib"] > 0 and r["mfu"] is None
