"""The fine-tune stage: a pretrained checkpoint and task data -> task heads trained on it by the one training
loop (train/loop.py) with the recipe below, scored on a held-out split, tracked in MLflow under the
checkpoint's lineage, registered as its own model.

    <finetune dir>/                 finetune.output, default <run dir>/finetune
      init/                         the starting model with its heads (config.json + model.safetensors,
                                    source.json: what --ckpt named), written by train/start_model.py
      checkpoints/step_NNNNNNNN/    as pretraining's; model.safetensors + config.json in the layout of
                                    transformers' GPT2ForSequenceClassification / GPT2ForTokenClassification
      metrics.jsonl, results.json   training metrics; the final held-out scores

finetune.* sets the schedule (lr, warm-up, steps, weight decay) and batches (examples per step and per
forward pass). As in pretraining, a step's result is a function of its number (data position, dropout
seed), so a restart after a crash repeats the same losses bit for bit.

MLflow: the run is a child of the pipeline run that produced the checkpoint (found through the run id its
trainer state or registry entry records), tagged gpt2.stage=finetune; a checkpoint without one (a Hugging
Face model, say) gets a parent run of its own. Inside the pipeline, the driver passes its child run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.core import registry, storage
from pipeline.core.config import Config, ConfigError, output_base
from pipeline.core.lineage import PARENT_TAG, Lineage, git_commit, tracking_uri
from pipeline.core.model import checkpoints, heads
from pipeline.core.model.checkpoints import CheckpointError
from pipeline.core.storage import join
from tokenization.tokenizer import encoding
from train import engine as engines
from train import launch, start_model, tasks
from train.loop import Recipe

RESULTS = "results.json"
_SERVED = Path(__file__).with_name("served_heads.py")


@dataclass
class FinetuneResult:
    checkpoint: str  # the final committed checkpoint
    step: int
    loss: float | None
    metrics: dict  # held-out scores of the final checkpoint
    examples: dict  # train / eval example counts, and how many were truncated
    registered: dict | None = None  # the registry version, when tracked


def checkpoint_dir(cfg: Config) -> str:
    return join(cfg.finetune_dir, "checkpoints")


def run(cfg: Config, ckpt: str, *, resume: bool = False, lineage: Lineage | None = None,
        run_id: str | None = None, log=print) -> FinetuneResult:
    """Fine-tune from `ckpt` into cfg.finetune_dir (cfg resolved: Config.with_absolute_paths). With resume,
    continue from the latest committed checkpoint; without, refuse a dir that has some. lineage/run_id: the
    MLflow run to log into (the pipeline's finetune stage passes its child run); without them the run is
    found or made under the checkpoint's lineage."""
    init = join(cfg.finetune_dir, "init")
    existing = checkpoints.latest(checkpoint_dir(cfg))
    if existing and not resume:
        raise CheckpointError(f"{cfg.finetune_dir} already holds a fine-tune (latest: {existing}); pass --resume to "
                              f"continue it, or set finetune.output (or run.name) for a new one")
    if existing and storage.exists(join(init, start_model.SOURCE)):
        source = storage.read_json(join(init, start_model.SOURCE))  # the same start, whatever --ckpt says now
    else:
        source = start_model.write(cfg, ckpt, init, log)
    own = lineage is None and cfg.tracking.enabled
    if own:
        lineage, run_id = _track(cfg, source)
    tracking = {"uri": lineage.uri, "run_id": run_id} if lineage and run_id else None
    if tracking:
        lineage.log_params(run_id, {k: v for k, v in cfg.flat().items() if k.startswith(("finetune.", "cluster.", "deepspeed."))})
        lineage.set_tags(run_id, {"start_checkpoint": source["spec"], "start_weights_sha256": source.get("weights_sha256")})
    try:
        result = _train(cfg, init, existing, tracking, log)
    except BaseException:
        if own and tracking:
            lineage.finish(run_id, "FAILED")
        raise
    if tracking:
        if own:  # inside the pipeline, the driver records the stage's metrics (train/stage.py)
            lineage.log_metrics(run_id, result.metrics, result.step)
        result.registered = _register(cfg, lineage, run_id, result, source, log)
        if own:
            lineage.finish(run_id)
    return result


def _train(cfg: Config, init: str, existing: str | None, tracking: dict | None, log) -> FinetuneResult:
    f = cfg.finetune
    specs = tasks.head_specs(f)
    init_config = storage.read_json(join(init, "config.json"))
    heads.check_heads(specs, heads.specs_from_hf(init_config), join(init, "config.json"))
    if f.max_len > init_config["n_positions"]:
        raise ConfigError(f"finetune.max_len: ({f.max_len}) exceeds the model's context ({init_config['n_positions']})")
    if existing:  # the heads being trained must be the ones saved
        heads.check_heads(specs, heads.specs_from_hf(storage.read_json(join(existing, "config.json"))),
                          join(existing, "config.json"))
        log(f"finetune: resuming from {existing}")
    encode = encoding().encode_ordinary
    train, held = tasks.load(f, "train", encode), tasks.load(f, "eval", encode)
    log(f"finetune: {len(train.examples)} training examples from {train.source}, {len(held.examples)} held out "
        f"from {held.source}; {train.truncated + held.truncated} cut at finetune.max_len={f.max_len}")
    payload = {"config": cfg.model_dump(), "init": init, "tracking": tracking, "train": train.examples,
               "eval": held.examples, "fingerprint": tasks.fingerprint(train, held), "source": train.source}
    out = launch.fit(cfg, make_recipe, payload, "finetune", cfg.finetune_dir, checkpoint_dir(cfg))
    if tracking:
        launch.drain_metrics(cfg.finetune_dir, tracking)
    examples = {"train": len(train.examples), "eval": len(held.examples), "truncated": train.truncated + held.truncated}
    storage.write_json(join(cfg.finetune_dir, RESULTS), {**out, "examples": examples, "init": init})
    return FinetuneResult(out["checkpoint"], out["step"], out["loss"], out["metrics"], examples)


def _register(cfg: Config, lineage: Lineage, run_id: str, result: FinetuneResult, source: dict, log) -> dict | None:
    f = cfg.finetune
    lineage.log_artifact(run_id, join(cfg.finetune_dir, RESULTS))  # when local
    lineage.set_tags(run_id, {"checkpoint": result.checkpoint})
    score_key = tasks.primary_metric(tasks.head_specs(f))
    version = registry.register(lineage, run_id, result.checkpoint, f.registered_model, cfg.tracking.best_alias,
                                result.metrics.get(score_key), {"checkpoint": result.checkpoint,
                                                                "start_checkpoint": source["spec"]},
                                model_code=_SERVED, score_key=score_key)
    if version:
        registry.describe(lineage, version, _card(cfg, version, result, source, lineage.run_url(run_id, relative=True)),
                          {"finetune_run": lineage.run_url(run_id), "start_checkpoint": source["spec"]})
        log(f"finetune: registered {version['name']} version {version['version']}")
    return version


def _card(cfg: Config, version: dict, result: FinetuneResult, source: dict, run_link: str | None) -> str:
    """The fine-tuned version's model card: where it started, the task data, the training, the held-out scores."""
    f, n = cfg.finetune, result.examples
    rows = [f"| {k} | {v:.4f} |" for k, v in sorted(result.metrics.items())]
    return "\n".join([
        f"## {version['name']} version {version['version']}: GPT-2 fine-tuned with a {f.head} head by gpt2-pipeline", "",
        f"**Started from**: `{source['spec']}` (weights sha256 `{source.get('weights_sha256')}`).", "",
        f"**Task data**: `{f.task}` (split {f.train_split}): {n['train']:,} training examples, {n['eval']:,} held out; "
        f"{n['truncated']:,} cut at finetune.max_len={f.max_len}.", "",
        f"**Training**: {result.step:,} steps, lr {f.lr:g}, batch {f.batch_size}, seed {cfg.run.seed}.", "",
        "**Held-out scores**:", "", "| metric | value |", "|---|---|", *rows, "",
        f"**Code**: git commit `{git_commit()}`.", "",
        f"**Run**: [finetune run]({run_link})" if run_link else ""]) + "\n"


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


# --- in the workers: the loop's recipe --------------------------------------------------------------------

class FineTuning(Recipe):
    def __init__(self, cfg: Config, payload: dict, device: torch.device):
        f = cfg.finetune
        super().__init__(name="finetune", schedule=f, batch=engines.Batch(f.batch_size, f.micro_batch_size, f.max_len),
                         run_dir=cfg.finetune_dir, checkpoint_dir=checkpoint_dir(cfg),
                         checkpoint_interval=f.checkpoint_interval, data_id=payload["fingerprint"],
                         data_source=payload["source"])
        self.cfg, self.init, self.device = cfg, payload["init"], device
        self.train, self.held = payload["train"], payload["eval"]
        self.scores: dict = {}

    def model(self) -> torch.nn.Module:
        model = heads.load_hf(storage.local_copy(self.init))
        model.trunk.activation_checkpointing = self.cfg.deepspeed.activation_checkpointing
        return model

    def batches(self, sequences: int, rank: int, world: int, micro: int):
        f = self.cfg.finetune
        batch = tasks.batch_at(self.train, sequences + rank * (f.batch_size // world) + micro * f.micro_batch_size,
                               f.micro_batch_size, self.cfg.run.seed)
        return tasks.collate(batch, tasks.head_specs(f), f.pad_token_id)

    def step_metrics(self, state) -> dict:
        return {"train/epoch": state.sequences / len(self.train)}

    def evaluate(self, engine, step: int, last: bool) -> dict:
        if step % self.checkpoint_interval == 0 or last:
            self.scores = evaluate(engine, self.held, self.cfg, self.device)
            return self.scores
        return {}

    def result(self, engine) -> dict:
        # resumed at the end (nothing trained, nothing scored): score the final checkpoint again
        return {"metrics": self.scores or evaluate(engine, self.held, self.cfg, self.device)}


def make_recipe(cfg: Config, payload: dict, rank: int, world: int, device: torch.device) -> FineTuning:
    return FineTuning(cfg, payload, device)


@torch.no_grad()
def evaluate(engine, examples: list, cfg: Config, device) -> dict[str, float]:
    """Held-out scores. Every rank runs every batch: under ZeRO-3 each forward pass is collective, and
    held-out sets are small next to training."""
    f, specs = cfg.finetune, engine.module.specs
    engine.eval()
    logits, labels = {n: [] for n in specs}, {n: [] for n in specs}
    for i in range(0, len(examples), f.micro_batch_size):
        idx, gold = tasks.collate(examples[i:i + f.micro_batch_size], specs, f.pad_token_id)
        out, _ = engine(idx.to(device))
        for name in specs:
            logits[name].append(out[name].float().cpu())
            labels[name].append(gold[name])
    engine.train()
    return tasks.metrics(specs, logits, labels)
