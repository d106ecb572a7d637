"""Validation loss: mean cross-entropy over a fixed, reported number of tokens of the val split.

The trainer calls `evaluate` every eval.interval steps, split across its ranks; `eval/run.py` calls it
on one process. Both see the same sequences: the first val_tokens // seq_len windows of the val split
(of a mixture: of each source's, in proportion to its val tokens).
This module imports only torch and the shard reader, so the trainer can use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from tokenization import shards

VAL_LOSS, VAL_PERPLEXITY = "val/loss", "val/perplexity"  # the metrics this module's scores are logged as


def val_sequences(dataset_dir: str, seq_len: int, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed validation set: the first max_tokens // seq_len windows of the val split, in order,
    as inputs and targets (count, seq_len) int64. A mixture's (data.sources) pools its sources' val splits:
    each gives its first windows, as many as its share of all their val tokens, so the loss weighs the
    sources as their held-out text does, whatever the training weights."""
    manifest, count = shards.load_manifest(dataset_dir), max_tokens // seq_len
    names = shards.source_names(manifest) or [None]
    tokens = [sum(info.tokens for info in shards.shards(manifest, "val", name)) for name in names]
    parts = [_windows(shards.read_split(dataset_dir, "val", source=name), seq_len, count * t // max(1, sum(tokens)))
             for name, t in zip(names, tokens)] if len(names) > 1 else [
        _windows(shards.read_split(dataset_dir, "val"), seq_len, count)]
    x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    if not len(x):
        raise shards.ShardError(f"{dataset_dir}: the val split ({sum(tokens)} tokens) is shorter than one sequence "
                                f"of {seq_len} (batch.seq_len); tokenize with a larger tokenization.val_fraction or "
                                f"val_tokens")
    return x, y


def _windows(split: list[np.ndarray], seq_len: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to `count` consecutive windows from the start of a split's shards, read one after the other."""
    wanted = count * seq_len + 1
    parts, have = [], 0
    for tokens in split:
        if have >= wanted:
            break
        parts.append(np.asarray(tokens[:wanted - have], dtype=np.int64))
        have += len(parts[-1])
    count = max(0, min(count, (have - 1) // seq_len))
    rows = torch.from_numpy(np.concatenate(parts)[:count * seq_len + 1]) if count else torch.zeros(1, dtype=torch.int64)
    return rows[:-1].view(count, seq_len), rows[1:].view(count, seq_len)


def evaluate(loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
             micro_batch: int, device: torch.device, rank: int = 0, world: int = 1) -> dict:
    """Mean cross-entropy on (x, y), split over `world` ranks. `loss_of(inputs, targets)` is the model's mean
    loss over the targets that are not -1: the model's own (chunked) loss, so no batch's full logits exist.

    With several ranks every one runs the same number of forward passes (ZeRO-3 gathers parameters
    collectively), padding with ignored rows, and the sums are all-reduced.
    """
    mine_x, mine_y = x[rank::world], y[rank::world]
    passes = math.ceil(math.ceil(len(x) / world) / micro_batch)
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, token count
    with torch.no_grad():
        for i in range(passes):
            bx, by = mine_x[i * micro_batch:(i + 1) * micro_batch], mine_y[i * micro_batch:(i + 1) * micro_batch]
            if len(bx) < micro_batch:
                pad = micro_batch - len(bx)
                bx = torch.cat([bx, torch.zeros(pad, x.shape[1], dtype=x.dtype)])
                by = torch.cat([by, torch.full((pad, y.shape[1]), -1, dtype=y.dtype)])
            count = int((by != -1).sum())
            loss = loss_of(bx.to(device), by.to(device))  # every rank runs it, even on padding alone
            if count:
                totals[0] += loss.double() * count
                totals[1] += count
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(totals)
    loss = (totals[0] / totals[1]).item()
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": int(totals[1].item())}
