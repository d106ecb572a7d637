"""Tokenization as a pipeline stage: the Ray Data job (job.py) and what its MLflow run records."""

from __future__ import annotations

from pipeline.core.config import Config
from pipeline.core.stage import Stage, StageResult, Tracking, Upstream
from tokenization import job
from tokenization.shards import MANIFEST, manifest_hash, splits_as_datasets


def _inputs(cfg: Config, upstream: Upstream) -> str:
    return job.fingerprint(cfg)


def _verify(cfg: Config, result: StageResult, tracking: Tracking | None) -> bool:
    return job.complete(cfg)


def _run(cfg: Config, force: bool, tracking: Tracking | None, upstream: Upstream) -> StageResult:
    result = job.run(cfg, overwrite=force)
    m = result.manifest
    metrics = {"tokenize/documents": m["input_documents"], "tokenize/tokens_train": m["totals"]["train"]["tokens"],
               "tokenize/tokens_val": m["totals"]["val"]["tokens"], "tokenize/shards": len(m["shards"]),
               "tokenize/skipped": sum(m["skipped"].values()),
               **{f"tokenize/skipped_{reason}": n for reason, n in m["skipped"].items()},
               **curation_metrics(m["curation"]), **source_metrics(m)}
    if not result.already_complete:
        metrics.update({"tokenize/seconds": result.seconds, "tokenize/tokens_per_s": result.tokens / result.seconds})
    digest = manifest_hash(result.output)
    return StageResult(
        output=result.output, metrics=metrics,
        params={f"tokenization.{k}": v for k, v in m["config"]["tokenization"].items()}
        | {f"data.{k}": v for k, v in m["config"]["data"].items() if k != "sources"}
        | {f"data.sources.{s['name']}.{k}": v for s in m["config"]["data"].get("sources", [])
           for k, v in s.items() if k != "name"},
        tags={"manifest_sha256": digest, "data_dir": result.output}, artifacts={MANIFEST: m},
        datasets=splits_as_datasets(result.output),
        parent_tags={"manifest_sha256": digest}, details={"manifest_sha256": digest})


def source_metrics(m: dict) -> dict[str, int]:
    """Each data.sources source's documents and tokens per split (none without sources)."""
    return {f"tokenize/{s['name']}/{key}_{split}": s[key][split]
            for s in m.get("sources", []) for key in ("documents", "tokens") for split in s[key]}


def curation_metrics(c: dict) -> dict[str, float]:
    metrics = {f"tokenize/{key}": c[key]["documents"] for key in ("exact_duplicates", "near_duplicates")
               if c[key]["enabled"]}
    metrics.update({f"tokenize/quality_{rule}": n for rule, n in c["quality"]["failed"].items()})
    if c["contamination"]["checked"]:
        k = c["contamination"]
        metrics.update({"tokenize/contaminated_documents": k["train_documents"],
                        "tokenize/contaminated_items": k["items_touched_count"]})
    return metrics


STAGE = Stage("tokenize", _inputs, _verify, _run)
