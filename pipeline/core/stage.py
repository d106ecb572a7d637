"""What a stage is to the driver: a name, what its output depends on, a check that the output is still
whole, and a `run` that returns a typed `StageResult`. Each stage defines itself beside its code
(tokenization/stage.py, train/stage.py, eval/stage.py, pipeline/register.py); the driver
(pipeline/stages.py) fingerprints, skips, runs and records them without knowing their insides.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.core.command import UserError
from pipeline.core.config import Config
from pipeline.core.lineage import Lineage


class StageError(UserError, RuntimeError):
    """A stage that cannot run as asked (an earlier stage's output missing, a run dir holding another run)."""


@dataclass
class Tracking:
    """The MLflow run a stage logs into (a child of the pipeline's run)."""

    lineage: Lineage
    run_id: str

    @property
    def for_workers(self) -> dict:
        """What a Ray worker needs to log into the run: {"uri", "run_id"}."""
        return {"uri": self.lineage.uri, "run_id": self.run_id}


@dataclass
class StageResult:
    output: str | None = None  # what the stage made (a URL), or None
    metrics: dict[str, float] = field(default_factory=dict)  # logged to the stage's run at `step`
    step: int = 0
    params: dict[str, Any] = field(default_factory=dict)  # MLflow params of the stage's run
    tags: dict[str, Any] = field(default_factory=dict)  # MLflow tags of the stage's run
    artifacts: dict[str, dict | str] = field(default_factory=dict)  # file name -> JSON object or text
    datasets: list[dict] = field(default_factory=list)  # MLflow datasets it read or wrote (Lineage.log_datasets)
    parent_tags: dict[str, Any] = field(default_factory=dict)  # what the pipeline's run carries of it
    # the few numbers the pipeline's run carries of it, named as a summary (summary/...): the scores users compare
    # pipeline runs by, not copies of the stage's series
    summary: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)  # the rest, for the console and the next stages

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> StageResult:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


Upstream = Callable[[str], "StageResult | None"]  # an earlier stage's result (run now or recorded), by name


@dataclass(frozen=True)
class Stage:
    name: str
    inputs: Callable[[Config, Upstream], Any]  # what its output depends on (JSON-able): hashed into its fingerprint
    verify: Callable[[Config, StageResult, Tracking | None], bool]  # its recorded output is still there and whole
    run: Callable[[Config, bool, Tracking | None, Upstream], StageResult]  # (config, force, tracking, upstream)
    tracking_is_work: bool = False  # its MLflow calls are what it does, not overhead (register)
