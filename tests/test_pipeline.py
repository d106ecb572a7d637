"""The pipeline as users run it: the embedded default, a real MLflow server killed mid-run, `ray job
submit` to a real `ray start --head`, two-node placement, skipping finished stages, resuming a killed run.
Everything is checked through MlflowClient, the way the MLflow UI reads it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO, kill_tree, run_cli, run_tree
from mlflow.tracking import MlflowClient

from pipeline.core.tracking import read_jsonl

# A GPT-2 small enough that a whole pipeline run takes a minute on two CPUs.
TINY = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=64", "batch.seq_len=64",
        "batch.micro_batch_size=4", "batch.tokens_per_step=512", "train.warmup_steps=2", "train.max_steps=20",
        "checkpoint.interval=5", "eval.interval=10", "eval.hellaswag_interval=10", "eval.val_tokens=2048",
        "eval.max_new_tokens=8", "tracking.system_metrics=false"]
ARTIFACTS = REPO / "tests" / "artifacts"

pytestmark = pytest.mark.slow  # every test here runs the pipeline, with Ray and MLflow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, every: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def answers(url: str, proc: subprocess.Popen | None = None, log: Path | None = None) -> bool:
    """Whether url answers 200 (for wait_for); a server process that died fails at once, with its log."""
    import urllib.request

    assert proc is None or proc.poll() is None, log.read_text()[-3000:] if log else f"{proc.args} exited"
    try:
        return urllib.request.urlopen(url, timeout=2).status == 200
    except OSError:
        return False


def logged_steps(path: Path) -> int:
    return max((r["step"] for r in read_jsonl(str(path)) if "train/loss" in r), default=0) if path.exists() else 0


def runs_by_stage(client: MlflowClient) -> dict:
    experiment = client.get_experiment_by_name("gpt2-pretraining")
    return {r.data.tags["gpt2.stage"]: r for r in client.search_runs([experiment.experiment_id])}


def loss_history(client: MlflowClient, run_id: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a SQLite backend and a local artifact root."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> MlflowServer:
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}", "--artifacts-destination",
             str(self.root / "artifacts"), "--workers", "1"],
            stdout=open(self.root / "server.log", "a"), stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self._up, 120, "the MLflow server")
        return self

    def _up(self) -> bool:
        return answers(f"{self.uri}/health")

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


# --- a real Ray cluster: `ray start --head` and `ray job submit` ---------------------------------------
# "No available agent to submit job": the head hands a job to its node's dashboard agent, and waits ~10 s for
# that agent to register. The agent listens on 52365 by default, which a local Ray of another test (or
# process) may hold, so it never came up; and on a loaded 2-CPU machine it can start later than 10 s. So the
# head gets a port of its own, and the test submits once the agent answers its health check.

def test_ray_job_submit_keeps_the_run_and_mlflow_store_across_resubmissions(tmp_path):
    ray_bin = str(Path(sys.executable).parent / "ray")
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    port, dashboard, agent = free_port(), free_port(), free_port()
    home = tmp_path / "home"  # where the jobs' relative outputs go, instead of ~/gpt2-pipeline
    # `python` in the job is ours; token auth as the README sets it up for a cluster (Ray's CLI only sends the
    # token when RAY_AUTH_MODE=token, though a head started without it enforces one too)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32), "GPT2_PIPELINE_HOME": str(home)}
    env.pop("MLFLOW_TRACKING_URI", None)
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2",
                             f"--dashboard-agent-listen-port={agent}", "--disable-usage-stats", f"--temp-dir={ray_tmp}"],
                            stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env=env)
    address = f"http://127.0.0.1:{dashboard}"

    def agent_is_up() -> bool:
        return answers(f"http://127.0.0.1:{agent}/api/healthz", head, tmp_path / "head.log")

    # a copy of the checkout to submit, so that a file of it can change between the two jobs
    checkout = shutil.copytree(REPO, tmp_path / "checkout", ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", ".pytest_cache", "runs", "mlflow.db", "mlartifacts", "artifacts"))

    def submit(job: str) -> str:
        command = [ray_bin, "job", "submit", "--address", address, "--submission-id", job, "--working-dir",
                   str(checkout), "--", "python", "pipeline/run.py", *TINY, "train.max_steps=10"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
        assert done.returncode == 0 and "succeeded" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]
        return subprocess.run([ray_bin, "job", "logs", "--address", address, job],
                              capture_output=True, text=True, timeout=120, env=env).stdout

    try:
        wait_for(agent_is_up, 180, "the Ray head's dashboard agent")
        first = submit("smoke-job-1")
        assert first.index(f"relative outputs go to {home}") < first.index("pipeline: run 'smoke'")
        for progress in ("tokenize:", "step 10/10", "eval:", "register:", "pipeline: done"):
            assert progress in first, progress
        assert "_ray_pkg_" not in first.split("pipeline: done")[1]  # the summary names no path in Ray's cache
        (checkout / "README.md").write_text((checkout / "README.md").read_text() + "\nEdited between two jobs.\n")
        second = submit("smoke-job-2")
        for stage in ("tokenize", "train", "eval", "register"):
            assert f"{stage}: complete (fingerprint" in second, stage
        caches = {re.search(r"_ray_pkg_\w+", log).group(0) for log in (first, second) if "_ray_pkg_" in log}
        assert len(caches) == 2, caches  # two copies of the checkout, one run and one store
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # `ray start` and the GCS, raylet and dashboard it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        wait_for(lambda: not _kill_group(head.pid), 60, "the Ray head's processes to exit")
        shutil.rmtree(ray_tmp, ignore_errors=True)  # the package cache goes with it
    assert (home / "runs" / "smoke" / "checkpoints").is_dir() and (home / "mlflow.db").is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    runs = runs_by_stage(client)
    assert len(runs) == 5 and runs["pipeline"].info.status == "FINISHED"  # both jobs: one run, one lineage
    assert "'CPU': 2.0" in runs["pipeline"].data.tags["ray_cluster_resources"]
    assert len(client.search_model_versions("name='gpt2-pipeline'")) == 1
    assert client.get_model_version_by_alias("gpt2-pipeline", "best").run_id == runs["train"].info.run_id


def _kill_group(pgid: int) -> bool:
    """SIGKILL what is left of a process group after SIGTERM's grace period; False once it is empty."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True



