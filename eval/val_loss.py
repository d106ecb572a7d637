"""Validation loss: mean cross-entropy over a fixed, reported number of tokens of the val split.

The trainer calls `evaluate` every eval.interval steps, split across its ranks; `eval/run.py` calls it
on one process. Both see the same sequences: the first val_tokens // seq_len windows of the val split.
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
    as inputs and targets (count, seq_len) int64."""
    wanted = max_tokens // seq_len * seq_len + 1
    parts, have = [], 0
    for tokens in shards.read_split(dataset_dir, "val"):
        if have >= wanted:
            break
        parts.append(np.asarray(tokens[:wanted - have], dtype=np.int64))
        have += len(parts[-1])
    count = min(max_tokens // seq_len, (have - 1) // seq_len)
    if count <= 0:
        raise shards.ShardError(f"{dataset_dir}: the val split ({have} tokens) is shorter than one sequence of {seq_len} "
                                f"(batch.seq_len); tokenize with a larger tokenization.val_fraction or val_tokens")
    rows = torch.from_numpy(np.concatenate(parts)[:count * seq_len + 1])
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
