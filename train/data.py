"""Training sequences from token shards, in one global order that any number of workers can resume.

A sequence is seq_len + 1 consecutive tokens (inputs and shifted targets) of one shard. Each epoch
permutes the shard order, shifts every shard's window grid by a random offset in [0, seq_len) and
permutes the windows within each shard, all from (seed, epoch) alone. The position in training is one
number, the count of sequences consumed by all workers together; global batch b is the sequences
[b * batch, (b + 1) * batch), and each rank takes its contiguous slice of it. So a resume continues at
exactly the next sequence, with any number of workers, and within an epoch every sequence is used once.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import torch

from tokenization import shards


@dataclass(frozen=True)
class EpochLayout:
    shard_order: np.ndarray  # shard indices in this epoch's order
    offsets: np.ndarray  # per shard (by index): first token of its first window
    window_orders: tuple  # per position in shard_order: permutation of that shard's windows
    starts: np.ndarray  # cumulative sequence count before each position in shard_order


class SequenceOrder:
    """Maps a global sequence number to (shard, first token), epoch after epoch."""

    def __init__(self, shard_tokens: list[int], seq_len: int, seed: int):
        self.shard_tokens, self.seq_len, self.seed = list(shard_tokens), seq_len, seed
        if not any(n - 1 >= 2 * seq_len for n in self.shard_tokens):
            raise ValueError(f"no shard holds enough tokens for sequences of {seq_len}: {self.shard_tokens}")
        self._epoch_starts = [0]  # global sequence number at which each epoch begins, grown on demand
        self._layouts: dict[int, EpochLayout] = {}  # the current epoch's, and the next one's at a boundary

    def _draw(self, epoch: int) -> tuple[np.random.Generator, np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.shard_tokens))
        offsets = rng.integers(0, self.seq_len, size=len(self.shard_tokens))
        return rng, order, offsets

    def _windows(self, shard: int, offset: int) -> int:
        return max(0, (self.shard_tokens[shard] - 1 - offset) // self.seq_len)

    def epoch_size(self, epoch: int) -> int:
        """Sequences in an epoch (the offsets can drop a window here and there, so epochs differ slightly)."""
        _, _, offsets = self._draw(epoch)
        return sum(self._windows(s, int(offsets[s])) for s in range(len(self.shard_tokens)))

    def layout(self, epoch: int) -> EpochLayout:
        if epoch not in self._layouts:
            rng, order, offsets = self._draw(epoch)
            windows = [self._windows(int(s), int(offsets[s])) for s in order]
            perms = tuple(rng.permutation(n) for n in windows)
            self._layouts = {e: v for e, v in self._layouts.items() if e == epoch - 1}
            self._layouts[epoch] = EpochLayout(order, offsets, perms, np.concatenate([[0], np.cumsum(windows)]))
        return self._layouts[epoch]

    def locate(self, sequence: int) -> tuple[int, int, int]:
        """Global sequence number -> (epoch, shard, first token)."""
        while self._epoch_starts[-1] <= sequence:
            self._epoch_starts.append(self._epoch_starts[-1] + self.epoch_size(len(self._epoch_starts) - 1))
        epoch = bisect.bisect_right(self._epoch_starts, sequence) - 1
        layout = self.layout(epoch)
        index = sequence - self._epoch_starts[epoch]
        pos = int(np.searchsorted(layout.starts, index, side="right")) - 1
        shard = int(layout.shard_order[pos])
        window = int(layout.window_orders[pos][index - layout.starts[pos]])
        return epoch, shard, int(layout.offsets[shard]) + window * self.seq_len


class ShardLoader:
    """The micro-batches of one rank, addressed by the global sequence count (no hidden state)."""

    def __init__(self, dataset_dir: str, seq_len: int, seed: int, split: str = "train"):
        self.tokens = shards.read_split(dataset_dir, split)  # memory-mapped, headers checked
        if not self.tokens:
            raise ValueError(f"{dataset_dir} has no '{split}' shards")
        self.seq_len = seq_len
        self.order = SequenceOrder([len(t) for t in self.tokens], seq_len, seed)

    def sequences(self, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Global sequences [first, first + count) as inputs and targets, each (count, seq_len) int64."""
        rows = np.empty((count, self.seq_len + 1), dtype=np.int64)
        for i in range(count):
            _, shard, start = self.order.locate(first + i)
            rows[i] = self.tokens[shard][start:start + self.seq_len + 1]
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]

    def micro_batch(self, consumed: int, global_batch: int, rank: int, world: int,
                    micro: int, micro_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Micro-step `micro` of this rank's slice of the global batch that starts after `consumed`."""
        per_rank = global_batch // world
        return self.sequences(consumed + rank * per_rank + micro * micro_batch, micro_batch)