# --- the embedded default ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """`python pipeline/run.py`, no arguments, in a fresh directory: the README's run command."""
    cwd = tmp_path_factory.mktemp("embedded")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    started = time.time()
    proc = run_tree([sys.executable, str(REPO / "pipeline" / "run.py")], 900, cwd=cwd, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return cwd, proc, time.time() - started


def test_the_embedded_default_records_the_whole_lineage_in_mlflow(embedded):
    cwd, proc, seconds = embedded
    client = MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    runs = runs_by_stage(client)
    assert set(runs) == {"pipeline", "tokenize", "train", "eval", "register"}
    parent = runs["pipeline"]
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert parent.info.status == "FINISHED" and parent.info.run_name == "smoke"
    for stage in ("tokenize", "train", "eval", "register"):
        assert runs[stage].data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert runs[stage].info.status == "FINISHED", stage
    # params: the flattened config; tags: code, packages, cluster, data, checkpoint
    assert parent.data.params["model.n_layer"] == "2" and parent.data.params["train.lr"] == "0.006"
    assert parent.data.params["data.input"] == "['builtin']"
    tags = parent.data.tags
    assert {"git_commit", "version.torch", "version.deepspeed", "ray_cluster_resources", "manifest_sha256",
            "checkpoint"} <= set(tags)
    manifest = json.loads((cwd / "runs" / "smoke" / "data" / "manifest.json").read_text())
    assert runs["tokenize"].data.metrics["tokenize/documents"] == manifest["input_documents"]
    # every training step, exactly as rank 0 logged it
    local = {r["step"]: r["train/loss"] for r in read_jsonl(str(cwd / "runs" / "smoke" / "metrics.jsonl")) if "train/loss" in r}
    assert loss_history(client, runs["train"].info.run_id) == local and sorted(local) == list(range(1, 61))
    train_metrics = runs["train"].data.metrics
    assert {"val/loss", "hellaswag/harness/acc_norm", "train/grad_norm", "train/tokens_per_s"} <= set(train_metrics)
    assert "system/node_0/cpu_utilization_percentage" in train_metrics  # the node's system metrics monitor
    evaluation = runs["eval"].data.metrics
    assert {"final/val/loss", "final/hellaswag/harness/acc", "final/hellaswag/harness/acc_norm",
            "final/hellaswag/completion/acc", "final/hellaswag/completion/acc_norm"} <= set(evaluation)
    assert parent.data.metrics["summary/val/loss"] == evaluation["final/val/loss"]
    # the built-in corpus shares no 13-gram with the smoke items: HellaSwag's clean subset is all of it
    assert manifest["curation"]["contamination"]["checked"] and evaluation["final/hellaswag/contaminated_share"] == 0
    assert evaluation["final/hellaswag_clean/harness/acc_norm"] == evaluation["final/hellaswag/harness/acc_norm"]
    assert runs["tokenize"].data.metrics["tokenize/exact_duplicates"] == manifest["curation"]["exact_duplicates"]["documents"]
    # artifacts: config, DeepSpeed config, manifest, eval results, samples, the model
    artifacts = {stage: {a.path for a in client.list_artifacts(runs[stage].info.run_id)} for stage in runs}
    assert {"config.yaml", "deepspeed_config.json"} <= artifacts["train"]
    assert "manifest.json" in artifacts["tokenize"] and {"results.json", "samples.txt"} <= artifacts["eval"]
    # the registered model, its alias, and that it generates text
    version = client.get_model_version_by_alias("gpt2-pipeline", "best")
    assert version.run_id == runs["train"].info.run_id  # the run whose curves and data it carries
    assert float(version.tags["hellaswag/harness/acc_norm"]) == evaluation["final/hellaswag/harness/acc_norm"]
    import mlflow.pyfunc

    mlflow.set_tracking_uri(f"sqlite:///{cwd / 'mlflow.db'}")
    completion = mlflow.pyfunc.load_model("models:/gpt2-pipeline@best").predict(["Hello, I'm a language model,"])
    assert len(completion) == 1 and isinstance(completion[0], str)
    # the run ends by saying how to look at it
    assert f"mlflow ui --backend-store-uri sqlite:///{cwd / 'mlflow.db'}" in proc.stdout
    assert "hellaswag/harness/acc_norm" in proc.stdout and "on hand-written smoke items" in proc.stdout
    assert "click 'Model training'" in proc.stdout  # how to leave the GenAI view, in one line
    check_review(client, cwd)
    # the card's command reproduces the eval stage's scores from the registered version
    card = client.get_model_version("gpt2-pipeline", version.version).description
    command = card.split("```\n")[1].strip()
    assert command.startswith("MLFLOW_TRACKING_URI=") and "--ckpt models:/gpt2-pipeline/1" in command
    out = cwd / "reproduced"
    # one new token per sample: the samples are not what it reproduces, and generation is the slow part here
    done = subprocess.run(f"{command} --max-new-tokens 1 --output {out}", shell=True, cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    reproduced = json.loads((out / "results.json").read_text())["metrics"]
    for key, value in reproduced.items():
        assert evaluation[f"final/{key}"] == pytest.approx(value, abs=1e-4), key
    assert (out / "scores.png").read_bytes()[:8] == PNG
    print(f"embedded default: {seconds:.0f} s")


PNG = b"\x89PNG\r\n\x1a\n"


def check_review(client: MlflowClient, cwd: Path) -> None:
    """What issue 23 asks of the MLflow record, read as the UI reads it (client on a store or a server)."""
    runs = runs_by_stage(client)
    manifest = cwd / "runs" / "smoke" / "data" / "manifest.json"
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest()
    # the version's card and links
    version = client.get_model_version("gpt2-pipeline", "1")
    card = version.description
    for text in ("val loss", "HellaSwag", "smoke items", digest, "3.2924", "0.3114", "not comparable",
                 "eval/run.py --ckpt models:/gpt2-pipeline/1", runs["train"].data.tags["mlflow.source.git.commit"]):
        assert text in card, text
    assert version.run_id == runs["train"].info.run_id
    assert runs["train"].info.run_id in version.tags["train_run"]
    assert runs["pipeline"].info.run_id in version.tags["pipeline_run"]
    assert version.tags["manifest_sha256"] == digest and "manifest.json" in version.tags["manifest"]
    # the train and val splits as datasets, digest the manifest's sha256
    for stage, contexts in (("tokenize", {"training", "validation"}), ("train", {"training", "validation"}),
                            ("eval", {"validation", "evaluation"})):
        inputs = client.get_run(runs[stage].info.run_id).inputs.dataset_inputs
        found = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset for i in inputs}
        assert set(found) == contexts, stage
        for context in contexts - {"evaluation"}:
            assert found[context].digest == digest[:36] and found[context].name.startswith("builtin/"), stage
            assert json.loads(found[context].profile)["tokens"] > 0
    # MLflow's own source tags on every run
    for stage, run in runs.items():
        for tag in ("mlflow.source.git.commit", "mlflow.source.name", "mlflow.user", "mlflow.source.type"):
            assert run.data.tags.get(tag), (stage, tag)
    # each metric on one run; constants as params
    with_val = [s for s, r in runs.items() if client.get_metric_history(r.info.run_id, "val/loss")]
    assert with_val == ["train"], with_val
    assert not any("hellaswag/items" in r.data.metrics or "val/tokens" in r.data.metrics for r in runs.values())
    assert runs["train"].data.params["hellaswag.items"] == "16" and "smoke" in runs["train"].data.params["hellaswag.data"]
    assert runs["train"].data.tags["train.epoch"] == "0"
    # the figure and the samples table on the train run; the figure in the run directory too
    train = runs["train"].info.run_id
    assert {"training_curves.png", "samples.json"} <= {a.path for a in client.list_artifacts(train)}
    figure = Path(client.download_artifacts(train, "training_curves.png", str(cwd / "downloaded")))
    assert figure.read_bytes()[:8] == PNG and figure.read_bytes() == (cwd / "runs" / "smoke" / "training_curves.png").read_bytes()
    from PIL import Image

    with Image.open(figure) as image:
        image.verify()
        assert image.size == (1200, 450)
    table = json.loads(Path(client.download_artifacts(train, "samples.json", str(cwd / "downloaded"))).read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert sorted({r["step"] for r in rows}) == [30, 60] and all(r["prompt"] and "sampling" in r["decoding"] for r in rows)
    # the logged model lists the final scores with the dataset each was measured on
    model = client.get_logged_model(version.model_id or version.source.rsplit("/", 1)[-1])  # source: models:/m-...
    measured = {m.key: m.dataset_digest for m in model.metrics}
    assert measured["final/val/loss"] == digest[:36] and measured["final/hellaswag/harness/acc_norm"]


def test_a_rerun_of_a_finished_run_skips_every_stage(embedded):
    cwd, _, _ = embedded
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = run_tree([sys.executable, str(REPO / "pipeline" / "run.py")], 600, cwd=cwd, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for stage in ("tokenize", "train", "eval", "register"):
        assert f"{stage}: complete (fingerprint" in proc.stdout, stage
    client = MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    assert len(client.search_model_versions("name='gpt2-pipeline'")) == 1
    assert len(runs_by_stage(client)) == 5  # the same parent and child runs, not new ones


def test_the_review_reads_the_same_through_a_server_and_in_a_real_browser(embedded, tmp_path):
    """`mlflow server` on loopback over the embedded run's store: what MlflowClient reads through it, then the printed
    links in Debian's Chromium on a fresh profile: the training view, the model card, the loss figure."""
    cwd, proc, _ = embedded
    printed = re.search(r"then open (\S+)", proc.stdout).group(1)
    card_link = re.search(r"model card: (\S+)", proc.stdout).group(1)
    server = MlflowServer(tmp_path)
    server.proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(server.port),
         "--backend-store-uri", f"sqlite:///{cwd / 'mlflow.db'}", "--default-artifact-root", str(cwd / "mlartifacts"),
         "--workers", "1"], stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(server._up, 120, "the MLflow server")
        client = MlflowClient(tracking_uri=server.uri)
        check_review(client, cwd)
        playwright = pytest.importorskip("playwright.sync_api")
        chromium = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if os.path.exists(p)), None)
        if chromium is None:
            pytest.skip("no chromium here (.ci/run installs Debian's)")
        parent, train = runs_by_stage(client)["pipeline"], runs_by_stage(client)["train"]
        # the run printed links on `mlflow ui`'s port; this server listens elsewhere
        assert printed.startswith("http://127.0.0.1:5000/#/") and parent.info.run_id in printed
        assert card_link == "http://127.0.0.1:5000/#/models/gpt2-pipeline/versions/1?workflowType=machine_learning"
        link, card_link = (u.replace("http://127.0.0.1:5000", server.uri) for u in (printed, card_link))
        ARTIFACTS.mkdir(exist_ok=True)
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})  # a fresh profile: empty localStorage
            # the Model training view: its sidebar lists Runs and Models; the GenAI one Judges, Sessions, ...
            page.goto(link)
            page.get_by_role("link", name="Models", exact=True).first.wait_for(timeout=60_000)
            assert page.get_by_role("link", name="Runs", exact=True).count() > 0
            assert page.get_by_role("link", name="Judges").count() == 0
            # chosen by the link, not by a preference stored in the browser
            assert page.evaluate("window.localStorage.getItem('mlflow.workflowType')") is None
            page.screenshot(path=str(ARTIFACTS / "mlflow-training-view.png"))
            # the registered version's page: its model card, in the same view
            page.goto(card_link)
            page.get_by_text("Reproduce the scores").first.wait_for(timeout=60_000)
            body = page.inner_text("body")
            assert "smoke items acc_norm [harness]" in body and "3.2924" in body and "eval/run.py --ckpt" in body
            assert page.get_by_role("link", name="Judges").count() == 0
            page.screenshot(path=str(ARTIFACTS / "mlflow-model-card.png"), full_page=True)
            # the train run's loss figure among its artifacts
            page.goto(link.replace(parent.info.run_id, f"{train.info.run_id}/artifacts/training_curves.png"))
            page.get_by_text("training_curves.png").first.wait_for(timeout=60_000)
            # the viewer shows the PNG from a blob: URL; ours is the one 1200 pixels wide
            page.wait_for_function("() => Array.from(document.images).some(i => i.complete && i.naturalWidth === 1200)",
                                   timeout=120_000)
            page.screenshot(path=str(ARTIFACTS / "mlflow-training-curves.png"))
            # then the train run's loss chart, in the same view
            page.goto(link.replace(parent.info.run_id, f"{train.info.run_id}/model-metrics"))
            page.get_by_placeholder("Search metric charts").fill("train/loss", timeout=60_000)
            page.get_by_text("train (train/loss)").first.wait_for(timeout=60_000)  # the chart's legend
            page.wait_for_timeout(2000)  # let the line draw
            page.screenshot(path=str(ARTIFACTS / "mlflow-run.png"), full_page=True)
            assert page.locator("canvas, svg").count() > 0
            browser.close()
        assert (ARTIFACTS / "mlflow-run.png").stat().st_size > 10_000
    finally:
        server.kill()


