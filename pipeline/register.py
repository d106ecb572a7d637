"""The register stage: the final checkpoint as an MLflow model (pipeline/served_model.py generates text), logged
into the train run, in the Model Registry: a new version with its model card (pipeline/model_card.py) and tags
linking the train run, the pipeline run and the manifest, and the `best` alias on the version with the best
HellaSwag score."""

from __future__ import annotations

from pathlib import Path

from eval.contamination import SHARE
from eval.hellaswag import ACC_NORM
from eval.hellaswag import METRICS as HELLASWAG
from eval.stage import FINAL
from eval.val_loss import VAL_LOSS, VAL_PERPLEXITY
from pipeline import model_card
from pipeline.core import registry
from pipeline.core.config import Config
from pipeline.core.lineage import git_commit
from pipeline.core.stage import Stage, StageError, StageResult, Tracking, Upstream
from pipeline.core.storage import join
from tokenization.shards import MANIFEST, load_manifest, manifest_hash

SCORE = ACC_NORM  # what "best" means: the number published tables compare
_SERVED = Path(__file__).with_name("served_model.py")


def _inputs(cfg: Config, upstream: Upstream) -> list:
    return [_recorded(upstream, "train").output, _recorded(upstream, "eval").metrics, cfg.fingerprint("tracking")]


def _verify(cfg: Config, result: StageResult, tracking: Tracking | None) -> bool:
    if not tracking:
        return True  # nothing to register without tracking
    found = tracking.lineage.call("look up the registered model", lambda: tracking.lineage.client.get_model_version(
        result.details["name"], result.details["version"]))
    return found is not None


def _run(cfg: Config, force: bool, tracking: Tracking | None, upstream: Upstream) -> StageResult:
    if not tracking:
        if cfg.tracking.enabled:  # asked to register and could not: a failed stage, not a quiet success
            raise StageError("register: tracking is on but the MLflow server could not be reached; nothing was "
                             "registered; run the same command again when it is back (the other stages are kept)")
        print("register: tracking is off (tracking.enabled=false); nothing registered", flush=True)
        return StageResult()
    lineage = tracking.lineage
    trained, evaluated = _recorded(upstream, "train"), _recorded(upstream, "eval")
    scores = {k[len(FINAL):]: v for k, v in evaluated.metrics.items() if k.startswith(FINAL)}
    # the model is logged into the run that trained it: the version's source run carries its curves and data
    runs = {stage: lineage.find_stage_run(stage) for stage in ("tokenize", "train", "eval")}
    source_run = runs["train"] or tracking.run_id
    refusal = contamination_refusal(cfg, scores.get(SHARE))
    version = registry.register(lineage, source_run, trained.output, cfg.tracking.registered_model,
                                cfg.tracking.best_alias, scores.get(SCORE), {"checkpoint": trained.output},
                                model_code=_SERVED, score_key=SCORE, eligible=refusal is None)
    if version is None:
        raise StageError("the model could not be registered (tracking server unreachable); re-run to retry")
    _describe(cfg, lineage, version, runs, trained, evaluated, scores)
    print(f"register: {version['name']} version {version['version']}; alias '{version['alias']}' -> "
          f"version {version['alias_version']} (best {SCORE})", flush=True)
    if refusal:
        print(f"register: '{version['alias']}' not moved to version {version['version']}: {refusal}", flush=True)
    return StageResult(output=version["model_uri"], details=version,
                       tags={"registered_version": f"{version['name']}/{version['version']}"})


def _describe(cfg: Config, lineage, version: dict, runs: dict, trained: StageResult, evaluated: StageResult,
              scores: dict) -> None:
    """The version's model card and lineage tags, and the final scores linked to the logged model with the
    datasets they were measured on."""
    manifest, digest = load_manifest(cfg.data_dir), manifest_hash(cfg.data_dir)
    def manifest_link(relative: bool) -> str:
        return (lineage.run_url(runs["tokenize"], f"artifacts/{MANIFEST}", relative) if runs["tokenize"] else
                join(cfg.data_dir, MANIFEST))

    links = {"train run": lineage.run_url(runs["train"], relative=True),
             "eval run": lineage.run_url(runs["eval"], relative=True),
             "pipeline run": lineage.run_url(lineage.parent_id, relative=True)}
    card = model_card.pretrained(cfg, name=version["name"], version=version["version"], manifest=manifest,
                                 manifest_sha256=digest, manifest_link=manifest_link(True), trained=trained.details,
                                 scores=scores, commit=git_commit(), links=links, tracking_uri=lineage.uri)
    registry.describe(lineage, version, card, {"train_run": lineage.run_url(runs["train"]),
                                               "pipeline_run": lineage.run_url(lineage.parent_id),
                                               "manifest": manifest_link(False), "manifest_sha256": digest})
    measured_on = {FINAL + key: dataset for dataset in evaluated.datasets
                   for key in ([VAL_LOSS, VAL_PERPLEXITY] if dataset["context"] == "validation" else HELLASWAG)}
    registry.log_model_metrics(lineage, runs["eval"], version.get("model_id"), evaluated.metrics, evaluated.step,
                               measured_on)


def contamination_refusal(cfg: Config, share: float | None) -> str | None:
    """Why this model may not become `best` (its HellaSwag items overlap its training data), or None."""
    limit = cfg.tracking.max_contaminated
    if share is None or share <= limit or cfg.tracking.allow_contaminated:
        return None
    return (f"{share:.1%} of its HellaSwag items overlap its training data, above tracking.max_contaminated="
            f"{limit:g}; decontaminate (tokenization.decontaminate=drop) or set tracking.allow_contaminated=true")


def _recorded(upstream: Upstream, name: str) -> StageResult:
    found = upstream(name)
    if found is None:
        raise StageError(f"register: the {name} stage has not completed in this run directory; run it first")
    return found


STAGE = Stage("register", _inputs, _verify, _run, tracking_is_work=True)
