"""Pretraining as the loop (train/loop.py) runs it: GPT-2 from scratch on the token shards, windows drawn in
the corpus-wide order of train/data.py, validation loss and HellaSwag during training."""

from __future__ import annotations

import torch

from eval import hellaswag, suite, val_loss
from eval.references import hellaswag_label
from pipeline.core.config import Config
from tokenization.shards import load_manifest, manifest_hash
from tokenization.tokenizer import encoding
from train import engine as engines
from train.data import MixedOrder, ShardLoader
from train.loop import Recipe
from train.mixture import Mixture
from train.review import Review


class Pretraining(Recipe):
    def __init__(self, cfg: Config, swag: list | None, rank: int, world: int, device: torch.device,
                 tracking: dict | None = None):
        b, manifest = cfg.batch, load_manifest(cfg.data_dir)
        mix = Mixture(cfg, manifest, cfg.data_dir)
        super().__init__(name="train", schedule=cfg.train, batch=engines.Batch.of(cfg), run_dir=cfg.run_dir,
                         checkpoint_dir=cfg.checkpoint_dir, checkpoint_interval=cfg.checkpoint.interval,
                         data_id=manifest_hash(cfg.data_dir), data_source=cfg.data_dir,
                         data_order=mix.data_order, tokens_per_step=b.tokens_per_step)
        self.cfg, self.swag, self.rank, self.world, self.device = cfg, swag, rank, world, device
        self.loader = ShardLoader(cfg.data_dir, b.seq_len, cfg.run.seed, cache=cfg.cluster.node_cache,
                                  weights=mix.weights, manifest=manifest)
        self.val = (val_loss.val_sequences(cfg.data_dir, b.seq_len, cfg.eval.val_tokens)
                    if cfg.eval.interval else None)
        self.samples: list[dict] = []  # generated at the last evaluation
        # on rank 0: the figure, the samples table, the constants (tracking: {"uri", "run_id"} or None)
        self.review = Review(cfg, tracking, b.tokens_per_step, {
            "val.tokens": self.val[0].numel() if self.val is not None else None,
            "hellaswag.items": len(swag) if swag else None,
            "hellaswag.data": hellaswag_label(cfg.eval.hellaswag) if swag else None,
            **{k: v for row in mix.plan() for k, v in row.params().items()},
        }) if rank == 0 else None

    def batches(self, sequences: int, rank: int, world: int, micro: int):
        return self.loader.micro_batch(sequences, self.batch.sequences, rank, world, micro, self.batch.micro_batch_size)

    def evaluate(self, engine, step: int, last: bool) -> dict:
        e, out = self.cfg.eval, {}
        if self.val is not None and (step % e.interval == 0 or last):
            engine.eval()
            scores = val_loss.evaluate(lambda idx, tgt: engine(idx, tgt)[1], *self.val, self.batch.micro_batch_size,
                                       self.device, self.rank, self.world)
            out.update({val_loss.VAL_LOSS: scores["loss"], val_loss.VAL_PERPLEXITY: scores["perplexity"]})
            # every rank generates (under ZeRO-3 each forward pass is collective); rank 0 logs the text
            self.samples = suite.samples(engine.module, self.cfg) if e.prompts and e.max_new_tokens else []
            engine.train()
        if self.swag and (step % e.hellaswag_interval == 0 or last):
            scores = hellaswag.score(engine, encoding().encode_ordinary, self.swag, self.device,
                                     engine.module.config.block_size, rank=self.rank, world=self.world, collective=True)
            out.update(hellaswag.metrics(self.swag, scores))
        return out

    def step_metrics(self, state) -> dict:
        """A mixture's draw so far, per source, on rank 0 (which alone logs): the epochs of it trained on."""
        if self.rank != 0 or not isinstance(self.loader.order, MixedOrder):
            return {}
        return {f"train/epochs/{name}": e for name, e in self.loader.order.epochs(state.sequences).items()}

    def evaluated(self, step: int, scores: dict) -> None:
        if self.review is not None:
            order, position = self.loader.order, step * self.batch.sequences
            self.review.update(step, self.samples, {f"train.epoch.{name}": int(e) for name, e in
                                                    order.epochs(position).items()}
                               if isinstance(order, MixedOrder) else {"train.epoch": order.locate(position)[0]})
        self.samples = []


def make_recipe(cfg: Config, payload: dict, rank: int, world: int, device: torch.device) -> Pretraining:
    """payload["hellaswag"]: an object ref to the in-training HellaSwag items (read once by the driver), or None."""
    import ray

    swag = ray.get(payload["hellaswag"]) if payload.get("hellaswag") is not None else None
    return Pretraining(cfg, swag, rank, world, device, payload.get("tracking"))
