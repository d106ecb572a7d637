"""Evaluation as a pipeline stage: the suite (suite.py) on the run's final checkpoint, in a Ray task with a
training worker's resources (its GPU on a GPU cluster), not in the driver, which may sit on a CPU-only
head node."""

from __future__ import annotations

from eval import suite
from pipeline.core import storage
from pipeline.core.config import Config
from pipeline.core.model import checkpoints
from pipeline.core.stage import Stage, StageError, StageResult, Tracking, Upstream
from pipeline.core.storage import join


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
    return StageResult(output=join(cfg.eval_dir, suite.RESULTS), metrics=results["metrics"],
                       step=results["checkpoint"].get("step") or 0, tags={"checkpoint": final},
                       artifacts={suite.RESULTS: results, "samples.txt": samples_text(results)}, parent_metrics=True)


def samples_text(results: dict) -> str:
    return "\n\n".join(f"[{s['mode']}] {s['prompt']}{c}" for s in results.get("samples", []) for c in s["completions"])


STAGE = Stage("eval", _inputs, _verify, _run)
