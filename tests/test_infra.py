"""infra/: every manifest parses and passes its tool's own checks; the MLflow server of infra/mlflow/ runs
for real from its plain commands on PostgreSQL, and a pipeline run with its run directory on S3 logs to it.
No Docker engine or Kubernetes here: the image and the manifests are checked statically (infra/README.md)."""

from __future__ import annotations

import copy
import glob
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from mlflow.tracking import MlflowClient
from test_pipeline import TINY, free_port, loss_history, runs_by_stage, wait_for

from pipeline.core.config import load_config

INFRA = REPO / "infra"
PINNED = {re.split(r"[\[=<>]", d)[0]: d.split("==")[1] for d in tomllib.loads(
    (REPO / "pyproject.toml").read_text())["project"]["dependencies"] if "==" in d}


def manifests(*kinds: str) -> list[tuple[Path, dict]]:
    found = []
    for path in sorted(INFRA.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") in kinds:
                found.append((path, doc))
    return found


def test_every_yaml_under_infra_parses():
    files = sorted(INFRA.rglob("*.yaml")) + sorted(INFRA.rglob("*.yml"))
    assert len(files) >= 5
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), path


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_ray_cluster_launcher_configs_pass_rays_validation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((INFRA / "ray" / name).read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))
    workers = [t for k, t in raw["available_node_types"].items() if k != raw["head_node_type"]]
    assert workers and all(t["max_workers"] > t["min_workers"] for t in workers)  # the GPU group autoscales
    assert raw["docker"]["image"].split(":")[-1] not in ("", "latest")
    assert any("--shm-size" in o for o in raw["docker"]["run_options"])
    # the validation is real: a misspelled field fails it
    broken = copy.deepcopy(raw)
    broken["available_node_types"]["head"]["max_wrokers"] = 1
    with pytest.raises(Exception):
        validate_config(prepare_config(broken))


def _pod_specs(doc: dict) -> list[tuple[str, dict]]:
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    assert "rayStartParams" in spec["headGroupSpec"]
    groups = [("head", spec["headGroupSpec"])]
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and "rayStartParams" in group and group["maxReplicas"] >= group["minReplicas"]
        groups.append((group["groupName"], group))
    assert spec["rayVersion"] == PINNED["ray"]
    return [(name, g["template"]["spec"]) for name, g in groups]


