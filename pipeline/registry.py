"""The final model in MLflow's Model Registry: an MLflow pyfunc model that generates text (see
pipeline/served_model.py), carrying the Hugging Face files (config.json + model.safetensors) and the
code it needs, registered as a new version with an alias that always points at the version with the
best HellaSwag score."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from eval.hellaswag import ACC_NORM
from pipeline.core import storage
from pipeline.lineage import Lineage

SCORE = ACC_NORM  # what "best" means: HellaSwag acc_norm (harness), the number published tables compare
# The model is logged from code (pipeline/served_model.py), not pickled, so loading it runs no
# unpickling; the code it needs is bundled, so it loads wherever torch is installed.
_MODEL_CODE = Path(__file__).with_name("served_model.py")
_WEIGHTS = ("model.safetensors", "config.json")
_CODE = [Path(__file__).resolve().parents[1] / name for name in ("pipeline", "tokenization", "train", "eval")]


def register(lineage: Lineage, run_id: str | None, checkpoint_dir: str, name: str, alias: str,
             score: float | None, tags: dict[str, str], model_code: Path = _MODEL_CODE,
             score_key: str = SCORE) -> dict | None:
    """Log the checkpoint as a model of run_id, register a version, move `alias` to it if it scores best
    (score_key names the score; model_code is the pyfunc's file: text generation, or a fine-tuned
    model's predictions, pipeline/served_heads.py)."""
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
        version = mlflow.register_model(info.model_uri, name, tags={**tags, score_key: str(score)})
        best = _best(lineage, name, alias, score_key)
        if best is None or (score is not None and score > best[1]):
            lineage.client.set_registered_model_alias(name, alias, version.version)
            aliased = version.version
        else:
            aliased = best[0]
        return {"name": name, "version": version.version, "model_uri": info.model_uri, "alias": alias,
                "alias_version": aliased}

    return lineage.call("register the model", log_and_register)


def _best(lineage: Lineage, name: str, alias: str, score_key: str) -> tuple[str, float] | None:
    try:
        current = lineage.client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
    value = current.tags.get(score_key)
    return current.version, float(value) if value not in (None, "None") else float("-inf")
