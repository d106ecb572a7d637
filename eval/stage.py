"""Evaluation as a pipeline stage: the suite (suite.py) on the run's final checkpoint, in a Ray task with a
training worker's resources (its GPU on a GPU cluster), not in the driver, which may sit on a CPU-only
head node."""

from __future__ import annotations

from eval import references, suite
from eval.hellaswag import METRICS as HELLASWAG
from eval.val_loss import VAL_LOSS
from pipeline.core import storage
from pipeline.core.config import Config
from pipeline.core.model import checkpoints
from pipeline.core.stage import Stage, StageError, StageResult, Tracking, Upstream
from pipeline.core.storage import join
from tokenization.shards import splits_as_datasets

# The final checkpoint's scores, as this stage's run logs them: the train run logs the curves under the plain
# names (val/loss, hellaswag/...), and each metric is one run's, so a chart draws one line per pipeline run
FINAL = "final/"


def _inputs(cfg: Config, upstream: Upstream) -> list:
    final = checkpoints.finished(cfg.checkpoint_dir, cfg.train.max_steps)
    weights = join(final, "model.safetensors") if final else None
    return [final, storage.size(weights) if weights else None, cfg.fingerprint("eval")]


def _verify(cfg: Config, result: StageResult, tracking: Tracking | None) -> bool:
    return storage.exists(join(cfg.eval_dir, suite.RESULTS))


def _run(cfg: Config, force: bool, tracking: Tracking | None, upstream: Upstream) -> StageResult:
    import ray

    final = checkpoints.finished(cfg.checkpoint_dir, cfg.train.max_steps)
    if final is None:
        raise StageError(f"no finished training in {cfg.checkpoint_dir}; run the train stage first")
    c = cfg.cluster
    task = ray.remote(suite.run).options(num_cpus=c.cpus_per_worker, num_gpus=1 if c.use_gpu else 0)
    results = ray.get(task.remote(cfg, final, cfg.eval_dir))
    scores = results["metrics"]
    return StageResult(output=join(cfg.eval_dir, suite.RESULTS), metrics={FINAL + k: v for k, v in scores.items()},
                       step=results["checkpoint"].get("step") or 0, tags={"checkpoint": final},
                       params=constants(results), datasets=datasets(cfg, results),
                       artifacts={suite.RESULTS: results, "samples.txt": samples_text(results)},
                       summary={f"summary/{k}": scores[k] for k in (VAL_LOSS, *HELLASWAG) if k in scores})


def constants(results: dict) -> dict:
    """What the scores were measured on, as params (not charts)."""
    out = {}
    if "val" in results:
        out["val.tokens"] = results["val"]["tokens"]
    if "hellaswag" in results:
        data = results["hellaswag"]["data"]
        out.update({"hellaswag.items": data["items"], "hellaswag.data": references.hellaswag_label(data["source"])})
    return out


def datasets(cfg: Config, results: dict) -> list[dict]:
    """The val split the loss was measured on and the HellaSwag-format items scored, as MLflow datasets."""
    out = [d for d in splits_as_datasets(cfg.data_dir) if d["context"] == "validation"] if "val" in results else []
    if "hellaswag" in results:
        data = results["hellaswag"]["data"]
        name = "hellaswag-smoke (hand-written)" if data["source"] == "smoke" else f"hellaswag/{data['source']}"
        out.append({"name": name, "digest": data["sha256"], "source": data["path"], "context": "evaluation",
                    "profile": {"items": data["items"], "official_validation_set": data["official_validation_set"]}})
    return out


def samples_text(results: dict) -> str:
    """Each sample as its prompt and its completion on lines of their own, with the decoding settings."""
    return "\n\n".join(f"prompt:     {s['prompt']}\ncompletion: {c}\ndecoding:   {s['mode']}"
                        for s in results.get("samples", []) for c in s["completions"])


STAGE = Stage("eval", _inputs, _verify, _run)
