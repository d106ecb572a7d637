"""Pretraining as the loop (train/loop.py) runs it: GPT-2 from scratch on the token shards, windows drawn in
the corpus-wide order of train/data.py, validation loss and HellaSwag during training."""

from __future__ import annotations

import torch

from eval import hellaswag, val_loss
from pipeline.core.config import Config
from tokenization.shards import manifest_hash
from tokenization.tokenizer import encoding
from train import engine as engines
from train.data import ORDER, ShardLoader
from train.loop import Recipe


class Pretraining(Recipe):
    def __init__(self, cfg: Config, swag: list | None, rank: int, world: int, device: torch.device):
        b = cfg.batch
        super().__init__(name="train", schedule=cfg.train, batch=engines.Batch.of(cfg), run_dir=cfg.run_dir,
                         checkpoint_dir=cfg.checkpoint_dir, checkpoint_interval=cfg.checkpoint.interval,
                         data_id=manifest_hash(cfg.data_dir), data_source=cfg.data_dir, data_order=ORDER,
                         tokens_per_step=b.tokens_per_step)
        self.cfg, self.swag, self.rank, self.world, self.device = cfg, swag, rank, world, device
        self.loader = ShardLoader(cfg.data_dir, b.seq_len, cfg.run.seed, cache=cfg.cluster.node_cache)
        self.val = (val_loss.val_sequences(cfg.data_dir, b.seq_len, cfg.eval.val_tokens)
                    if cfg.eval.interval else None)

    def batches(self, sequences: int, rank: int, world: int, micro: int):
        return self.loader.micro_batch(sequences, self.batch.sequences, rank, world, micro, self.batch.micro_batch_size)

    def step_metrics(self, state) -> dict:
        return {"train/epoch": self.loader.order.locate(state.sequences)[0]}

    def evaluate(self, engine, step: int, last: bool) -> dict:
        e, out = self.cfg.eval, {}
        if self.val is not None and (step % e.interval == 0 or last):
            engine.eval()
            scores = val_loss.evaluate(lambda idx, tgt: engine(idx, tgt)[1], *self.val, self.batch.micro_batch_size,
                                       self.device, self.rank, self.world)
            engine.train()
            out.update({f"val/{k}": v for k, v in scores.items()})
        if self.swag and (step % e.hellaswag_interval == 0 or last):
            scores = hellaswag.score(engine, encoding().encode_ordinary, self.swag, self.device,
                                     engine.module.config.block_size, rank=self.rank, world=self.world, collective=True)
            out.update(hellaswag.metrics(self.swag, scores))
        return out


def make_recipe(cfg: Config, payload: dict, rank: int, world: int, device: torch.device) -> Pretraining:
    """payload["hellaswag"]: an object ref to the in-training HellaSwag items (read once by the driver), or None."""
    import ray

    swag = ray.get(payload["hellaswag"]) if payload.get("hellaswag") is not None else None
    return Pretraining(cfg, swag, rank, world, device)