# --- a real tracking server, killed and restarted during training -----------------------------------

def test_a_tracking_server_outage_does_not_stop_training_and_the_metrics_arrive(tmp_path):
    server = MlflowServer(tmp_path).start()
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.uri}
    args = [sys.executable, str(REPO / "pipeline" / "run.py"), *TINY, "train.max_steps=40", f"run.root={tmp_path / 'runs'}"]
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=open(tmp_path / "out.log", "w"), stderr=subprocess.STDOUT)
    metrics = tmp_path / "runs" / "smoke" / "metrics.jsonl"
    try:
        wait_for(lambda: logged_steps(metrics) >= 5, 300, "training to start")
        server.kill()
        down_at = logged_steps(metrics)
        wait_for(lambda: logged_steps(metrics) >= down_at + 10 or proc.poll() is not None, 300, "training to go on")
        assert proc.poll() is None, "the run ended while the server was down"
        server.start()
        assert proc.wait(timeout=600) == 0, (tmp_path / "out.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        server.kill()
    log = (tmp_path / "out.log").read_text()
    assert "unreachable" in log and "is back" in log
    server.start()
    try:
        client = MlflowClient(tracking_uri=server.uri)
        runs = runs_by_stage(client)
        assert sorted(loss_history(client, runs["train"].info.run_id)) == list(range(1, 41))
        assert runs["pipeline"].info.status == "FINISHED"
        assert client.get_model_version_by_alias("gpt2-pipeline", "best") is not None
    finally:
        server.kill()


# --- resuming a run whose driver was killed ------------------------------------------------------------

def test_a_rerun_after_killing_the_driver_resumes_from_the_checkpoint(tmp_path):
    args = [sys.executable, str(REPO / "pipeline" / "run.py"), *TINY, "train.max_steps=30", "tracking.enabled=false"]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=open(tmp_path / "first.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    metrics = tmp_path / "runs" / "smoke" / "metrics.jsonl"
    wait_for(lambda: logged_steps(metrics) >= 12 or proc.poll() is not None, 600, "training to pass step 12")
    assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    kill_tree(proc.pid)  # the driver and the local Ray it started, all gone before the count below
    proc.wait()
    killed_at = logged_steps(metrics)
    assert killed_at < 30
    again = run_cli(*args[1:], cwd=tmp_path, timeout=900)
    assert "tokenize: complete (fingerprint" in again.stdout
    resumed = re.search(r"resumed from \S+step_(\d{8}) at step (\d+)", again.stdout)
    assert resumed and int(resumed.group(1)) % 5 == 0 and 10 <= int(resumed.group(1)) <= killed_at
    steps = [r["step"] for r in read_jsonl(str(metrics)) if "train/loss" in r]
    assert steps == list(range(1, 31))  # each step once: those redone after the resume replaced their records
    assert (tmp_path / "runs" / "smoke" / "eval" / "results.json").exists()
