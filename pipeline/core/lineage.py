"""The MLflow record of a pipeline run: one parent run, one child run per stage, the registered model.

Runs are found again by their tags, so submitting the same run name again continues the same parent
and child runs. A tracking server that cannot be reached never stops the pipeline: every call is retried a
few times with back-off and then skipped with a warning (training metrics travel separately, from a
local file, see pipeline/core/tracking.MlflowUploader). A server that answers and refuses us (HTTP 401: no
or wrong login; 403: no permission, or a Host name it does not allow) is a configuration error, reported
before any work starts (`check_server`, a UserError): it would refuse every call of the run.
Credentials in the tracking URI never reach a log line; the login comes from MLFLOW_TRACKING_USERNAME /
MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN), MLflow's own client variables.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pipeline.core.command import UserError
from pipeline.core.redaction import redact

T = TypeVar("T")
RUN_DIR_TAG, STAGE_TAG, PARENT_TAG = "gpt2.run_dir", "gpt2.stage", "mlflow.parentRunId"
DEFAULT_URI = "sqlite:///mlflow.db"


def tracking_uri(configured: str | None, base: str | None = None) -> str:
    """$MLFLOW_TRACKING_URI, else the config's, else mlflow.db; a relative SQLite path made absolute
    against base (default: the working directory)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured or DEFAULT_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + os.path.join(base or os.getcwd(), uri[len("sqlite:///"):])
    return uri


class TrackingRefused(UserError):
    """The configured tracking server answered and refused us: a login, permission or Host-name problem."""


