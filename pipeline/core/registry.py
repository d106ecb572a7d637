"""A model in MLflow's Model Registry: an MLflow pyfunc model logged from a code file of the stage that made
it (pipeline/served_model.py generates text, train/served_heads.py predicts with task heads), carrying
the Hugging Face files (config.json + model.safetensors) and the code it needs, registered as a new
version with an alias that always points at the version with the best score.

Integrity: the version records, in the registry (its tag `gpt2.files_sha256`, a JSON object), the sha256 of
every file the model consists of: weights, config, the pyfunc's code file, the bundled code, MLflow's
MLmodel and requirements. `load_model(uri)` (and `download_verified`) download a version and refuse it,
naming the file, when any file differs from that record, is missing or was added, before MLflow imports
any of its code; only then is it loaded. Plain `mlflow.pyfunc.load_model("models:/...")` runs the
downloaded code unchecked: anyone who can write to the artifact store can replace it. The record comes
from the registry (the tracking database), never from the artifact store it protects.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from pipeline.core import storage
from pipeline.core.command import UserError
from pipeline.core.lineage import Lineage
from pipeline.core.redaction import redact

FILES_TAG = "gpt2.files_sha256"  # on each registered version: {"relative/path": "sha256 hex", ...}
# written by MLflow's client beside a model it downloads through a models:/ URI (the name and version it was
# asked for): not part of the stored model, and neither code nor weights
_CLIENT_WRITTEN = {"registered_model_meta"}
_VERIFIED_ENV = "GPT2_PIPELINE_VERIFIED_MODEL"  # set by load_model while MLflow loads the copy it checked


class ModelIntegrityError(UserError):
    """A registered model whose files are not the ones its registry version recorded."""

# The model is logged from code, not pickled, so loading it runs no unpickling; the code it needs is
# bundled, so it loads wherever torch is installed.
_WEIGHTS = ("model.safetensors", "config.json")
_CODE = [Path(__file__).resolve().parents[2] / name for name in ("pipeline", "tokenization", "train", "eval")]


def register(lineage: Lineage, run_id: str | None, checkpoint_dir: str, name: str, alias: str,
             score: float | None, tags: dict[str, str], model_code: Path, score_key: str,
             eligible: bool = True) -> dict | None:
    """Log the checkpoint as a model of run_id, register a version, move `alias` to it if it scores best
    (score_key names the score; model_code is the pyfunc's file) and is `eligible` for it."""
    if not run_id:
        return None

    def log_and_register() -> dict:
        mlflow.set_tracking_uri(lineage.uri)
        with mlflow.start_run(run_id=run_id), tempfile.TemporaryDirectory() as tmp:
            weights = Path(tmp, "checkpoint")
            weights.mkdir()
            source = storage.local_copy(checkpoint_dir, keep=lambda rel: rel in _WEIGHTS)  # local, s3://, gs://...
            for file in _WEIGHTS:
                shutil.copy(Path(source, file), weights / file)
            info = mlflow.pyfunc.log_model(name="model", python_model=str(model_code),
                                           artifacts={"checkpoint": str(weights)},
                                           code_paths=[str(p) for p in _CODE],
                                           pip_requirements=["torch", "safetensors", "tiktoken", "numpy"])
            files = _uploaded_hashes(info.model_uri, Path(tmp, "uploaded"),
                                     {f"artifacts/checkpoint/{f}": weights / f for f in _WEIGHTS} |
                                     {Path(model_code).name: Path(model_code)})
        version = mlflow.register_model(info.model_uri, name, tags={**tags, score_key: str(score),
                                                                     FILES_TAG: json.dumps(files, sort_keys=True)})
        best = _best(lineage, name, alias, score_key)
        if eligible and (best is None or (score is not None and score > best[1])):
            lineage.client.set_registered_model_alias(name, alias, version.version)
            aliased = version.version
        else:
            aliased = best[0] if best else None
        return {"name": name, "version": version.version, "model_uri": info.model_uri, "model_id": info.model_id,
                "alias": alias, "alias_version": aliased}

    return lineage.call("register the model", log_and_register)


def describe(lineage: Lineage, registered: dict, card: str, tags: dict[str, str]) -> None:
    """A registered version's model card (its description, markdown) and the tags linking it to its lineage."""
    name, version = registered["name"], registered["version"]

    def update() -> None:
        lineage.client.update_model_version(name, version, description=card)
        for key, value in tags.items():
            lineage.client.set_model_version_tag(name, version, key, str(value))

    lineage.call("describe the registered version", update)


def log_model_metrics(lineage: Lineage, run_id: str | None, model_id: str | None, metrics: dict[str, float], step: int,
                      datasets: dict[str, dict]) -> None:
    """Scores of a logged model, logged by the run that measured them (run_id) and linked to the model, each with
    the dataset it was measured on (datasets: metric name -> a dataset description, see Lineage.log_datasets):
    the model's page lists them."""
    if not run_id or not model_id or not metrics:
        return
    from mlflow.entities import Metric

    def link() -> None:
        batch = []
        for key, value in metrics.items():
            # the value as the run logged it, with its timestamp: MLflow drops the repeated point from the run's
            # history and keeps the link to the model, so the run's chart shows each score once
            logged = [m for m in lineage.client.get_metric_history(run_id, key) if m.step == step and m.value == value]
            stamp = logged[0].timestamp if logged else int(time.time() * 1000)
            dataset = datasets.get(key)
            batch.append(Metric(key, float(value), stamp, step, model_id=model_id,
                                dataset_name=dataset["name"] if dataset else None,
                                dataset_digest=dataset["digest"][:36] if dataset else None))
        lineage.client.log_batch(run_id, metrics=batch)

    lineage.call("link the scores to the model", link)


def _best(lineage: Lineage, name: str, alias: str, score_key: str) -> tuple[str, float] | None:
    try:
        current = lineage.client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
    value = current.tags.get(score_key)
    return current.version, float(value) if value not in (None, "None") else float("-inf")


# -- integrity ------------------------------------------------------------------------------------------

def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_hashes(root: str | Path, skip_bytecode: bool = False) -> dict[str, str]:
    """Every file under root (links followed as files), by path relative to root with '/': its sha256.
    skip_bytecode leaves out __pycache__ (what Python writes beside the code it imported)."""
    root, out = Path(root), {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if (skip_bytecode and "__pycache__" in rel.split("/")) or rel in _CLIENT_WRITTEN:
            continue
        if path.is_file() or (path.is_symlink() and not path.is_dir()):
            out[rel] = sha256_file(path)
    return out


def _uploaded_hashes(model_uri: str, dst: Path, sources: dict[str, Path]) -> dict[str, str]:
    """The sha256 of every file of the model as the artifact store now holds it (downloaded back), checked
    against the local files it was made from (weights, config, the pyfunc's code): what is recorded is
    what we uploaded."""
    local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst))
    files = file_hashes(local)
    for rel, source in sources.items():
        if files.get(rel) != sha256_file(source):
            raise ModelIntegrityError(f"{model_uri}: {rel} as uploaded does not match {source}; not registered")
    return files