def test_kuberay_manifests_carry_what_kuberay_and_training_need():
    docs = manifests("RayCluster", "RayJob")
    assert {d["kind"] for _, d in docs} == {"RayCluster", "RayJob"}
    for path, doc in docs:
        assert doc["apiVersion"] == "ray.io/v1" and doc["metadata"]["name"], path
        pods = _pod_specs(doc)
        for name, pod in pods:
            assert pod["containers"] and all(c["image"] and c["name"] for c in pod["containers"]), (path, name)
            env = {e["name"] for c in pod["containers"] for e in c.get("env", [])}
            assert {"MLFLOW_TRACKING_URI", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} <= env, (path, name)
        gpu_groups = [(n, p) for n, p in pods if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
                                                      for c in p["containers"])]
        assert gpu_groups and all(n != "head" for n, _ in gpu_groups), path
        for name, pod in gpu_groups:
            assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"]), (path, name)
            shm = {v["name"] for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"}
            mounts = {m["name"] for c in pod["containers"] for m in c.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"}
            assert shm & mounts, (path, name)


def test_the_rayjob_entrypoint_is_a_valid_pipeline_command_with_a_stable_run_name():
    (path, job), = manifests("RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "pipeline/run.py"] and argv[2] == "--config"
    cfg = load_config(argv[3], argv[4:])  # the preset exists and every override names a real key
    overrides = dict(a.split("=", 1) for a in argv[4:])
    assert "run.name" in overrides and "$" not in overrides["run.name"]  # a retry finds the same run
    assert cfg.run.root.startswith(("s3://", "gs://"))  # outside the cluster a retry replaces
    assert cfg.cluster.use_gpu and job["spec"]["backoffLimit"] >= 1
    assert "fresh cluster" in path.read_text() and "run.name" in path.read_text()


def test_the_dockerfile_lints_clean_and_pins_what_the_project_pins():
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if os.path.exists(hadolint):
        lint = subprocess.run([hadolint, str(INFRA / "docker" / "Dockerfile")], capture_output=True, text=True)
        assert lint.returncode == 0, lint.stdout + lint.stderr
    base = re.search(r"^FROM (\S+)", dockerfile, re.M).group(1)
    assert base.startswith("nvidia/cuda:") and re.search(r":\d+\.\d+\.\d+-", base)
    torch_pin = re.search(r"torch==([\d.]+)", (REPO / "README.md").read_text()).group(1)
    assert f"ARG TORCH_VERSION={torch_pin}" in dockerfile
    cuda = re.search(r"nvidia/cuda:(\d+)\.(\d+)", base).groups()
    assert f"/whl/cu{''.join(cuda)}" in dockerfile  # torch's CUDA build matches the base image's CUDA
    assert f"deepspeed=={PINNED['deepspeed']}" in dockerfile and "DS_BUILD_FUSED_ADAM=1" in dockerfile
    assert "TIKTOKEN_CACHE_DIR=" in dockerfile and "get_encoding('gpt2')" in dockerfile
    assert "RAY_worker_niceness=0" in dockerfile
    compose = yaml.safe_load((INFRA / "mlflow" / "compose.yaml").read_text())
    assert compose["services"]["mlflow"]["image"].endswith(f"v{PINNED['mlflow']}")


# --- the MLflow server of infra/mlflow/, for real ------------------------------------------------------

def _postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    return Path(found[-1]).parent if found else None


class Postgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (Debian's server binaries; as user postgres when root)."""

    def __init__(self, bindir: Path):
        self.bindir, self.port = bindir, free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="pg-"))
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.dir, "postgres")

    def run(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([*self.as_user, *args], capture_output=True, text=True, check=True, **kw)

    def start(self) -> Postgres:
        self.run(str(self.bindir / "initdb"), "-D", str(self.dir / "data"), "-U", "postgres", "--auth=trust")
        self.run(str(self.bindir / "pg_ctl"), "-D", str(self.dir / "data"), "-l", str(self.dir / "log"), "-w", "start",
                 "-o", f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.dir}")
        return self

    def stop(self) -> None:
        subprocess.run([*self.as_user, str(self.bindir / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "immediate",
                        "stop"], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def s3_server():
    moto_server = pytest.importorskip("moto.server")
    import boto3

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1", aws_access_key_id="test",
                 aws_secret_access_key="test").create_bucket(Bucket="runs")
    yield env
    server.stop()


@pytest.mark.slow
def test_the_mlflow_server_from_plain_commands_on_postgres_takes_a_pipeline_run_stored_on_s3(tmp_path, s3_server):
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (.ci/run installs Debian's postgresql)")
    pg = Postgres(bindir).start()
    bin_path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    port = free_port()
    server = None
    try:
        # the runbook's two commands: create the database, then serve
        pg_env = {**os.environ, "PGHOST": "127.0.0.1", "PGPORT": str(pg.port), "PGUSER": "postgres",
                  "MLFLOW_DB_PASSWORD": "secret"}
        for _ in range(2):  # safe to re-run
            created = subprocess.run(["bash", str(INFRA / "mlflow" / "create-database.sh")], env=pg_env,
                                     capture_output=True, text=True)
            assert created.returncode == 0, created.stdout + created.stderr
        server_env = {**os.environ, "PATH": bin_path, "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(port),
                      "MLFLOW_WORKERS": "1", "MLFLOW_DB_URI": f"postgresql://mlflow:secret@127.0.0.1:{pg.port}/mlflow",
                      "MLFLOW_ARTIFACTS": str(tmp_path / "artifacts")}
        server = subprocess.Popen(["bash", str(INFRA / "mlflow" / "serve.sh")], env=server_env, start_new_session=True,
                                  stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT)
        uri = f"http://127.0.0.1:{port}"

        def up() -> bool:
            import urllib.request

            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                return urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200
            except OSError:
                return False

        wait_for(up, 180, "the MLflow server")
        # the smoke preset, its run directory on S3, tracked by the server
        env = {**os.environ, **s3_server, "MLFLOW_TRACKING_URI": uri}
        proc = subprocess.run([sys.executable, str(REPO / "pipeline" / "run.py"), *TINY, "train.max_steps=10",
                               "run.root=s3://runs/pipeline"], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        client = MlflowClient(tracking_uri=uri)
        runs = runs_by_stage(client)
        assert runs["pipeline"].info.status == "FINISHED"
        assert runs["pipeline"].data.tags["run_dir"] == "s3://runs/pipeline/smoke"
        assert runs["pipeline"].data.tags["checkpoint"].startswith("s3://runs/pipeline/smoke/checkpoints/step_")
        assert sorted(loss_history(client, runs["train"].info.run_id)) == list(range(1, 11))
        manifest = client.download_artifacts(runs["tokenize"].info.run_id, "manifest.json", str(tmp_path))
        assert Path(manifest).stat().st_size > 0  # served through the server's artifact proxy
        assert client.get_model_version_by_alias("gpt2-pipeline", "best").run_id == runs["register"].info.run_id
        # and it all sits in PostgreSQL
        count = pg.run("psql", "-h", "127.0.0.1", "-p", str(pg.port), "-U", "mlflow", "-d", "mlflow", "-tAc",
                       "SELECT count(*) FROM runs")
        assert int(count.stdout.strip()) == 5
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
        pg.stop()
