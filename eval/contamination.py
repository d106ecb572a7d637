"""HellaSwag on the clean items: those no training document shares an n-gram with, as the tokenization
stage's contamination check recorded them in the dataset's manifest (tokenization/contamination.py)."""

from __future__ import annotations

import numpy as np

from eval import hellaswag
from pipeline.core import storage
from pipeline.core.config import Config
from pipeline.core.storage import join
from tokenization.shards import MANIFEST

SHARE = "hellaswag/contaminated_share"  # of the items scored: what the register stage checks


def clean_metrics(cfg: Config, items: list, scores: dict, data_info: dict) -> tuple[dict, dict]:
    """(metrics, what the results record): HellaSwag's metrics on the clean items under `hellaswag_clean/`
    and the contaminated share; no metrics when the dataset's check did not cover these items."""
    record = _record(cfg)
    if not record.get("checked"):
        return {}, {"checked": False, "why": record.get("why", f"no dataset manifest in {cfg.data_dir}")}
    same = record["sha256"] == data_info["sha256"] or record["spec"] == data_info["source"] == "official"
    if not same:
        return {}, {"checked": False, "why": f"the dataset was checked against {record['path']} "
                                             f"(sha256 {record['sha256'][:12]}), not the items scored"}
    touched = {i for i in record["items_touched"] if i < len(items)}
    clean = np.array([i for i in range(len(items)) if i not in touched], dtype=np.int64)
    metrics = {SHARE: len(touched) / max(len(items), 1)}
    if len(clean):
        subset = {p: {k: v[clean] for k, v in s.items()} for p, s in scores.items()}
        found = hellaswag.metrics([items[i] for i in clean], subset)
        metrics.update({k.replace("hellaswag/", "hellaswag_clean/", 1): v for k, v in found.items()})
    info = {"checked": True, "ngram": record["ngram"], "items_contaminated": sorted(touched),
            "items_clean": len(clean), "dataset_mode": record["mode"]}
    return metrics, info


def _record(cfg: Config) -> dict:
    url = join(cfg.data_dir, MANIFEST)
    if not storage.exists(url):
        return {}
    return storage.read_json(url).get("curation", {}).get("contamination", {"why": "the dataset predates the check"})
