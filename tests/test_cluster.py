"""The cluster path on one machine: two raylets that share no run directory on disk, the run directory on a
real S3 API (moto's server on 127.0.0.1), a training worker SIGKILLed mid-run, a resume on fewer workers,
and the one-line errors of storage that cannot work. The runs themselves happen once, in
tests/cluster_run.py; the tests check what they left."""

from __future__ import annotations

import json
import os
import re
import sys
import urllib.request

import pytest
from conftest import REPO, run_cli, run_tree
from mlflow.tracking import MlflowClient

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory, s3_server):
    out = tmp_path_factory.mktemp("cluster")
    env = {**os.environ, **s3_server, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    proc = run_tree([sys.executable, str(REPO / "tests" / "cluster_run.py"), str(out)], 1150, cwd=out, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out, json.loads((out / "result.json").read_text()), proc.stdout


def test_a_local_run_directory_is_refused_on_a_cluster_of_two_nodes(cluster_run):
    _, result, _ = cluster_run
    refused = result["local_root"]
    assert refused["code"] == 2 and not refused["created"]
    assert "Ray cluster has 2 nodes" in refused["stderr"] and "run.shared_fs=true" in refused["stderr"]
    assert len(refused["stderr"].strip().splitlines()) == 1 and "Traceback" not in refused["stderr"]


def test_the_pipeline_runs_on_s3_across_two_nodes_and_a_killed_worker_resumes_exactly(cluster_run):
    out, result, stdout = cluster_run
    run, ref = result["pipeline"], result["reference"]
    assert run["code"] == 0 and run["killed"], stdout[-3000:]
    assert ref["nodes"] == 2  # STRICT_SPREAD: one worker per raylet
    expected, got = ref["losses"], run["losses"]
    # the group restarted from a checkpoint on S3 at or after the kill's step-8 commit (the record in the run
    # dir holds each step once: rank 0 copies it there at each checkpoint, and a restart continues that copy)
    resumed = re.search(r"resumed from s3://runs/cluster/smoke/checkpoints/step_(\d{8}) at step", stdout)
    assert resumed and int(resumed.group(1)) >= 8, stdout[-3000:]
    assert sorted(got, key=int) == [str(s) for s in range(1, 17)]
    for step, values in got.items():  # bitwise: fp32 on CPU, the same data and state from S3
        assert all(v == expected[step][0] for v in values), (step, values, expected[step])
    # every output under the run directory on S3, nothing of the run on a node's disk but its working copy
    names = {p.split("/smoke/", 1)[1].split("/")[0] for p in run["run_dir"]}
    assert {"data", "checkpoints", "eval", "stages", "metrics.jsonl"} <= names
    assert any(p.endswith("/smoke/eval/scores.png") for p in run["run_dir"])  # the eval's figure, on S3 too
    assert run["final"].endswith("step_00000016")
    # the metrics rank 0 wrote on its node reached MLflow through the run directory
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("gpt2-pretraining")
    runs = {r.data.tags["gpt2.stage"]: r for r in client.search_runs([experiment.experiment_id])}
    history = {m.step: m.value for m in client.get_metric_history(runs["train"].info.run_id, "train/loss")}
    assert history == {int(s): v[-1] for s, v in got.items()}
    assert runs["pipeline"].info.status == "FINISHED" and "final/val/loss" in runs["eval"].data.metrics
    assert client.get_model_version_by_alias("gpt2-pipeline", "best").run_id == runs["train"].info.run_id


def test_a_checkpoint_on_s3_resumes_on_one_worker_through_a_universal_checkpoint(cluster_run):
    _, result, _ = cluster_run
    one, ref = result["one_worker"], result["reference"]
    assert one["universal"] and one["final"].endswith("step_00000016")
    assert sorted(one["losses"], key=int) == [str(s) for s in range(9, 17)]
    for step, values in one["losses"].items():  # summation order differs with one worker: as the local 2->1 test
        assert values[-1] == pytest.approx(ref["losses"][step][0], rel=1e-5)


# --- storage that cannot work: one line, exit code 2, nothing written lost --------------------------------

def _iam_read_only_keys(endpoint: str) -> dict:
    """A moto IAM user allowed to read the bucket but not to write it."""
    import boto3

    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test",
                       aws_secret_access_key="test")
    iam.create_user(UserName="reader")
    iam.put_user_policy(UserName="reader", PolicyName="read", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"],
                                                "Resource": "*"}]}))
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}


def _moto_auth(endpoint: str, on: bool) -> None:
    """Switch moto's authentication and IAM policy checks on or off (its reset-auth API: the number of requests
    let through before checks start)."""
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0" if on else b"inf",
                                                  headers={"Content-Type": "text/plain"}, method="POST"), timeout=10)


def test_storage_that_cannot_work_is_refused_with_one_line(cluster_run, s3_server, monkeypatch):
    from pipeline.core import storage

    for key, value in s3_server.items():  # this process reads the bucket too
        monkeypatch.setenv(key, value)
    # what a crash in the middle of the first save leaves: files, no commit
    storage.write_bytes("s3://runs/torn/checkpoints/step_00000004/model.safetensors", b"partial")
    before = sorted(storage.filesystem("s3://runs")[0].find("runs"))
    endpoint = s3_server["AWS_ENDPOINT_URL"]
    train = ["train/run.py", "--config", "smoke", "--resume", "run.root=s3://runs/cluster", "train.max_steps=20"]
    no_keys = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
               "AWS_CONFIG_FILE": "/nonexistent", "AWS_EC2_METADATA_DISABLED": "true"}
    cases = [  # (arguments, environment, what the line must say)
        # a refused connection may be an outage: retried for storage.retry_s (5 minutes by default), then refused
        ([*train, "storage.retry_s=3"], {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, "cannot reach the storage endpoint"),
        (["train/run.py", "--config", "smoke", "--resume", "run.root=s3://no-such-bucket/runs"], {}, "create the bucket"),
        (train, no_keys, "no credentials"),
        (["eval/run.py", "--ckpt", "s3://runs/torn/checkpoints"], {}, "no committed checkpoint"),
    ]
    reader = _iam_read_only_keys(endpoint)
    for args, env, message in cases:
        proc = run_cli(*args, env={**s3_server, **env}, check=False, timeout=300)
        assert proc.returncode == 2, (args, env, proc.stdout[-2000:], proc.stderr[-2000:])
        lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr, (message, proc.stderr[-2000:])
    _moto_auth(endpoint, on=True)
    try:
        proc = run_cli(*train, env={**s3_server, **reader}, check=False, timeout=300)
    finally:
        _moto_auth(endpoint, on=False)
    assert proc.returncode == 2 and "permission denied" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert sorted(storage.filesystem("s3://runs")[0].find("runs")) == before
