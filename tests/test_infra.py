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
from conftest import REPO, run_tree
from mlflow.tracking import MlflowClient
from test_pipeline import TINY, answers, free_port, loss_history, runs_by_stage, wait_for

from pipeline.core.config import load_config

INFRA = REPO / "infra"
PINNED = {re.split(r"[\[=<>]", d)[0]: d.split("==")[1] for d in tomllib.loads(
    (REPO / "pyproject.toml").read_text())["project"]["dependencies"] if "==" in d}


# EFA network cards per instance type (EC2 user guide, "Supported instance types" for EFA): the interfaces a
# launcher must attach and the vpc.amazonaws.com/efa devices a pod must request to get the whole fabric
EFA_CARDS = {"p4d.24xlarge": 4, "p4de.24xlarge": 4, "p5.48xlarge": 32, "p5e.48xlarge": 32, "p5en.48xlarge": 16}
# NVIDIA's minimum Linux driver branch for each CUDA toolkit (CUDA release notes, "CUDA Toolkit and driver versions")
CUDA_MIN_DRIVER = {(12, 8): 570, (12, 9): 575, (13, 0): 580}
# The driver branch each host image ships. AWS's DLAMI parameter moves with releases: 580 from late 2025, 595 in 2026
# (its release notes); Google's image family names its branch.
HOST_IMAGE_DRIVER = {
    "resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-24.04/latest/ami-id": 580,
    "projects/ubuntu-os-accelerator-images/global/images/family/ubuntu-accelerator-2204-amd64-with-nvidia-580": 580,
    "projects/deeplearning-platform-release/global/images/family/common-cu128-ubuntu-2204-nvidia-570": 570,
}


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
            # EFA: the pod lands on an EFA instance type and takes all its devices, may pin memory, and NCCL must use it
            cards = EFA_CARDS[pod["nodeSelector"]["node.kubernetes.io/instance-type"]]
            for c in pod["containers"]:
                assert c["resources"]["requests"]["vpc.amazonaws.com/efa"] == c["resources"]["limits"][
                    "vpc.amazonaws.com/efa"] == str(cards), (path, name)
                assert "IPC_LOCK" in c["securityContext"]["capabilities"]["add"], (path, name)
                env = {e["name"]: e.get("value") for e in c["env"]}
                assert env["FI_PROVIDER"] == "efa" and env["FI_EFA_USE_DEVICE_RDMA"] == "1", (path, name)
                assert env["NCCL_NET"] == "OFI", (path, name)


def _launcher(name: str) -> dict:
    return yaml.safe_load((INFRA / "ray" / name).read_text())


def _host_images(raw: dict) -> dict[str, str]:
    """node type -> the image its VMs boot (AWS ImageId, GCP boot disk sourceImage)."""
    images = {}
    for node_type, spec in raw["available_node_types"].items():
        cfg = spec["node_config"]
        images[node_type] = cfg.get("ImageId") or next(d["initializeParams"]["sourceImage"] for d in cfg["disks"] if d["boot"])
    return images


def _driver_problems(raw: dict, cuda: tuple[int, int]) -> list[str]:
    need = CUDA_MIN_DRIVER[cuda]
    problems = []
    for node_type, image in _host_images(raw).items():
        if image not in HOST_IMAGE_DRIVER:
            problems.append(f"{node_type}: {image} is not in the image -> driver table")
        elif HOST_IMAGE_DRIVER[image] < need:
            problems.append(f"{node_type}: {image} has driver {HOST_IMAGE_DRIVER[image]}, CUDA {cuda} needs {need}")
    return problems


def _dockerfile_cuda() -> tuple[int, int]:
    major, minor = re.search(r"^FROM nvidia/cuda:(\d+)\.(\d+)", (INFRA / "docker" / "Dockerfile").read_text(), re.M).groups()
    return int(major), int(minor)


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_every_launcher_host_image_has_a_driver_for_the_images_cuda(name):
    cuda = _dockerfile_cuda()
    assert cuda in CUDA_MIN_DRIVER, f"add CUDA {cuda}'s minimum driver to CUDA_MIN_DRIVER"
    raw = _launcher(name)
    assert _driver_problems(raw, cuda) == []
    # the check catches what the issue found: GCP's old driver-570 image under a CUDA 13.0 image
    old = copy.deepcopy(raw)
    first = next(iter(old["available_node_types"].values()))["node_config"]
    image = "projects/deeplearning-platform-release/global/images/family/common-cu128-ubuntu-2204-nvidia-570"
    if "ImageId" in first:
        first["ImageId"] = image
    else:
        first["disks"][0]["initializeParams"]["sourceImage"] = image
    assert any("has driver 570" in p for p in _driver_problems(old, (13, 0)))


