"""The stages of a pipeline run (four by default, and an optional fine-tune), each a function of the config with explicit outputs under the
run directory, a fingerprint of what it depends on, and a check that its output is still there.

A finished stage leaves `<run dir>/stages/<stage>.json` (fingerprint, output, summary); the driver
skips a stage whose marker matches its current fingerprint and whose output still verifies.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from eval import suite
from pipeline import finetune as finetuning
from pipeline import registry
from pipeline.core import storage
from pipeline.core.command import UserError
from pipeline.core.config import Config
from pipeline.core.storage import join
from pipeline.core.tracking import Mirror, MlflowUploader, mirrored
from pipeline.lineage import Lineage
from tokenization import job
from tokenization.shards import MANIFEST, manifest_hash
from train import checkpoint, engine, launch, tasks

STAGES = ("tokenize", "train", "eval", "register")  # what a run does by default
OPTIONAL = ("finetune",)  # run only when --stages names them


class StageError(UserError, RuntimeError):
    pass


@dataclass
class Context:
    cfg: Config
    lineage: Lineage | None
    log: Callable[[str], None] = print
    results: dict[str, dict] = field(default_factory=dict)  # summaries of the stages run or skipped

    def child(self, stage: str) -> str | None:
        return self.lineage.stage_run(stage) if self.lineage else None


def _sha(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def marker_url(cfg: Config, stage: str) -> str:
    return join(cfg.run_dir, "stages", f"{stage}.json")


def read_marker(cfg: Config, stage: str) -> dict | None:
    url = marker_url(cfg, stage)
    return storage.read_json(url) if storage.exists(url) else None


# --- tokenize ---------------------------------------------------------------------------------------

def tokenize_fingerprint(ctx: Context) -> str:
    return job.fingerprint(ctx.cfg)


def tokenize_done(ctx: Context, marker: dict) -> bool:
    return job.complete(ctx.cfg)


def tokenize(ctx: Context, run_id: str | None, force: bool) -> dict:
    result = job.run(ctx.cfg, overwrite=force, log=ctx.log)
    m = result.manifest
    metrics = {"tokenize/documents": m["input_documents"], "tokenize/tokens_train": m["totals"]["train"]["tokens"],
               "tokenize/tokens_val": m["totals"]["val"]["tokens"], "tokenize/shards": len(m["shards"]),
               "tokenize/skipped": sum(m["skipped"].values()),
               **{f"tokenize/skipped_{reason}": n for reason, n in m["skipped"].items()}}
    if not result.already_complete:
        metrics.update({"tokenize/seconds": result.seconds, "tokenize/tokens_per_s": result.tokens / result.seconds})
    digest = manifest_hash(result.output)
    if ctx.lineage:
        ctx.lineage.log_params(run_id, {f"tokenization.{k}": v for k, v in m["config"]["tokenization"].items()}
                               | {f"data.{k}": v for k, v in m["config"]["data"].items()})
        ctx.lineage.log_metrics(run_id, metrics)
        ctx.lineage.log_json(run_id, m, MANIFEST)
        ctx.lineage.set_tags(run_id, {"manifest_sha256": digest, "data_dir": result.output})
    return {"output": result.output, "manifest_sha256": digest, "metrics": metrics,
            "parent": {"tags": {"manifest_sha256": digest}}}


# --- train ------------------------------------------------------------------------------------------

def train_fingerprint(ctx: Context) -> str:
    c = ctx.cfg
    return _sha(manifest_hash(c.data_dir), c.run.seed, c.fingerprint("model", "train", "batch", "deepspeed"))


def _final_checkpoint(cfg: Config) -> str | None:
    url = checkpoint.latest(cfg.checkpoint_dir)
    if url and checkpoint.TrainerState.read(url).step >= cfg.train.max_steps:
        return url
    return None


def train_done(ctx: Context, marker: dict) -> bool:
    return _final_checkpoint(ctx.cfg) == marker["summary"].get("output")


def train(ctx: Context, run_id: str | None, force: bool) -> dict:
    cfg = ctx.cfg
    started, fingerprint = join(cfg.run_dir, "stages", "train.started.json"), train_fingerprint(ctx)
    if force:
        storage.remove(cfg.checkpoint_dir, recursive=True)
        storage.remove(cfg.metrics_url)
        storage.remove(cfg.metrics_file)
    elif (checkpoint.latest(cfg.checkpoint_dir) and storage.exists(started)
          and storage.read_json(started)["fingerprint"] != fingerprint):
        raise StageError(f"{cfg.checkpoint_dir} holds checkpoints of another model, data or training config; "
                         f"use a new run.name, or --force train to start this one over")
    storage.write_json(started, {"fingerprint": fingerprint})  # checkpoints from here on belong to it
    tracking = {"uri": ctx.lineage.uri, "run_id": run_id} if ctx.lineage and run_id else None
    if ctx.lineage:
        ctx.lineage.log_params(run_id, {k: v for k, v in cfg.flat().items()
                                        if k.split(".")[0] in ("model", "train", "batch", "deepspeed", "cluster")})
        ctx.lineage.log_text(run_id, cfg.to_yaml(), "config.yaml")
        ctx.lineage.log_json(run_id, engine.deepspeed_config(cfg, cfg.cluster.num_workers), "deepspeed_config.json")
    result = launch.run(cfg, resume=True, tracking=tracking)
    if tracking:  # whatever rank 0 could not send yet, read from the run dir wherever rank 0 ran
        mirror = Mirror(mirrored(cfg, run_id)).restore()
        if os.path.exists(cfg.metrics_file):
            ctx.lineage.call("send the remaining training metrics", lambda: MlflowUploader(
                cfg.metrics_file, run_id, ctx.lineage.uri, log=ctx.log).drain(timeout_s=120))
        mirror.publish()
    if ctx.lineage:
        ctx.lineage.set_tags(run_id, {"checkpoint": result.checkpoint})
    return {"output": result.checkpoint, "step": result.step, "loss": result.loss, "tokens": result.tokens,
            "parent": {"tags": {"checkpoint": result.checkpoint}}}


# --- eval -------------------------------------------------------------------------------------------

def eval_fingerprint(ctx: Context) -> str:
    checkpoint = _final_checkpoint(ctx.cfg)
    weights = join(checkpoint, "model.safetensors") if checkpoint else None
    return _sha(checkpoint, storage.size(weights) if weights else None, ctx.cfg.fingerprint("eval"))


def eval_done(ctx: Context, marker: dict) -> bool:
    return storage.exists(join(ctx.cfg.eval_dir, suite.RESULTS))


def evaluate(ctx: Context, run_id: str | None, force: bool) -> dict:
    import ray

    final = _final_checkpoint(ctx.cfg)
    if final is None:
        raise StageError(f"no finished training in {ctx.cfg.checkpoint_dir}; run the train stage first")
    # in a Ray task with a training worker's resources (its GPU on a GPU cluster), not in the driver,
    # which may sit on a CPU-only head node
    c = ctx.cfg.cluster
    task = ray.remote(suite.run).options(num_cpus=c.cpus_per_worker, num_gpus=1 if c.use_gpu else 0)
    results = ray.get(task.remote(ctx.cfg, final, ctx.cfg.eval_dir))
    step = results["checkpoint"].get("step") or 0
    if ctx.lineage:
        ctx.lineage.log_metrics(run_id, results["metrics"], step)
        ctx.lineage.log_json(run_id, results, suite.RESULTS)  # the run dir may be remote
        ctx.lineage.log_text(run_id, samples_text(results), "samples.txt")
        ctx.lineage.set_tags(run_id, {"checkpoint": final})
    return {"output": join(ctx.cfg.eval_dir, suite.RESULTS), "metrics": results["metrics"],
            "parent": {"metrics": results["metrics"], "step": step}}


def samples_text(results: dict) -> str:
    return "\n\n".join(f"[{s['mode']}] {s['prompt']}{c}" for s in results.get("samples", []) for c in s["completions"])


# --- register ---------------------------------------------------------------------------------------

def register_fingerprint(ctx: Context) -> str:
    return _sha(eval_fingerprint(ctx), ctx.cfg.fingerprint("tracking"))


def register_done(ctx: Context, marker: dict) -> bool:
    if not ctx.lineage:
        return True  # nothing to register without tracking
    found = ctx.lineage.call("look up the registered model", lambda: ctx.lineage.client.get_model_version(
        marker["summary"]["name"], marker["summary"]["version"]))
    return found is not None


def register(ctx: Context, run_id: str | None, force: bool) -> dict:
    cfg = ctx.cfg
    if not ctx.lineage or not run_id:
        ctx.log("register: tracking is off or unreachable; nothing registered")
        return {"output": None}
    checkpoint = _final_checkpoint(cfg)
    results = storage.read_json(join(cfg.eval_dir, "results.json"))
    score = results["metrics"].get(registry.SCORE)
    version = registry.register(ctx.lineage, run_id, checkpoint, cfg.tracking.registered_model,
                                cfg.tracking.best_alias, score, {"checkpoint": checkpoint, "run_dir": cfg.run_dir})
    if version is None:
        raise StageError("the model could not be registered (tracking server unreachable); re-run to retry")
    ctx.log(f"register: {version['name']} version {version['version']}; alias '{version['alias']}' -> "
            f"version {version['alias_version']} (best {registry.SCORE})")
    return {"output": version["model_uri"], **version}


# --- finetune (optional) -----------------------------------------------------------------------------

def _finetune_start(cfg: Config) -> str:
    start = cfg.finetune.checkpoint or _final_checkpoint(cfg)
    if start is None:
        raise StageError(f"finetune: no finished training in {cfg.checkpoint_dir} and no finetune.checkpoint; "
                         f"run the train stage first or name a checkpoint")
    return start


def finetune_fingerprint(ctx: Context) -> str:
    f = ctx.cfg.finetune
    data = tasks.source_fingerprint(f) if f.task else None
    return _sha(f.checkpoint or _final_checkpoint(ctx.cfg), data, ctx.cfg.run.seed, ctx.cfg.fingerprint("finetune", "deepspeed"))


def finetune_done(ctx: Context, marker: dict) -> bool:
    return storage.exists(join(ctx.cfg.finetune_dir, "results.json"))


def finetune(ctx: Context, run_id: str | None, force: bool) -> dict:
    cfg = ctx.cfg
    start = _finetune_start(cfg)
    if force:
        storage.remove(cfg.finetune_dir, recursive=True)
    summary = finetuning.run(cfg, start, resume=True, lineage=ctx.lineage, run_id=run_id, log=ctx.log)
    return {**summary, "parent": {"metrics": summary["metrics"], "step": summary["step"]}}


@dataclass(frozen=True)
class Stage:
    name: str
    fingerprint: Callable[[Context], str]
    done: Callable[[Context, dict], bool]
    run: Callable[[Context, str | None, bool], dict]  # (context, its MLflow run, force) -> summary
    tracking_is_work: bool = False  # its MLflow calls are what it does, not overhead (register)


ALL = {s.name: s for s in (Stage("tokenize", tokenize_fingerprint, tokenize_done, tokenize),
                           Stage("train", train_fingerprint, train_done, train),
                           Stage("eval", eval_fingerprint, eval_done, evaluate),
                           Stage("register", register_fingerprint, register_done, register, tracking_is_work=True),
                           Stage("finetune", finetune_fingerprint, finetune_done, finetune))}


def run_stage(ctx: Context, stage: Stage, force: bool) -> dict:
    """Run a stage unless its output exists and matches its fingerprint; returns its summary: outputs,
    metrics, `parent` (tags, metrics and step for the pipeline's MLflow run), `tracking_seconds` (its MLflow
    calls) and `work_seconds` (its wall time, less those calls unless they are its work)."""
    marker = read_marker(ctx.cfg, stage.name)
    fingerprint = stage.fingerprint(ctx)
    if not force and marker and marker["fingerprint"] == fingerprint and stage.done(ctx, marker):
        ctx.log(f"{stage.name}: complete (fingerprint {fingerprint[:12]}), skipped")
        return {**marker["summary"], "skipped": True}
    run_id = ctx.child(stage.name)
    started, tracked = time.time(), ctx.lineage.seconds if ctx.lineage else 0.0
    try:
        summary = stage.run(ctx, run_id, force)
    except BaseException:
        if ctx.lineage:
            ctx.lineage.finish(run_id, "FAILED")
        raise
    summary["tracking_seconds"] = (ctx.lineage.seconds - tracked) if ctx.lineage else 0.0
    summary["work_seconds"] = time.time() - started - (0.0 if stage.tracking_is_work else summary["tracking_seconds"])
    if ctx.lineage:
        ctx.lineage.finish(run_id)
    storage.write_json(marker_url(ctx.cfg, stage.name), {"fingerprint": stage.fingerprint(ctx), "summary": summary,
                                                         "mlflow_run_id": run_id, "completed_at": time.time()})
    return {**summary, "skipped": False}