def check_server(uri: str, timeout: float | None = None) -> None:
    """Raise TrackingRefused when the http(s) tracking server at uri answers 401 or 403 to a read with the
    client's credentials (MLflow's: MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN); return when it lets us
    in, and also when it cannot be reached at all (refused connection, timeout, unknown name): Lineage's
    retries and warning handle that, and training goes on."""
    if not uri.startswith(("http://", "https://")):
        return
    from urllib.parse import urlsplit

    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    creds = get_default_host_creds(uri)
    timeout = timeout or float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", 15))  # bounded_http's, or the user's
    try:
        response = http_request(creds, "/api/2.0/mlflow/experiments/search", "GET", max_retries=0,
                                timeout=timeout, params={"max_results": 1})
    except Exception:  # no answer: not a refusal
        return
    if response.status_code not in (401, 403):
        return
    body = " ".join(response.text.split())[:200]
    server = redact(uri)
    if response.status_code == 401:
        who = f"user '{creds.username}'" if creds.username else "no login"
        fix = ("set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (infra/README.md, section 0)" if not
               creds.username else "check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
        raise TrackingRefused(f"the MLflow server at {server} refused us: HTTP 401 with {who} ({body}); {fix}")
    if "host" in body.lower():
        host = urlsplit(uri).netloc.rsplit("@", 1)[-1]
        raise TrackingRefused(f"the MLflow server at {server} refused us: HTTP 403 ({body}): it does not allow the "
                              f"Host name '{host}'; add it to the server's --allowed-hosts "
                              "(MLFLOW_SERVER_ALLOWED_HOSTS for infra/mlflow/serve.sh) or use a name it allows")
    who = f"user '{creds.username}'" if creds.username else "no login"
    raise TrackingRefused(f"the MLflow server at {server} refused us: HTTP 403 with {who} ({body}); "
                          "ask its admin for permission, or set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD")


def ui_command(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {redact(uri)}"
    artifacts = os.path.join(os.path.dirname(uri[len("sqlite:///"):]), "mlartifacts")
    return f"mlflow ui --backend-store-uri {uri} --default-artifact-root {artifacts} --port 5000"


def git_commit() -> str:
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=Path(__file__).parent, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def source_tags() -> dict[str, str]:
    """MLflow's own tags of where a run comes from (the UI's Source, Created by, Git commit), set on every run we
    create or continue; the driver creates every run, so runs whose work happens in Ray workers carry them too.
    In Ray's copy of a checkout (ray job submit) there is no .git: pass the commit as GIT_COMMIT."""
    import getpass

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        user = "unknown"
    entry = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else Path("python")
    repo = Path(__file__).resolve().parents[2]
    name = entry.relative_to(repo).as_posix() if entry.is_relative_to(repo) else entry.name
    return {"mlflow.source.git.commit": git_commit(), "mlflow.source.name": name, "mlflow.source.type": "LOCAL",
            "mlflow.user": user}


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("gpt2-pipeline", "torch", "deepspeed", "ray", "mlflow", "transformers", "tiktoken", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def bounded_http() -> None:
    """Bound every MLflow HTTP request of this process (and of the Ray workers it starts): MLflow's client
    otherwise waits 120 s for an answer and retries 7 times with back-off, so a server that accepts
    connections and never answers would hold the driver for hours. Our own calls retry (Lineage._retry,
    tracking.MlflowUploader); a user's MLFLOW_HTTP_REQUEST_* settings win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


class Lineage:
    """Parent and stage runs in one experiment; every method is safe to call with the server down. A server
    that refuses us is refused here, at the start (TrackingRefused, see check_server)."""

    def __init__(self, uri: str, experiment: str, run_dir: str, attempts: int = 4, log=print):
        from mlflow.tracking import MlflowClient

        # a new SQLite store announces its table set-up at INFO on stderr: not a line the user needs
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        bounded_http()
        check_server(uri)

        self.uri, self.run_dir, self.attempts, self.log = uri, run_dir, attempts, log
        self.seconds = 0.0  # spent in tracking calls, retries included: the pipeline's MLflow overhead
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment_id = self.call("open the experiment", lambda: self._experiment(experiment))
        self.parent_id: str | None = None
        self.source = source_tags()

    # -- resilience --
    def call(self, what: str, fn: Callable[[], T]) -> T | None:
        started = time.perf_counter()
        try:
            return self._retry(what, fn)
        finally:
            self.seconds += time.perf_counter() - started

    def _retry(self, what: str, fn: Callable[[], T]) -> T | None:
        delay = 1.0
        for attempt in range(self.attempts):
            try:
                return fn()
            except Exception as err:  # server down, network, HTTP 5xx: all the same to the pipeline
                if attempt == self.attempts - 1:
                    self.log(redact(f"tracking: could not {what} at {self.uri} ({type(err).__name__}: "
                                    f"{str(err).splitlines()[0][:200]}); continuing without it"))
                    return None
                time.sleep(delay)
                delay *= 2
        return None

    @property
    def available(self) -> bool:
        return self.experiment_id is not None

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = None
        if self.uri.startswith("sqlite:///"):  # artifacts beside the database, not in the current directory
            location = Path(os.path.dirname(self.uri[len("sqlite:///"):]), "mlartifacts").as_uri()
        # MLflow 3 tags experiments as GenAI or model development; say which instead of leaving it to inference
        return self.client.create_experiment(name, artifact_location=location,
                                             tags={"mlflow.experimentKind": "custom_model_development"})

    # -- runs --
    def _find_or_create(self, name: str, tags: dict[str, str]) -> str:
        """The newest run carrying all of `tags`, set RUNNING again (a re-run continues it), else a new one."""
        found = self.client.search_runs([self.experiment_id],
                                        filter_string=" and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items()),
                                        order_by=["attributes.start_time DESC"], max_results=1)
        if found:
            self.client.update_run(found[0].info.run_id, status="RUNNING")
            self.set_tags(found[0].info.run_id, self.source)  # the code that continues it
            return found[0].info.run_id
        return self.client.create_run(self.experiment_id, run_name=name, tags={**tags, **self.source}).info.run_id

    def start_parent(self, name: str, params: dict[str, Any], tags: dict[str, str]) -> str | None:
        if not self.available:
            return None
        self.parent_id = self.call("start the pipeline run", lambda: self._find_or_create(
            name, {RUN_DIR_TAG: self.run_dir, STAGE_TAG: "pipeline"}))
        if self.parent_id:
            self.log_params(self.parent_id, params)
            self.set_tags(self.parent_id, tags)
        return self.parent_id

    def stage_run(self, stage: str) -> str | None:
        """The child run of a stage: the existing one on a re-run, else a new one."""
        if not self.parent_id:
            return None
        return self.call(f"start the {stage} run", lambda: self._find_or_create(
            stage, {PARENT_TAG: self.parent_id, STAGE_TAG: stage, RUN_DIR_TAG: self.run_dir}))

    def find_stage_run(self, stage: str) -> str | None:
        """The child run of a stage of this pipeline run, if there is one (nothing is created or changed)."""
        if not self.parent_id:
            return None
        found = self.call(f"find the {stage} run", lambda: self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_id}' and tags.`{STAGE_TAG}` = "
            f"'{stage}'", order_by=["attributes.start_time DESC"], max_results=1))
        return found[0].info.run_id if found else None

    def finish(self, run_id: str | None, status: str = "FINISHED") -> None:
        if run_id:
            self.call("end a run", lambda: self.client.set_terminated(run_id, status=status))

    # -- data --
    def log_params(self, run_id: str | None, params: dict[str, Any]) -> None:
        if not run_id:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        existing = self.call("read params", lambda: self.client.get_run(run_id).data.params) or {}
        items = [p for p in items if p.key not in existing]  # params are write-once in MLflow
        for i in range(0, len(items), 100):
            self.call("log params", lambda chunk=items[i:i + 100]: self.client.log_batch(run_id, params=chunk))

    def set_tags(self, run_id: str | None, tags: dict[str, Any]) -> None:
        if not run_id:
            return
        from mlflow.entities import RunTag

        self.call("set tags", lambda: self.client.log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()]))

    def log_metrics(self, run_id: str | None, metrics: dict[str, float], step: int = 0) -> None:
        if not run_id or not metrics:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        self.call("log metrics", lambda: self.client.log_batch(run_id, metrics=batch))

    def log_datasets(self, run_id: str | None, datasets: list[dict]) -> None:
        """MLflow datasets as inputs of a run (the runs list's Dataset column and filter): each {"name", "digest"
        (a sha256; MLflow keeps its first 36 characters), "source" (a URL or path), "context" (training,
        validation, evaluation), "profile" (counts, shown with it)}."""
        if not run_id or not datasets:
            return
        from mlflow.entities import DatasetInput, InputTag

        inputs = [DatasetInput(dataset_entity(d), tags=[InputTag("mlflow.data.context", d["context"])]) for d in datasets]
        self.call("log datasets", lambda: self.client.log_inputs(run_id, datasets=inputs))

    def log_artifact(self, run_id: str | None, path: str, folder: str | None = None) -> None:
        if run_id and os.path.exists(path):
            self.call(f"upload {os.path.basename(path)}", lambda: self.client.log_artifact(run_id, path, folder))

    def log_text(self, run_id: str | None, text: str, name: str) -> None:
        if run_id:
            self.call(f"upload {name}", lambda: self.client.log_text(run_id, text, name))

    def log_json(self, run_id: str | None, data: Any, name: str) -> None:
        self.log_text(run_id, json.dumps(data, indent=2, sort_keys=True, default=str), name)

    def run_url(self, run_id: str | None, page: str = "", relative: bool = False) -> str | None:
        """A link to a run (page: a tab of it, e.g. "artifacts/x.png") that opens in MLflow's model-training view."""
        if not run_id or not self.experiment_id:
            return None
        return self.ui_url(f"experiments/{self.experiment_id}/runs/{run_id}" + (f"/{page}" if page else ""), relative)

    def version_url(self, name: str, version: str) -> str:
        return self.ui_url(f"models/{name}/versions/{version}")

    def ui_url(self, route: str, relative: bool = False) -> str:
        """route (experiments/..., models/...) on the MLflow UI: on the tracking server, `mlflow ui`'s address for
        a local store; relative (#/...): a link inside MLflow's own pages (a model card), right on any host."""
        base = redact(self.uri) if self.uri.startswith("http") else "http://127.0.0.1:5000"
        # MLflow's UI picks its sidebar (GenAI or Model training) from this parameter, else from the browser's
        # localStorage (default GenAI), never from the experiment's kind tag (mlflow issue 24498; 3.18.0 still does)
        return ("" if relative else f"{base.rstrip('/')}/") + f"#/{route}?workflowType=machine_learning"


# how to leave the GenAI view MLflow opens on links of its own (runs list, sidebar) in a fresh browser
VIEW_HINT = ("if MLflow shows its GenAI view (Judges, Sessions in the sidebar), click 'Model training' in the "
             "sidebar's GenAI / Model training switch; the browser remembers it")


def dataset_entity(d: dict):
    """The MLflow Dataset entity of a dataset description (see Lineage.log_datasets)."""
    from mlflow.entities import Dataset

    scheme = d["source"].split("://", 1)[0] if "://" in d["source"] else "local"
    return Dataset(name=d["name"], digest=d["digest"][:36], source_type=scheme,
                   source=json.dumps({"uri": redact(d["source"])}), profile=json.dumps(d.get("profile") or {}))
