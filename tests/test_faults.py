"""The fault-injection aid's spec: what it reads, what it refuses, and that a fault fires once per run dir."""

import math

import pytest

from train import faults


def test_the_spec_reads_kinds_steps_ranks_and_every():
    assert faults.parse("nan@12, hang@20:rank=1,oom@5:every,spike@7") == [
        faults.Fault("nan", 12), faults.Fault("hang", 20, 1), faults.Fault("oom", 5, None, True),
        faults.Fault("spike", 7)]
    assert faults.parse("") == []
    for bad in ("nan", "nan@x", "melt@3", "nan@3:rank=a"):
        with pytest.raises(faults.FaultSpecError, match="GPT2_PIPELINE_FAULTS"):
            faults.parse(bad)


def test_a_fault_fires_on_its_rank_once_per_run_dir_unless_every(tmp_path, monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    assert not faults.Injector(0, str(tmp_path))  # unset: nothing
    spec = "hang@3:rank=1,nan@4:every"
    rank0, rank1 = faults.Injector(0, str(tmp_path), spec), faults.Injector(1, str(tmp_path), spec)
    assert not rank0.at(3, "hang") and not rank1.at(2, "hang") and not rank1.at(3, "nan")
    assert rank1.at(3, "hang")
    assert not faults.Injector(1, str(tmp_path), spec).at(3, "hang")  # a restarted worker meets it no more
    assert [rank0.at(4, "nan") for _ in range(3)] == [True] * 3


def test_the_loss_factor_is_nan_or_the_spike_or_none(tmp_path):
    injector = faults.Injector(0, str(tmp_path), "nan@4,spike@5:rank=0,spike@6:rank=1")
    factors = [injector.loss_factor(step) for step in (3, 4, 5, 6)]
    assert factors[0] is None and math.isnan(factors[1]) and factors[2] == faults.SPIKE and factors[3] is None
    assert injector.loss_factor(5) is None  # fired once for this run dir
