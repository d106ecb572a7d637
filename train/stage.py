"""Training and fine-tuning as pipeline stages: what their outputs depend on, and what their MLflow runs record."""

from __future__ import annotations

import hashlib
import json

from pipeline.core import storage
from pipeline.core.config import Config
from pipeline.core.model import checkpoints
from pipeline.core.stage import Stage, StageError, StageResult, Tracking, Upstream
from pipeline.core.storage import join
from tokenization.shards import load_manifest, manifest_hash, splits_as_datasets
from train import engine, finetuning, launch, tasks
from train.data import ORDER
from train.mixture import Mixture


def _sha(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


# --- train ------------------------------------------------------------------------------------------

def _train_inputs(cfg: Config, upstream: Upstream) -> list:
    inputs = [manifest_hash(cfg.data_dir), cfg.run.seed, cfg.fingerprint("model", "train", "batch", "deepspeed")]
    order = Mixture(cfg, load_manifest(cfg.data_dir), cfg.data_dir).data_order
    return inputs if order == ORDER else [*inputs, order]  # a mixture's weights: not in the dataset, but in the run


def _train_verify(cfg: Config, result: StageResult, tracking: Tracking | None) -> bool:
    return checkpoints.finished(cfg.checkpoint_dir, cfg.train.max_steps) == result.output


def _train(cfg: Config, force: bool, tracking: Tracking | None, upstream: Upstream) -> StageResult:
    started, fingerprint = join(cfg.run_dir, "stages", "train.started.json"), _sha(*_train_inputs(cfg, upstream))
    if force:
        storage.remove(cfg.checkpoint_dir, recursive=True)
        storage.remove(cfg.metrics_url)
        storage.remove(cfg.metrics_file)
    elif (checkpoints.latest(cfg.checkpoint_dir) and storage.exists(started)
          and storage.read_json(started)["fingerprint"] != fingerprint):
        raise StageError(f"{cfg.checkpoint_dir} holds checkpoints of another model, data or training config; "
                         f"use a new run.name, or --force train to start this one over")
    storage.write_json(started, {"fingerprint": fingerprint})  # checkpoints from here on belong to it
    if tracking:  # before training, so the run shows its config while it trains
        tracking.lineage.log_params(tracking.run_id, {k: v for k, v in cfg.flat().items() if k.split(".")[0]
                                                      in ("model", "train", "batch", "deepspeed", "cluster")})
        tracking.lineage.log_datasets(tracking.run_id, splits_as_datasets(cfg.data_dir))
        tracking.lineage.log_text(tracking.run_id, cfg.to_yaml(), "config.yaml")
        tracking.lineage.log_json(tracking.run_id, engine.deepspeed_config(cfg, cfg.cluster.num_workers),
                                  "deepspeed_config.json")
    result = launch.run(cfg, resume=True, tracking=tracking.for_workers if tracking else None)
    return StageResult(output=result.checkpoint, tags={"checkpoint": result.checkpoint},
                       parent_tags={"checkpoint": result.checkpoint},
                       details={"step": result.step, "loss": result.loss, "tokens": result.tokens})


# --- finetune (optional) -----------------------------------------------------------------------------

def _start(cfg: Config) -> str | None:
    return cfg.finetune.checkpoint or checkpoints.finished(cfg.checkpoint_dir, cfg.train.max_steps)


def _finetune_inputs(cfg: Config, upstream: Upstream) -> list:
    f = cfg.finetune
    return [_start(cfg), tasks.source_fingerprint(f) if f.task else None, cfg.run.seed,
            cfg.fingerprint("finetune", "deepspeed")]


def _finetune_verify(cfg: Config, result: StageResult, tracking: Tracking | None) -> bool:
    return storage.exists(join(cfg.finetune_dir, finetuning.RESULTS))


def _finetune(cfg: Config, force: bool, tracking: Tracking | None, upstream: Upstream) -> StageResult:
    start = _start(cfg)
    if start is None:
        raise StageError(f"finetune: no finished training in {cfg.checkpoint_dir} and no finetune.checkpoint; "
                         f"run the train stage first or name a checkpoint")
    if force:
        storage.remove(cfg.finetune_dir, recursive=True)
    result = finetuning.run(cfg, start, resume=True, lineage=tracking.lineage if tracking else None,
                            run_id=tracking.run_id if tracking else None)
    return StageResult(output=result.checkpoint, metrics=result.metrics, step=result.step,
                       summary={f"summary/{k}": v for k, v in result.metrics.items()},
                       details={"step": result.step, "loss": result.loss, "examples": result.examples,
                                "registered": result.registered})


TRAIN = Stage("train", _train_inputs, _train_verify, _train)
FINETUNE = Stage("finetune", _finetune_inputs, _finetune_verify, _finetune)