def verify_files(root: str | Path, recorded: dict[str, str], what: str, skip_bytecode: bool = False) -> None:
    """Refuse (ModelIntegrityError, naming the file) a model directory whose files differ from `recorded`."""
    found = file_hashes(root, skip_bytecode)
    if skip_bytecode:
        recorded = {k: v for k, v in recorded.items() if "__pycache__" not in k.split("/")}
    for rel in sorted(set(recorded) | set(found)):
        if rel not in found:
            raise ModelIntegrityError(f"{what}: {rel} is missing from the model's files; refusing to load it")
        if rel not in recorded:
            raise ModelIntegrityError(f"{what}: {rel} is not one of the files registered with this version; "
                                      "refusing to load it")
        if found[rel] != recorded[rel]:
            raise ModelIntegrityError(f"{what}: {rel} has changed since it was registered (sha256 {found[rel][:12]}..., "
                                      f"registered {recorded[rel][:12]}...); refusing to load it")


def recorded_hashes(version, what: str) -> dict[str, str]:
    """The file record a registry version carries; a version without one is refused."""
    raw = (version.tags or {}).get(FILES_TAG)
    if not raw:
        raise ModelIntegrityError(f"{what}: the registry version records no file hashes ({FILES_TAG}), so its files "
                                  "cannot be checked; register it again with this pipeline")
    try:
        files = json.loads(raw)
        assert isinstance(files, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in files.items())
    except (ValueError, AssertionError):
        raise ModelIntegrityError(f"{what}: the registry version's {FILES_TAG} tag is not a JSON object of "
                                  "file -> sha256") from None
    return files


