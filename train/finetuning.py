"""The fine-tune trainer: task heads on a pretrained trunk, on pretraining's DeepSpeed engine, Ray Train
launch and checkpoints (train/engine.py, launch.py, checkpoint.py, loop.engine_and_state).

    <finetune dir>/                 finetune.output, default <run dir>/finetune
      init/                         the starting model with its heads (config.json + model.safetensors),
                                    written by the driver (pipeline/finetune.py)
      checkpoints/step_NNNNNNNN/    as pretraining's; model.safetensors + config.json in the layout of
                                    transformers' GPT2ForSequenceClassification / GPT2ForTokenClassification
      metrics.jsonl, results.json   training metrics; the final held-out scores

finetune.* sets the optimizer and batches (lr, warm-up, steps, examples per step and per forward pass);
a trainer Config derived from it drives the shared engine, so the DeepSpeed settings come from one place.
As in pretraining, a step's result is a function of its number (data position, dropout seed), so a
restart after a crash repeats the same losses bit for bit.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass

import torch

from pipeline.core import storage
from pipeline.core.config import Config, ConfigError
from pipeline.core.model import checkpoints, heads
from pipeline.core.storage import join
from pipeline.core.tracking import worker_metrics
from tokenization.tokenizer import encoding
from train import checkpoint, launch, tasks
from train import engine as engines
from pipeline.core.model.checkpoints import CheckpointError, TrainerState

RESULTS = "results.json"


@dataclass
class FinetuneResult:
    checkpoint: str  # the final committed checkpoint
    step: int
    loss: float | None
    metrics: dict  # held-out scores of the final checkpoint
    examples: dict  # train / eval example counts, and how many were truncated


def trainer_config(cfg: Config) -> Config:
    """The config the shared trainer code reads: run dir = the fine-tune dir (so checkpoints, metrics and
    Ray's records land there), optimizer and batch from finetune.*; the task file stands for the dataset."""
    f = cfg.finetune
    root, name = cfg.finetune_dir.rstrip("/").rsplit("/", 1)
    return cfg.model_copy(update={
        "run": cfg.run.model_copy(update={"root": root, "name": name}),
        "train": cfg.train.model_copy(update={"lr": f.lr, "warmup_steps": f.warmup_steps, "max_steps": f.max_steps,
                                              "weight_decay": f.weight_decay}),
        "batch": cfg.batch.model_copy(update={"tokens_per_step": f.batch_size * f.max_len, "seq_len": f.max_len,
                                              "micro_batch_size": f.micro_batch_size}),
        "checkpoint": cfg.checkpoint.model_copy(update={"dir": None, "interval": f.checkpoint_interval}),
        "tokenization": cfg.tokenization.model_copy(update={"output": f.task}),
    })


def run(cfg: Config, init: str, *, resume: bool = False, tracking: dict | None = None) -> FinetuneResult:
    """Fine-tune the model in `init` (a directory in the heads' Hugging Face layout) on finetune.task.
    With resume, continue from the latest committed checkpoint; without, refuse a dir that has some.
    tracking: {"uri", "run_id"} of the MLflow run that receives rank 0's metrics."""
    cfg = cfg.with_absolute_paths()
    f, tcfg = cfg.finetune, trainer_config(cfg)
    specs = tasks.head_specs(f)
    init_config = storage.read_json(join(init, "config.json"))
    heads.check_heads(specs, heads.specs_from_hf(init_config), join(init, "config.json"))
    if f.max_len > init_config["n_positions"]:
        raise ConfigError(f"finetune.max_len: ({f.max_len}) exceeds the model's context ({init_config['n_positions']})")
    existing = checkpoints.latest(tcfg.checkpoint_dir)
    if existing and not resume:
        raise CheckpointError(f"{tcfg.checkpoint_dir} already holds checkpoints (latest: {existing}); pass --resume "
                              f"to continue that fine-tune, or set finetune.output (or run.name) for a new one")
    if existing:  # the heads being trained must be the ones saved
        heads.check_heads(specs, heads.specs_from_hf(storage.read_json(join(existing, "config.json"))),
                          join(existing, "config.json"))
        print(f"finetune: resuming from {existing}", flush=True)
    encode = encoding().encode_ordinary
    train, held = tasks.load(f, "train", encode), tasks.load(f, "eval", encode)
    print(f"finetune: {len(train.examples)} training examples from {train.source}, {len(held.examples)} held out "
          f"from {held.source}; {train.truncated + held.truncated} cut at finetune.max_len={f.max_len}", flush=True)
    payload = {"config": cfg.model_dump(), "init": init, "tracking": tracking, "train": train.examples,
               "eval": held.examples, "fingerprint": tasks.fingerprint(train, held)}
    out = launch.fit(tcfg, _worker, payload, "finetune")
    examples = {"train": len(train.examples), "eval": len(held.examples), "truncated": train.truncated + held.truncated}
    storage.write_json(join(cfg.finetune_dir, RESULTS), {**out, "examples": examples, "init": init})
    return FinetuneResult(out["checkpoint"], out["step"], out["loss"], out["metrics"], examples)


def _worker(payload: dict) -> dict:
    import ray.train
    import ray.train.torch

    from train.loop import engine_and_state, step_seed

    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    checkpoints.forbid_unpickling()
    cfg = Config.model_validate(payload["config"])
    tcfg, f = trainer_config(cfg), cfg.finetune
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    engines.init_distributed(cfg.cluster.use_gpu)
    model = heads.load_hf(storage.local_copy(payload["init"]))
    model.trunk.activation_checkpointing = cfg.deepspeed.activation_checkpointing
    tracking = payload.get("tracking")
    state = TrainerState(world_size=world, zero_stage=cfg.deepspeed.zero_stage, manifest_sha256=payload["fingerprint"],
                         run_id=tracking["run_id"] if tracking else None)
    engine, state = engine_and_state(tcfg, rank, world, state, model)
    scores: dict = {}
    with worker_metrics(tcfg, rank, tracking, f.max_steps) as (metrics, publish):
        while state.step < f.max_steps:
            torch.manual_seed(step_seed(cfg.run.seed, state.step, rank))  # the token head's dropout
            lr = engines.lr_at(state.step, tcfg)
            engines.set_lr(engine, lr)
            state.loss = _step(engine, payload["train"], state.sequences, cfg, rank, world, device)
            state.step += 1
            state.sequences += f.batch_size
            metrics.log({"train/loss": state.loss, "train/lr": lr, "train/epoch": state.sequences / len(payload["train"]),
                         "train/grad_norm": _float(engine.get_global_grad_norm())}, state.step)
            if state.step % f.checkpoint_interval == 0 or state.step == f.max_steps:
                scores = evaluate(engine, payload["eval"], cfg, device)
                metrics.log(scores, state.step)
                url = checkpoint.save(engine, engine.module, tcfg.checkpoint_dir, state, cfg.checkpoint.keep_last,
                                      before_commit=publish)
                if rank == 0:
                    sys.stdout.write(f"finetune: checkpoint {url}\n")
        if not scores:  # resumed at the end: score the final checkpoint again
            scores = evaluate(engine, payload["eval"], cfg, device)
    return {"checkpoint": checkpoints.latest(tcfg.checkpoint_dir), "step": state.step, "loss": state.loss,
            "metrics": scores}


def _step(engine, examples: list, consumed: int, cfg: Config, rank: int, world: int, device) -> float:
    """One optimizer step over this rank's slice of the global batch; the global mean loss."""
    import torch.distributed as dist

    f, specs = cfg.finetune, engine.module.specs
    per_rank = f.batch_size // world
    loss_sum = torch.zeros((), device=device)
    accum = engine.gradient_accumulation_steps()
    for micro in range(accum):
        batch = tasks.batch_at(examples, consumed + rank * per_rank + micro * f.micro_batch_size,
                               f.micro_batch_size, cfg.run.seed)
        idx, labels = tasks.collate(batch, specs, f.pad_token_id)
        _, loss = engine(idx.to(device), {k: v.to(device) for k, v in labels.items()})
        engine.backward(loss)
        engine.step()
        loss_sum += loss.detach().float()
    dist.all_reduce(loss_sum)
    return loss_sum.item() / (accum * world)


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


def _float(value) -> float | None:
    return None if value is None else float(value)
