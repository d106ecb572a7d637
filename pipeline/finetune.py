"""The fine-tune stage: a pretrained checkpoint and task data -> task heads trained on it (train/finetuning.py),
scored on a held-out split, tracked in MLflow under the checkpoint's lineage, registered as its own model.

The starting checkpoint is anything eval/run.py --ckpt takes (our checkpoints, local or on object storage, a
DeepSpeed or Hugging Face directory, hf:NAME) or a registered model, models:/NAME@ALIAS or models:/NAME/VERSION.
A checkpoint that already has heads (one of ours, or transformers' GPT2ForSequenceClassification /
GPT2ForTokenClassification) continues with them if they match finetune.*, and is refused if they do not.

MLflow: the run is a child of the pipeline run that produced the checkpoint (found through the run id its
trainer state or registry entry records), tagged gpt2.stage=finetune; a checkpoint without one (a Hugging
Face model, say) gets a parent run of its own.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from pipeline import registry
from pipeline.core import storage
from pipeline.core.config import Config, output_base
from pipeline.core.model import checkpoints, heads
from pipeline.core.storage import join
from pipeline.core.tracking import Mirror, MlflowUploader, mirrored
from pipeline.lineage import PARENT_TAG, Lineage, tracking_uri
from train import finetuning, tasks
from pipeline.core.model.checkpoints import CheckpointError

SOURCE = "source.json"  # beside the starting model: what --ckpt named and where it came from
_SERVED = Path(__file__).with_name("served_heads.py")


def run(cfg: Config, ckpt: str, *, resume: bool = False, lineage: Lineage | None = None,
        run_id: str | None = None, log=print) -> dict:
    """Fine-tune from `ckpt` into cfg.finetune_dir. lineage/run_id: the MLflow run to log into (the pipeline's
    finetune stage passes its child run); without them the run is found or made under the checkpoint's lineage."""
    cfg = cfg.with_absolute_paths()
    f, init = cfg.finetune, join(cfg.finetune_dir, "init")
    existing = checkpoints.latest(finetuning.trainer_config(cfg).checkpoint_dir)
    if existing and not resume:
        raise CheckpointError(f"{cfg.finetune_dir} already holds a fine-tune (latest: {existing}); pass --resume to "
                              f"continue it, or set finetune.output (or run.name) for a new one")
    if existing and storage.exists(join(init, SOURCE)):
        source = storage.read_json(join(init, SOURCE))  # resume from the same start, whatever --ckpt says now
    else:
        source = write_init(cfg, ckpt, init, log)
    own = lineage is None and cfg.tracking.enabled
    if own:
        lineage, run_id = _track(cfg, source)
    tracking = {"uri": lineage.uri, "run_id": run_id} if lineage and run_id else None
    if tracking:
        lineage.log_params(run_id, {k: v for k, v in cfg.flat().items() if k.startswith(("finetune.", "cluster.", "deepspeed."))})
        lineage.set_tags(run_id, {"start_checkpoint": source["spec"], "start_weights_sha256": source.get("weights_sha256")})
    try:
        result = finetuning.run(cfg, init, resume=resume, tracking=tracking)
    except BaseException:
        if own and tracking:
            lineage.finish(run_id, "FAILED")
        raise
    summary = {"output": result.checkpoint, "step": result.step, "loss": result.loss, "metrics": result.metrics,
               "examples": result.examples}
    if tracking:
        tcfg = finetuning.trainer_config(cfg)  # whatever rank 0 could not send yet, from the run dir (as stages.train)
        mirror = Mirror(mirrored(tcfg, run_id)).restore()
        if os.path.exists(tcfg.metrics_file):
            lineage.call("send the remaining metrics", lambda: MlflowUploader(
                tcfg.metrics_file, run_id, lineage.uri, log=log).drain(timeout_s=120))
        mirror.publish()
        lineage.log_metrics(run_id, result.metrics, result.step)
        lineage.log_artifact(run_id, join(cfg.finetune_dir, finetuning.RESULTS))  # when local
        lineage.set_tags(run_id, {"checkpoint": result.checkpoint})
        score_key = tasks.primary_metric(tasks.head_specs(f))
        version = registry.register(lineage, run_id, result.checkpoint, f.registered_model, cfg.tracking.best_alias,
                                    result.metrics.get(score_key), {"checkpoint": result.checkpoint,
                                                                    "start_checkpoint": source["spec"]},
                                    model_code=_SERVED, score_key=score_key)
        if version:
            log(f"finetune: registered {version['name']} version {version['version']}")
            summary["registered"] = version
        if own:
            lineage.finish(run_id)
    return summary


