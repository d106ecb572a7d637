"""The run's metrics record (metrics.jsonl) and its copy in MLflow hold one value per step, also when a
resumed run redoes the steps after its checkpoint."""

from __future__ import annotations

import os
import time

from pipeline.core.tracking import JsonLines, Mirror, MlflowUploader, cursor_path, read_cursor, read_jsonl, rewind


def write_steps(path: str, steps, scale: float = 1.0) -> None:
    log = JsonLines(path)
    for step in steps:
        log.log({"train/loss": 10.0 / step * scale, "train/step_time_s": time.time()}, step)
    log.close()


def test_a_rewind_drops_the_steps_a_resume_redoes_and_a_torn_last_line(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    write_steps(path, range(1, 8))
    with open(path, "a") as f:
        f.write('{"step": 8, "train/lo')  # a writer killed mid-line
    assert rewind(path, 4, None) == 4
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3, 4]
    assert rewind(path, 4, None) == 0 and rewind(str(tmp_path / "absent.jsonl"), 4, None) == 0


def test_mlflow_keeps_one_value_per_step_across_a_resume(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("record")).info.run_id
    path = str(tmp_path / "metrics.jsonl")
    write_steps(path, range(1, 7))
    assert MlflowUploader(path, run_id, uri).drain(timeout_s=30)  # steps 1-6 reached MLflow, then the crash
    rewind(path, 3, run_id)  # resumed from the step-3 checkpoint
    assert read_cursor(cursor_path(path, run_id)) == (os.path.getsize(path), 3)  # 4-6 will come again: skip them
    write_steps(path, range(4, 9))  # redone 4-6 (as MLflow has them), then new 7-8
    assert MlflowUploader(path, run_id, uri).drain(timeout_s=30)
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 9))
    assert {m.step: m.value for m in history} == {r["step"]: r["train/loss"] for r in read_jsonl(path)}


def test_the_mirror_copies_a_rewritten_file_of_the_same_size(tmp_path):
    local, remote = tmp_path / "cursor", tmp_path / "run-dir" / "cursor"
    local.write_text("1200 0")
    mirror = Mirror({str(local): str(remote)})
    mirror.publish()
    assert remote.read_text() == "1200 0"
    time.sleep(0.01)
    local.write_text("1100 3")  # the cursor after a rewind: same length, new content
    mirror.publish()
    assert remote.read_text() == "1100 3"