def resolve_version(client, uri: str):
    """models:/NAME@ALIAS or models:/NAME/VERSION -> the registry's ModelVersion."""
    if not uri.startswith("models:/"):
        raise UserError(f"{uri}: not a registered model (models:/NAME@ALIAS or models:/NAME/VERSION)")
    ref = uri[len("models:/"):]
    if "@" in ref:
        return client.get_model_version_by_alias(*ref.split("@", 1))
    name, _, number = ref.rpartition("/")
    if not name:
        raise UserError(f"{uri}: name a version or an alias (models:/NAME/VERSION or models:/NAME@ALIAS)")
    return client.get_model_version(name, number)


def download_verified(uri: str, tracking_uri: str | None = None, dst: str | None = None) -> tuple[str, object]:
    """Download the registered model `uri` (models:/NAME@ALIAS or models:/NAME/VERSION) and check every file
    against the sha256 its registry version recorded; returns (local directory, ModelVersion)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    version = resolve_version(client, uri)
    what = f"{uri} (version {version.version})"
    recorded = recorded_hashes(version, what)
    # the version's own storage location, read from this registry (a models:/ URI would be resolved against
    # the process's default registry, not tracking_uri)
    source = client.get_model_version_download_uri(version.name, version.version)
    local = mlflow.artifacts.download_artifacts(artifact_uri=source,
                                                dst_path=dst or tempfile.mkdtemp(prefix="gpt2-registered-"),
                                                tracking_uri=tracking_uri)
    verify_files(local, recorded, what)
    return local, version


def load_model(uri: str, tracking_uri: str | None = None):
    """The registered model `uri` as an MLflow pyfunc, loaded from a local copy whose every file (code
    included) matched the registry's record before MLflow imported any of it: the way to load our models.

        from pipeline.core.registry import load_model
        load_model("models:/gpt2-pipeline@best").predict(["Hello, I'm a language model,"])
    """
    local, _ = download_verified(uri, tracking_uri)
    before = os.environ.get(_VERIFIED_ENV)
    os.environ[_VERIFIED_ENV] = str(Path(local).resolve())  # load_context need not hash it all again
    try:
        return mlflow.pyfunc.load_model(local)
    finally:
        if before is None:
            os.environ.pop(_VERIFIED_ENV, None)
        else:
            os.environ[_VERIFIED_ENV] = before


def verify_loaded(checkpoint_dir: str | Path, tracking_uri: str | None = None) -> None:
    """The pyfunc's own check (load_context): the model directory holding `checkpoint_dir`
    (<model>/artifacts/checkpoint) must match a registry version of the run its MLmodel names, __pycache__
    aside. It runs after MLflow imported the code, so it guards the weights and config of a model loaded
    with plain mlflow.pyfunc.load_model; load_model() checks the code before."""
    import yaml
    from mlflow.tracking import MlflowClient

    root = Path(checkpoint_dir).resolve().parents[1]
    if os.environ.get(_VERIFIED_ENV) == str(root):
        return  # load_model() checked every file of this copy a moment ago, code included
    try:
        run_id = yaml.safe_load((root / "MLmodel").read_text())["run_id"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        raise ModelIntegrityError(f"{root}: MLmodel names no run; refusing to load an unregistered model") from None
    uri = tracking_uri or mlflow.get_tracking_uri()
    try:
        versions = MlflowClient(tracking_uri=uri).search_model_versions(f"run_id = '{run_id}'")
    except MlflowException as err:
        raise ModelIntegrityError(f"{root}: cannot read the registry at {redact(uri)} to check the model's files "
                                  f"({err.message.splitlines()[0][:200]})") from err
    if not versions:
        raise ModelIntegrityError(f"{root}: no registered version of run {run_id} at {redact(uri)}; refusing to "
                                  "load a model whose files cannot be checked")
    problems = []
    for version in versions:
        what = f"models:/{version.name}/{version.version}"
        try:
            verify_files(root, recorded_hashes(version, what), what, skip_bytecode=True)
            return
        except ModelIntegrityError as err:
            problems.append(str(err))
    raise ModelIntegrityError(problems[0] if len(problems) == 1 else "; ".join(problems))
