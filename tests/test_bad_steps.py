"""Bad steps and skipped data: a non-finite step is applied on no rank, a run of them sends the workers back to
the last checkpoint with their data skipped (recorded, so a resume skips it too), train.skip_steps skips by hand;
the config refuses values that can only produce NaN, and pruning keeps the last checkpoint with a finite loss."""

from __future__ import annotations

import hashlib
import json
import math
import os

import pytest
import torch
from conftest import killing_a_worker_after, tiny_config
from test_train import final_weights, losses

from pipeline.core import storage
from pipeline.core.config import ConfigError, load_config
from pipeline.core.model import checkpoints
from pipeline.core.model.checkpoints import CheckpointError, TrainerState
from pipeline.core.tracking import read_jsonl
from train import checkpoint, faults, launch
from train.loop import in_ranges, merged_ranges


@pytest.mark.parametrize("override", ["train.lr=1e30", "train.lr=.inf", "train.lr=.nan", "train.lr=2.0",
                                      "finetune.lr=.inf", "train.grad_clip=.inf", "train.eps=.nan",
                                      "train.weight_decay=.inf"])
def test_values_that_can_only_produce_nan_are_refused_naming_the_key(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config("smoke", [override])


def test_skip_steps_are_read_as_step_ranges_and_bad_ones_are_named():
    assert load_config("smoke", ["train.skip_steps=12"]).train.skipped_ranges() == [(12, 12)]
    assert load_config("smoke", ["train.skip_steps=2-4, 10-12"]).train.skipped_ranges() == [(2, 4), (10, 12)]
    assert load_config("smoke", ["finetune.skip_steps=3-3"]).finetune.skipped_ranges() == [(3, 3)]
    for bad in ("5-3", "0-2", "a-b", "50-70"):  # smoke's train.max_steps is 60
        with pytest.raises(ConfigError, match=r"train\.skip_steps"):
            load_config("smoke", [f"train.skip_steps={bad}"])
    assert merged_ranges([[10, 12], [2, 4], [5, 6], [11, 20]]) == [[2, 6], [10, 20]]
    ranges = [[2, 6], [10, 20]]
    assert [s for s in range(1, 23) if in_ranges(ranges, s)] == [*range(2, 7), *range(10, 21)]


def commit(directory: str, step: int, loss: float | None, **fields) -> None:
    """A committed checkpoint as far as the commit record goes: its trainer state, recording its one file."""
    name = checkpoints.step_name(step)
    weights = b"weights of step %d" % step
    storage.write_bytes(storage.join(directory, name, "model.safetensors"), weights)
    files = {"model.safetensors": {"size": len(weights), "sha256": hashlib.sha256(weights).hexdigest()}}
    state = json.dumps({**TrainerState(step=step, loss=loss).__dict__, "files": files, **fields})  # NaN as json writes it
    storage.write_bytes(storage.join(directory, name, checkpoints.STATE), state.encode())


@pytest.mark.parametrize("where", ["local", "s3"])
def test_going_back_takes_the_newest_intact_finite_checkpoint_and_pruning_keeps_the_newest_finite(
        where, tmp_path, s3_server, monkeypatch):
    if where == "s3":
        for key, value in s3_server.items():
            monkeypatch.setenv(key, value)
    directory = str(tmp_path / "ckpt") if where == "local" else f"s3://runs/{tmp_path.name}/ckpt"
    for step, loss in [(4, 3.0), (8, 2.5), (12, float("nan")), (16, float("inf"))]:
        commit(directory, step, loss)
    said: list[str] = []
    # the one chooser of resume and going back: bad steps from 17 go back past the non-finite 12 and 16
    assert checkpoint.newest_intact(directory, say=said.append, before=17) == storage.join(directory, "step_00000008")
    assert checkpoint.newest_intact(directory, say=said.append, before=8) == storage.join(directory, "step_00000004")
    assert checkpoint.newest_intact(directory, say=said.append, before=4) is None and not said
    assert checkpoint.newest_intact(directory, say=said.append) == storage.join(directory, "step_00000016")  # resume
    # step 8's weights overwritten in place (same size): going back verifies the files and passes it over
    weights = storage.join(directory, "step_00000008", "model.safetensors")
    storage.write_bytes(weights, storage.read_bytes(weights).upper())
    assert checkpoint.newest_intact(directory, say=said.append, before=17) == storage.join(directory, "step_00000004")
    assert len(said) == 2 and weights in said[0] and "step_00000004" in said[1], said
    with pytest.raises(CheckpointError, match="no checkpoint before step 5 with a finite loss verifies"):
        storage.write_bytes(storage.join(directory, "step_00000004", "model.safetensors"), b"")
        checkpoint.newest_intact(directory, say=said.append, before=5)

    checkpoint._prune(directory, keep_last=1)  # by the recorded loss alone: step 8 is kept
    assert checkpoints.committed(directory) == ["step_00000008", "step_00000016"]
    commit(directory, 20, 2.0)
    checkpoint._prune(directory, keep_last=1)  # a finite one is the newest again: the older ones go
    assert checkpoints.committed(directory) == ["step_00000020"]


@pytest.mark.parametrize("key,value", [
    *(("skip_steps", v) for v in ([[3]], [[0, 2]], [[5, 4]], [["1", 2]], "1-2", [[1, True]], [[1, 2]] * 100_001)),
    *(("loss_window", v) for v in ([float("nan")], [2.5, float("inf")], ["2.5"], [True], 2.5, [2.5] * 10_001))])
def test_a_hostile_skip_or_loss_record_in_a_trainer_state_is_refused_naming_it(key, value, tmp_path):
    commit(str(tmp_path), 4, 1.0, **{key: value})
    with pytest.raises(CheckpointError, match=key):
        TrainerState.read(str(tmp_path / "step_00000004"))


def test_a_loss_window_reads_back_and_the_spike_settings_are_checked(tmp_path):
    commit(str(tmp_path), 4, 1.0, loss_window=[2.5, 3, 1e-3])
    assert TrainerState.read(str(tmp_path / "step_00000004")).loss_window == [2.5, 3, 1e-3]
    for bad in ("train.spike_factor=1", "train.spike_factor=.inf", "train.spike_window=0",
                "train.spike_window=10001", "finetune.spike_factor=0.5"):
        with pytest.raises(ConfigError, match=bad.split("=")[0].replace(".", r"\.")):
            load_config("smoke", [bad])
    assert load_config("smoke", ["train.spike_factor=3"]).train.spike_window == 100


@pytest.mark.parametrize("stage,precision", [(0, "fp32"), (1, "fp32"), (2, "fp32"), (3, "fp32"), (0, "bf16"),
                                             (2, "bf16")])
def test_a_nan_step_or_a_spike_leaves_weights_and_optimizer_as_if_it_were_never_taken(stage, precision):
    from test_engine import batches, tiny

    from train import engine as engines

    engines.local_process_group(use_gpu=False)
    cfg = tiny(f"deepspeed.zero_stage={stage}", f"deepspeed.precision={precision}")

    def run(steps: list[int], nan_at: int = -1, spike_at: int = -1) -> tuple[list[float], dict[str, torch.Tensor]]:
        engine, out = engines.initialize(cfg, world_size=1), []
        for step in steps:
            engines.set_lr(engine, engines.lr_at(step, cfg))
            # a spike: a loss above the bound (the loss starts near ln(50257) = 10.8); a bound far above it elsewhere
            bound = (1.0 if step == spike_at else 1e6) if spike_at >= 0 else None
            loss, _ = engines.train_step(engine, batches(cfg, step), torch.device("cpu"), max_loss=bound,
                                         fault=float("nan") if step == nan_at else None)
            out.append(loss.item())
        return out, checkpoint.full_state_dict(engine, engine.module)

    (bad, after_bad), (skipped, after_skip) = run([0, 1, 2, 3, 4], nan_at=2, spike_at=3), run([0, 1, 4])
    assert math.isnan(bad[2]) and bad[3] > 1.0 and bad[:2] + bad[4:] == skipped  # the step after them: the same bits
    assert all(torch.equal(after_bad[k], after_skip[k]) for k in after_skip)


def records(run_dir, key: str) -> dict[int, dict]:
    return {r["step"]: r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if key in r}


@pytest.mark.slow
def test_a_nan_step_and_a_loss_spike_on_two_workers_are_applied_nowhere_like_skipped_steps(tmp_path, builtin_dataset,
                                                                                            monkeypatch):
    from mlflow.tracking import MlflowClient

    from pipeline.core.lineage import Lineage

    skipped = tiny_config(tmp_path / "skip", builtin_dataset, "train.max_steps=16", "train.skip_steps=12-12,14-14")
    launch.run(skipped)
    # step 14's loss is 1000 times as large on every rank: above 3 x the median of the last 4 good steps' losses
    bad = tiny_config(tmp_path / "nan", builtin_dataset, "train.max_steps=16", "tracking.system_metrics=false",
                      "train.spike_factor=3", "train.spike_window=4")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    track = Lineage(uri, "gpt2-pretraining", bad.with_absolute_paths().run_dir)
    track.start_parent("nan", {}, {})
    run_id = track.stage_run("train")
    monkeypatch.setenv(faults.ENV, "nan@12:rank=1,spike@14")  # one rank's NaN: both ranks leave the step out
    result = launch.run(bad, tracking={"uri": uri, "run_id": run_id})
    assert result.step == 16 and math.isfinite(result.loss)

    got, expected = losses(bad.run_dir), losses(skipped.run_dir)
    assert math.isnan(got[12][0]) and got[14][0] > 100 * got[13][0] and not {12, 14} & expected.keys()
    # bitwise, before and after: the bad steps left no trace in the weights, the optimizer or the data order
    assert {s: v for s, v in got.items() if s not in (12, 14)} == expected
    a, b = final_weights(bad), final_weights(skipped)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    per_step = 1024 // 64  # sequences a step draws
    assert {s: r["train/bad_sequence"] for s, r in records(bad.run_dir, "train/bad_step").items()} == {
        12: 11 * per_step, 14: 13 * per_step}
    assert {s: r["train/skipped_sequence"] for s, r in records(skipped.run_dir, "train/skipped_step").items()} == {
        12: 11 * per_step, 14: 13 * per_step}
    assert [m.step for m in MlflowClient(uri).get_metric_history(run_id, "train/bad_step")] == [12, 14]
    assert TrainerState.read(checkpoints.latest(skipped.checkpoint_dir)).skip_steps == [[12, 12], [14, 14]]
    # the window the spike check compares with, as committed: the last 4 good steps' losses
    final = TrainerState.read(checkpoints.latest(bad.checkpoint_dir))
    assert final.loss_window == [got[s][0] for s in (11, 13, 15, 16)]


@pytest.mark.slow
def test_bad_steps_in_a_row_go_back_skip_their_data_and_a_resume_skips_it_too(tmp_path, builtin_dataset, monkeypatch):
    # steps 9-13 are bad: after the 5th the workers go back to step 8 and skip 9-13; step 12 is checkpointed
    # again in the skipped stretch, so a worker killed at step 14 resumes there and must skip 13 from its record;
    # step 15's loss spikes, and only the loss window that checkpoint holds (steps 5-8's) lets the resumed
    # workers see it as the uninterrupted ones do
    faulty = [*(f"nan@{s}:every" for s in range(9, 14)), "spike@15:every"]
    monkeypatch.setenv(faults.ENV, ",".join(faulty))
    overrides = ["train.max_steps=16", "train.max_bad_steps=5", "train.spike_factor=3", "train.spike_window=4"]
    whole = tiny_config(tmp_path / "whole", builtin_dataset, *overrides)
    launch.run(whole)
    killed = tiny_config(tmp_path / "killed", builtin_dataset, *overrides, "cluster.max_failures=1")
    with killing_a_worker_after(killed.metrics_file, 14):
        launch.run(killed)

    for cfg in (whole, killed):
        final = TrainerState.read(checkpoints.latest(cfg.checkpoint_dir))
        assert final.step == 16 and final.skip_steps == [[9, 13]]
        assert final.tokens == (16 - 5) * 1024  # the skipped steps trained on nothing
        assert sorted(records(cfg.run_dir, "train/skipped_step")) == [9, 10, 11, 12, 13]
        # went back past 9-13 (the record holds their skips); the spike is the one bad step left
        assert sorted(records(cfg.run_dir, "train/bad_step")) == [15]
        got = losses(cfg.run_dir)
        assert sorted(got) == [1, 2, 3, 4, 5, 6, 7, 8, 14, 15, 16] and all(len(v) == 1 for v in got.values())
        assert final.loss_window == [got[s][0] for s in (7, 8, 14, 16)]
    assert losses(whole.run_dir) == losses(killed.run_dir)
    a, b = final_weights(whole), final_weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)
