"""The stages of a pipeline run, and the one way the driver runs any of them.

Each stage is defined beside its code (pipeline/core/stage.Stage): what its output depends on, a check
that the output is still whole, and a run returning a typed StageResult. A finished stage leaves
`<run dir>/stages/<stage>.json` (fingerprint, result); `run_stage` skips a stage whose marker matches its
current fingerprint and whose output still verifies, and records into the stage's MLflow child run what
its result says (params, metrics, tags, artifacts).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from eval.stage import STAGE as EVAL
from pipeline import register
from pipeline.core import storage
from pipeline.core.config import Config
from pipeline.core.lineage import Lineage
from pipeline.core.stage import Stage, StageResult, Tracking
from pipeline.core.storage import join
from tokenization.stage import STAGE as TOKENIZE
from train.stage import FINETUNE, TRAIN

ALL: dict[str, Stage] = {s.name: s for s in (TOKENIZE, TRAIN, EVAL, register.STAGE, FINETUNE)}


@dataclass
class Outcome:
    """A stage as this run saw it: its result, whether it was skipped, where its time went."""

    result: StageResult
    skipped: bool
    work_seconds: float = 0.0  # its wall time, less its MLflow calls unless they are its work
    tracking_seconds: float = 0.0  # its MLflow calls


@dataclass
class Context:
    cfg: Config  # resolved (Config.with_absolute_paths)
    lineage: Lineage | None
    log: Callable[[str], None] = print
    outcomes: dict[str, Outcome] = field(default_factory=dict)  # the stages run or skipped, in order

    def upstream(self, name: str) -> StageResult | None:
        """An earlier stage's result: from this run, else as its marker recorded it."""
        if name in self.outcomes:
            return self.outcomes[name].result
        marker = read_marker(self.cfg, name)
        return StageResult.from_json(marker["result"]) if marker else None


def marker_url(cfg: Config, stage: str) -> str:
    return join(cfg.run_dir, "stages", f"{stage}.json")


def read_marker(cfg: Config, stage: str) -> dict | None:
    url = marker_url(cfg, stage)
    marker = storage.read_json(url) if storage.exists(url) else None
    return marker if marker and "result" in marker else None  # one of an older layout: redo the stage


def fingerprint(inputs: object) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def run_stage(ctx: Context, stage: Stage, force: bool) -> Outcome:
    """Run a stage unless its recorded output matches its fingerprint and still verifies; record the outcome."""
    marker = read_marker(ctx.cfg, stage.name)
    digest = fingerprint(stage.inputs(ctx.cfg, ctx.upstream))
    run_id = ctx.lineage.stage_run(stage.name) if ctx.lineage else None
    tracking = Tracking(ctx.lineage, run_id) if ctx.lineage and run_id else None
    if not force and marker and marker["fingerprint"] == digest:
        recorded = StageResult.from_json(marker["result"])
        if stage.verify(ctx.cfg, recorded, tracking):
            ctx.log(f"{stage.name}: complete (fingerprint {digest[:12]}), skipped")
            ctx.outcomes[stage.name] = Outcome(recorded, skipped=True)
            return ctx.outcomes[stage.name]
    started, tracked = time.time(), ctx.lineage.seconds if ctx.lineage else 0.0
    try:
        result = stage.run(ctx.cfg, force, tracking, ctx.upstream)
        if tracking:
            _record(tracking, result)
    except BaseException:
        if tracking:
            ctx.lineage.finish(run_id, "FAILED")
        raise
    tracking_seconds = (ctx.lineage.seconds - tracked) if ctx.lineage else 0.0
    work = time.time() - started - (0.0 if stage.tracking_is_work else tracking_seconds)
    if tracking:
        ctx.lineage.finish(run_id)
    storage.write_json(marker_url(ctx.cfg, stage.name), {"fingerprint": digest, "result": result.to_json(),
                                                         "mlflow_run_id": run_id, "completed_at": time.time()})
    ctx.outcomes[stage.name] = Outcome(result, skipped=False, work_seconds=work, tracking_seconds=tracking_seconds)
    return ctx.outcomes[stage.name]


def _record(tracking: Tracking, result: StageResult) -> None:
    lineage, run_id = tracking.lineage, tracking.run_id
    if result.params:
        lineage.log_params(run_id, result.params)
    lineage.log_datasets(run_id, result.datasets)
    if result.metrics:
        lineage.log_metrics(run_id, result.metrics, result.step)
    for name, content in result.artifacts.items():
        if isinstance(content, str):
            lineage.log_text(run_id, content, name)
        else:
            lineage.log_json(run_id, content, name)
    if result.tags:
        lineage.set_tags(run_id, result.tags)
