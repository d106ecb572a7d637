"""The register stage: the final checkpoint as an MLflow model (pipeline/served_model.py generates text) in
the Model Registry, a new version, and the `best` alias on the version with the best HellaSwag score."""

from __future__ import annotations

from pathlib import Path

from eval.contamination import SHARE
from eval.hellaswag import ACC_NORM
from pipeline.core import registry
from pipeline.core.config import Config
from pipeline.core.stage import Stage, StageError, StageResult, Tracking, Upstream

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
    metrics = _recorded(upstream, "eval").metrics
    checkpoint, score = _recorded(upstream, "train").output, metrics.get(SCORE)
    refusal = contamination_refusal(cfg, metrics.get(SHARE))
    version = registry.register(tracking.lineage, tracking.run_id, checkpoint, cfg.tracking.registered_model,
                                cfg.tracking.best_alias, score, {"checkpoint": checkpoint, "run_dir": cfg.run_dir},
                                model_code=_SERVED, score_key=SCORE, eligible=refusal is None)
    if version is None:
        raise StageError("the model could not be registered (tracking server unreachable); re-run to retry")
    print(f"register: {version['name']} version {version['version']}; alias '{version['alias']}' -> "
          f"version {version['alias_version']} (best {SCORE})", flush=True)
    if refusal:
        print(f"register: '{version['alias']}' not moved to version {version['version']}: {refusal}", flush=True)
    return StageResult(output=version["model_uri"], details=version)


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