def write_init(cfg: Config, spec: str, init: str, log=print) -> dict:
    """Open the starting checkpoint, put the configured heads on it (kept from the checkpoint when it has
    matching ones, new otherwise, seeded by run.seed) and write it to `init`; returns its description."""
    local = _registered(spec, cfg) if spec.startswith("models:/") else None
    trunk, info = checkpoints.load(local["path"] if local else spec)
    info = {**info, **(local or {}), "spec": spec}
    specs = tasks.head_specs(cfg.finetune)
    config_file = Path(info.get("path", ""), "config.json")
    found = heads.specs_from_hf(json.loads(config_file.read_text())) if config_file.is_file() else {}
    if found:
        heads.check_heads(specs, found, str(config_file))
        model = heads.load_hf(config_file.parent)
        if set(model.specs) != set(specs):  # one head, saved under another name
            (old,), (new,) = model.specs, specs
            model.heads = torch.nn.ModuleDict({new: model.heads[old]})
        model.specs = dict(specs)  # same kinds and sizes; loss weights and dropout as configured now
        log(f"finetune: starting from {spec} with its heads ({', '.join(specs)})")
    else:
        torch.manual_seed(cfg.run.seed)
        model = heads.TaskModel(trunk, specs, cfg.finetune.pad_token_id)
        log(f"finetune: starting from {spec} with new heads ({', '.join(f'{n}: {s.kind}' for n, s in specs.items())})")
    model.pad_token_id = cfg.finetune.pad_token_id
    with tempfile.TemporaryDirectory() as tmp:
        model.save_hf(tmp)
        for name in ("model.safetensors", "config.json"):
            storage.write_bytes(join(init, name), Path(tmp, name).read_bytes())
    storage.write_json(join(init, SOURCE), info)
    return info


def _registered(spec: str, cfg: Config) -> dict:
    """A registered model's weights, downloaded, and the run that registered them."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg.tracking.uri, output_base())
    client = MlflowClient(tracking_uri=uri)
    name_ref = spec[len("models:/"):]
    try:
        if "@" in name_ref:
            version = client.get_model_version_by_alias(*name_ref.split("@", 1))
        else:
            version = client.get_model_version(*name_ref.rsplit("/", 1))
        path = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{version.name}/{version.version}",
                                                   dst_path=tempfile.mkdtemp(prefix="gpt2-registered-"),
                                                   tracking_uri=uri)
    except Exception as err:  # MlflowException, a bad name, the server down: the user needs the spec named
        raise CheckpointError(f"{spec}: cannot read this registered model from {uri} ({type(err).__name__}: {err})") from err
    weights = os.path.join(path, "artifacts", "checkpoint")
    if not os.path.isfile(os.path.join(weights, "config.json")):
        raise CheckpointError(f"{spec}: the registered model holds no artifacts/checkpoint/config.json")
    return {"path": weights, "run_id": version.run_id, "registered": f"{version.name}/{version.version}"}


def _track(cfg: Config, source: dict) -> tuple[Lineage | None, str | None]:
    """This fine-tune's MLflow run, a child of the checkpoint's pipeline run when it has one."""
    track = Lineage(tracking_uri(cfg.tracking.uri, output_base()), cfg.tracking.experiment, cfg.finetune_dir)
    if not track.available:
        return None, None
    origin = source.get("run_id")
    parent = origin and track.call("find the checkpoint's run", lambda: track.client.get_run(origin).data.tags.get(PARENT_TAG, origin))
    if parent:
        track.parent_id = parent
    else:
        track.start_parent(cfg.run.name, {}, {"start_checkpoint": source["spec"]})
    return track, track.stage_run("finetune")