def _docker_args(options: list[str]) -> list[str]:
    return shlex.split(" ".join(options))  # as Ray's launcher joins them into its `docker run` command line


def test_the_aws_launcher_attaches_every_efa_card_and_hands_the_devices_to_the_container():
    raw = _launcher("aws.yaml")
    gpu_types = {k: t for k, t in raw["available_node_types"].items() if k != raw["head_node_type"]}
    for node_type, spec in gpu_types.items():
        cfg = spec["node_config"]
        nics = cfg["NetworkInterfaces"]
        assert sorted(n["NetworkCardIndex"] for n in nics) == list(range(EFA_CARDS[cfg["InstanceType"]])), node_type
        for nic in nics:  # card 0 carries the IP address; the others are EFA-only on device index 1
            first = nic["NetworkCardIndex"] == 0
            assert (nic["DeviceIndex"], nic["InterfaceType"]) == ((0, "efa") if first else (1, "efa-only")), nic
            assert nic["SubnetId"] == nics[0]["SubnetId"] and nic["Groups"] == nics[0]["Groups"]  # Ray wants both
        assert cfg["Placement"]["GroupName"], node_type  # EFA between nodes of one cluster placement group
    args = _docker_args(raw["docker"]["worker_run_options"])
    assert {"--device=/dev/infiniband", "--cap-add=IPC_LOCK"} <= set(args)
    assert args[args.index("--ulimit") + 1] == "memlock=-1:-1"
    env = dict(args[i + 1].split("=", 1) for i, a in enumerate(args) if a == "--env")
    assert env["FI_PROVIDER"] == "efa" and env["FI_EFA_USE_DEVICE_RDMA"] == "1"
    assert env["NCCL_NET"] == "OFI"
    assert "--device=/dev/infiniband" not in _docker_args(raw["docker"]["run_options"])  # the CPU head has none


def test_the_gcp_launcher_runs_a3_ultra_rdma_through_the_gib_plugin():
    raw = _launcher("gcp.yaml")
    gpu = raw["available_node_types"]["gpu_8x_h200"]["node_config"]
    assert gpu["machineType"] == "a3-ultragpu-8g"
    nics = gpu["networkInterfaces"]
    assert [n["nicType"] for n in nics] == ["GVNIC", "GVNIC"] + ["MRDMA"] * 8  # one RDMA NIC per GPU
    assert len({n["subnetwork"] for n in nics}) == len(nics)
    args = _docker_args(raw["docker"]["worker_run_options"])
    assert {"--device=/dev/infiniband", "--cap-add=IPC_LOCK"} <= set(args)
    assert args[args.index("--volume") + 1].startswith("/var/lib/gib:/usr/local/gib")
    # the host installs gIB where the container mounts it from ...
    install = next(c for c in raw["initialization_commands"] if "nccl-plugin-gib" in c)
    assert "-v /var/lib:/var/lib" in install and "install --install-nccl" in install
    # ... and the raylet, whose environment every training worker inherits, starts with gIB's settings and libraries
    start = next(c for c in raw["worker_start_ray_commands"] if "ray start" in c)
    assert start.index("source /usr/local/gib/scripts/set_nccl_env.sh") < start.index("ray start")
    assert "LD_LIBRARY_PATH=/usr/local/gib/lib64:" in start


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
    # EFA userspace + aws-ofi-nccl, installed the way AWS documents for containers, and on the library path
    assert re.search(r"aws-efa-installer-\$\{EFA_INSTALLER_VERSION\}\.tar\.gz", dockerfile)
    assert "./efa_installer.sh -y --skip-kmod --skip-limit-conf --no-verify" in dockerfile
    assert re.search(r"LD_LIBRARY_PATH=/opt/amazon/efa/lib:/opt/amazon/ofi-nccl/lib", dockerfile)
    # the gpu extra (NVML bindings for MLflow's GPU metrics) is what the image installs
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(d.startswith("nvidia-ml-py==") for d in extras["gpu"]) and 'pip install -e ".[gpu]"' in dockerfile
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


def _manifest_tracking_hosts() -> set[str]:
    """The Host names our manifests send to the MLflow server (MLFLOW_TRACKING_URI in infra/ray, infra/k8s)."""
    from urllib.parse import urlsplit

    found = set()
    for path in [*INFRA.glob("ray/*.yaml"), *INFRA.glob("k8s/*.yaml")]:
        found |= {urlsplit(u).netloc for u in re.findall(r"MLFLOW_TRACKING_URI\W+(?:value:\s*)?(https?://\S+)",
                                                           path.read_text())}
    return found


