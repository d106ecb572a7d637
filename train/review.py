"""What a user reviews while pretraining runs, refreshed on rank 0 after each in-training evaluation: the figure
of eval/figures.py (loss and HellaSwag against tokens, written to the run directory and logged to the MLflow run
with log_figure), the generated samples as an MLflow table (a row per completion, with its step, tokens and
decoding settings, appended at each evaluation: text improving over training), and the run's constants (items
scored, validation tokens, the epoch) as params and tags rather than charts. A tracking server that fails here is
warned about once; training goes on."""

from __future__ import annotations

import sys
from collections.abc import Callable

from eval import figures, references
from pipeline.core import storage
from pipeline.core.config import Config
from pipeline.core.tracking import metrics_file, read_jsonl

SAMPLES = "samples.json"  # the MLflow table of generated text


class Review:
    def __init__(self, cfg: Config, tracking: dict | None, tokens_per_step: int, constants: dict):
        self.cfg, self.tokens_per_step = cfg, tokens_per_step
        self.run_id = tracking["run_id"] if tracking else None
        self.client = None
        self.warned = False
        if tracking:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=tracking["uri"])
            self._call("log the run's constants", lambda: self.client.log_batch(self.run_id, params=_params(constants)))

    def update(self, step: int, samples: list[dict], tags: dict) -> None:
        """Redraw the figure from the run's metrics record (this step's scores included) and log it, the
        samples of this step and the tags."""
        records = [{**r, figures.TOKENS: r["step"] * self.tokens_per_step} for r in read_jsonl(metrics_file(self.cfg.run_dir))]
        fig = figures.draw(records, references.applicable(self.cfg), f"{self.cfg.run.name}: step {step}",
                           references.hellaswag_label(self.cfg.eval.hellaswag))
        storage.write_bytes(storage.join(self.cfg.run_dir, figures.FILE), figures.png(fig))
        if self.client is None:
            return
        self._call("log the training figure", lambda: self.client.log_figure(self.run_id, fig, figures.FILE))
        if samples:
            table = {"step": [], "tokens": [], "prompt": [], "completion": [], "decoding": []}
            for s in samples:
                for completion in s["completions"]:
                    for key, value in (("step", step), ("tokens", step * self.tokens_per_step), ("prompt", s["prompt"]),
                                       ("completion", completion), ("decoding", s["mode"])):
                        table[key].append(value)
            self._call("log the samples table", lambda: self.client.log_table(self.run_id, table, SAMPLES))
        self._call("set tags", lambda: [self.client.set_tag(self.run_id, k, str(v)) for k, v in tags.items()])

    def _call(self, what: str, fn: Callable) -> None:
        try:
            fn()
        except Exception as err:  # server down or refusing: the review waits for the next evaluation
            if not self.warned:
                sys.stderr.write(f"train: could not {what} in MLflow ({type(err).__name__}: "
                                 f"{str(err).splitlines()[0][:200] if str(err) else ''}); training goes on\n")
            self.warned = True


def _params(constants: dict) -> list:
    from mlflow.entities import Param

    return [Param(k, str(v)) for k, v in constants.items() if v is not None]