def test_the_manifests_take_mlflow_credentials_from_a_secret_never_a_literal():
    hosts = _manifest_tracking_hosts()
    assert {"mlflow.internal:5000", "mlflow.mlflow.svc.cluster.local:5000"} <= hosts
    for path, doc in manifests("RayCluster", "RayJob"):
        for name, pod in _pod_specs(doc):
            env = {e["name"]: e for c in pod["containers"] for e in c.get("env", [])}
            for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                assert "value" not in env[var] and env[var]["valueFrom"]["secretKeyRef"]["key"] == var, (path, name)
    for name in ("aws.yaml", "gcp.yaml"):  # the launcher's containers read them from the env file, not the YAML
        args = _docker_args(_launcher(name)["docker"]["run_options"])
        env = [args[i + 1] for i, a in enumerate(args) if a == "--env"]
        assert "--env-file" in args and not any(e.startswith("MLFLOW_TRACKING_PASSWORD") for e in env)
        assert "MLFLOW_TRACKING_PASSWORD" in (INFRA / "ray" / name).read_text()  # the env file's header says so
    serve = (INFRA / "mlflow" / "serve.sh").read_text()
    assert "--app-name basic-auth" in serve and "--allowed-hosts" in serve
    assert all(host.split(":")[0] in serve for host in hosts)
    compose = yaml.safe_load((INFRA / "mlflow" / "compose.yaml").read_text())["services"]["mlflow"]
    assert "MLFLOW_AUTH_ADMIN_PASSWORD" in compose["environment"] and "serve.sh" in " ".join(compose["entrypoint"])


def test_the_mlflow_server_from_plain_commands_on_postgres_takes_a_pipeline_run_stored_on_s3(tmp_path, s3_server,
                                                                                            monkeypatch):
    """serve.sh for real: logins required (anonymous artifact uploads and registry calls refused), our manifests'
    Host names allowed, the pipeline with credentials tracked and registered, wrong credentials refused at the
    start, and a registered model whose files were changed in the artifact store refused by our loaders."""
    import requests

    from pipeline.core import registry

    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (.ci/run installs Debian's postgresql)")
    pg = Postgres(bindir).start()
    bin_path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    port = free_port()
    server = None
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    try:
        # the runbook's two commands: create the database, then serve
        pg_env = {**os.environ, "PGHOST": "127.0.0.1", "PGPORT": str(pg.port), "PGUSER": "postgres",
                  "MLFLOW_DB_PASSWORD": "secret"}
        for _ in range(2):  # safe to re-run
            created = subprocess.run(["bash", str(INFRA / "mlflow" / "create-database.sh")], env=pg_env,
                                     capture_output=True, text=True)
            assert created.returncode == 0, created.stdout + created.stderr
        artifacts = tmp_path / "artifacts"
        server_env = {**clean, "PATH": bin_path, "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(port),
                      "MLFLOW_WORKERS": "1", "MLFLOW_DB_URI": f"postgresql://mlflow:secret@127.0.0.1:{pg.port}/mlflow",
                      "MLFLOW_ARTIFACTS": str(artifacts), "MLFLOW_AUTH_ADMIN_PASSWORD": "admin-pw-123",
                      "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-key"}
        server = subprocess.Popen(["bash", str(INFRA / "mlflow" / "serve.sh")], env=server_env, start_new_session=True,
                                  stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT)
        uri = f"http://127.0.0.1:{port}"
        wait_for(lambda: answers(f"{uri}/health", server, tmp_path / "server.log"), 180, "the MLflow server")

        # no login, no entry: an artifact upload (what replaced served_model.py) and registry reads and writes
        put = requests.put(f"{uri}/api/2.0/mlflow-artifacts/artifacts/1/x/artifacts/served_model.py", data=b"evil")
        assert put.status_code in (401, 403), put.text
        assert not list(artifacts.rglob("served_model.py")) if artifacts.exists() else True
        for method, path in [("GET", "/api/2.0/mlflow/registered-models/search"),
                             ("POST", "/api/2.0/mlflow/registered-models/create"),
                             ("GET", "/api/2.0/mlflow/experiments/search?max_results=1")]:
            answer = requests.request(method, f"{uri}{path}", json={"name": "planted"} if method == "POST" else None)
            assert answer.status_code in (401, 403), (method, path, answer.status_code)
        # the pipeline's own user, made by the admin (infra/README.md, section 0)
        admin = ("admin", "admin-pw-123")
        made = requests.post(f"{uri}/api/2.0/mlflow/users/create", auth=admin,
                             json={"username": "pipeline", "password": "pipeline-pw-456"})
        assert made.status_code == 200, made.text
        login = ("pipeline", "pipeline-pw-456")
        # the Host names our manifests use are allowed, with a login; any other name is not
        for host in sorted(_manifest_tracking_hosts()):
            answer = requests.get(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1", auth=login,
                                  headers={"Host": host})
            assert answer.status_code == 200, (host, answer.status_code, answer.text)
            created = requests.post(f"{uri}/api/2.0/mlflow/experiments/create", auth=login, headers={"Host": host},
                                    json={"name": f"via {host}"})
            assert created.status_code == 200, (host, created.text)
        assert requests.get(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1", auth=login,
                            headers={"Host": "mlflow.elsewhere.example:5000"}).status_code == 403

        # wrong credentials: refused at the start, one line, exit 2, no work done
        refused = run_tree([sys.executable, str(REPO / "pipeline" / "run.py"), *TINY, f"run.root={tmp_path / 'refused'}"],
                           300, cwd=tmp_path, env={**clean, **s3_server, "MLFLOW_TRACKING_URI": uri,
                                                   "MLFLOW_TRACKING_USERNAME": "pipeline",
                                                   "MLFLOW_TRACKING_PASSWORD": "wrong"})
        assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
        (line,) = refused.stderr.strip().splitlines()
        assert line.startswith("error: ") and uri in line and "HTTP 401" in line and "wrong" not in line
        assert not (tmp_path / "refused").exists()

        # the smoke preset, its run directory on S3, tracked by the server with the pipeline's login
        env = {**clean, **s3_server, "MLFLOW_TRACKING_URI": uri, "MLFLOW_TRACKING_USERNAME": "pipeline",
               "MLFLOW_TRACKING_PASSWORD": "pipeline-pw-456"}
        proc = run_tree([sys.executable, str(REPO / "pipeline" / "run.py"), *TINY, "train.max_steps=10",
                         "run.root=s3://runs/pipeline"], 900, cwd=tmp_path, env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "pipeline")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pipeline-pw-456")
        client = MlflowClient(tracking_uri=uri)
        runs = runs_by_stage(client)
        assert runs["pipeline"].info.status == "FINISHED"
        assert runs["pipeline"].data.tags["run_dir"] == "s3://runs/pipeline/smoke"
        assert runs["pipeline"].data.tags["checkpoint"].startswith("s3://runs/pipeline/smoke/checkpoints/step_")
        assert sorted(loss_history(client, runs["train"].info.run_id)) == list(range(1, 11))
        # the figure and samples table logged from the worker, through the server's login and artifact proxy
        assert {"training_curves.png", "samples.json"} <= {a.path for a in client.list_artifacts(runs["train"].info.run_id)}
        manifest = client.download_artifacts(runs["tokenize"].info.run_id, "manifest.json", str(tmp_path))
        assert Path(manifest).stat().st_size > 0  # served through the server's artifact proxy
        best = client.get_model_version_by_alias("gpt2-pipeline", "best")
        assert best.run_id == runs["train"].info.run_id
        # and it all sits in PostgreSQL
        count = pg.run("psql", "-h", "127.0.0.1", "-p", str(pg.port), "-U", "mlflow", "-d", "mlflow", "-tAc",
                       "SELECT count(*) FROM runs")
        assert int(count.stdout.strip()) == 5

        # the version records every file's sha256; our loader checks them, then loads
        recorded = registry.recorded_hashes(best, "best")
        assert {"MLmodel", "served_model.py", "artifacts/checkpoint/model.safetensors",
                "artifacts/checkpoint/config.json", "code/pipeline/core/model/gpt2.py"} <= set(recorded)
        (completion,) = registry.load_model("models:/gpt2-pipeline@best", uri).predict(["Hello"])
        assert isinstance(completion, str) and completion
        # change a file in the artifact store on disk: refused at load, naming the file, before its code runs
        on_disk = {rel: next(p for p in artifacts.rglob(Path(rel).name) if p.as_posix().endswith(rel))
                   for rel in ("served_model.py", "artifacts/checkpoint/model.safetensors")}
        planted = tmp_path / "planted"
        original = on_disk["served_model.py"].read_bytes()
        on_disk["served_model.py"].write_bytes(original + f"\nopen({str(planted)!r}, 'w').close()\n".encode())
        with pytest.raises(registry.ModelIntegrityError, match=r"served_model\.py has changed"):
            registry.load_model("models:/gpt2-pipeline@best", uri)
        assert not planted.exists()  # the planted code never ran
        on_disk["served_model.py"].write_bytes(original)
        weights = on_disk["artifacts/checkpoint/model.safetensors"]
        original = weights.read_bytes()
        weights.write_bytes(original[:-4] + bytes(b ^ 0xFF for b in original[-4:]))
        with pytest.raises(registry.ModelIntegrityError, match=r"artifacts/checkpoint/model\.safetensors has changed"):
            registry.load_model("models:/gpt2-pipeline@best", uri)
        # the pyfunc's own load_context refuses it too when loaded the plain way
        import mlflow

        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        with pytest.raises(Exception, match=r"model\.safetensors has changed"):
            mlflow.pyfunc.load_model("models:/gpt2-pipeline@best")
        # and so does a fine-tune starting from it
        from pipeline.core.model.checkpoints import CheckpointError
        from train import start_model

        cfg = load_config("smoke", [f"tracking.uri={uri}"])
        with pytest.raises(CheckpointError, match=r"model\.safetensors has changed"):
            start_model._registered("models:/gpt2-pipeline@best", cfg)
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
        pg.stop()


# --- GPU system metrics: the path a GPU node runs, on a CPU ------------------------------------------

def test_system_metrics_are_on_by_default_per_node_and_survive_a_machine_without_nvml(tmp_path, monkeypatch):
    import mlflow.system_metrics.metrics.gpu_monitor as gpu_monitor
    import pynvml  # the gpu extra (and the test extra) installs nvidia-ml-py

    from pipeline.core.config import Config
    from train.loop import _system_metrics

    assert Config().tracking.system_metrics  # every training run samples them unless told not to
    assert "pynvml" in vars(gpu_monitor)  # MLflow found the bindings: GPU metrics are attempted, not skipped
    try:
        pynvml.nvmlInit()
        gpus = pynvml.nvmlDeviceGetCount()
    except pynvml.NVMLError:
        gpus = 0  # this machine: the library or the driver is missing
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("system")).info.run_id
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    monitor = _system_metrics({"uri": uri, "run_id": run_id}, node=1)
    try:
        wait_for(lambda: "system/node_1/cpu_utilization_percentage" in client.get_run(run_id).data.metrics, 120,
                 "the first system metrics")
    finally:
        monitor.finish()
    logged = set(client.get_run(run_id).data.metrics)
    assert all(k.startswith("system/node_1/") for k in logged), logged
    assert "system/node_1/system_memory_usage_megabytes" in logged
    gpu = {k for k in logged if k.startswith("system/node_1/gpu_")}
    assert {f"system/node_1/gpu_{i}_utilization_percentage" for i in range(gpus)} <= gpu
    assert bool(gpu) == bool(gpus), gpu


# --- the interconnect check of the runbook, on CPUs ----------------------------------------------------

@pytest.mark.parametrize("launcher", ["torchrun", pytest.param("ray", marks=pytest.mark.slow)])
def test_the_allreduce_bandwidth_check_runs_and_reports_bus_bandwidth(launcher, tmp_path):
    bench = [str(REPO / "bench" / "allreduce_bandwidth.py"), "--sizes-mb", "0.5", "4", "--iters", "3", "--warmup", "1"]
    if launcher == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
                *bench]
    else:  # 2 Ray Train workers on a local Ray, as `ray job submit` runs it on a cluster
        argv = [sys.executable, *bench, "--ray-workers", "2"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = run_tree(argv, 600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "2 ranks on 1 node(s), backend gloo" in proc.stdout  # the sums were checked on every rank
    rows = [line.split() for line in proc.stdout.splitlines() if re.match(r"\s+[\d.]+(\s+[\d.e+-]+){3}$", line)]
    assert [r[0] for r in rows] == ["0.5", "4"]
    for size, ms, algbw, busbw in (map(float, r) for r in rows):
        assert ms > 0 and algbw == pytest.approx(size * 2**20 / (ms / 1e3) / 1e9, rel=0.02)
        assert busbw == pytest.approx(algbw * 2 * (2 - 1) / 2, rel=0.02)  # ring all-reduce: 2(n-1)/n
    readme = (INFRA / "README.md").read_text()
    assert "bench/allreduce_bandwidth.py" in readme and "NCCL_DEBUG=INFO" in readme
