"""Training sequences from token shards, in one global order that any number of workers can resume.

A sequence is seq_len + 1 consecutive tokens (inputs and shifted targets) of one shard. Each epoch
shifts every shard's window grid by a random offset in [0, seq_len), numbers the windows of all shards
one after the other, and visits them in the order of a seeded bijection of that numbering (a Feistel
network, `WindowPermutation`), all from (seed, epoch) alone. So any run of consecutive steps draws
from across the whole corpus in proportion to the shards' sizes, even when the corpus arrived sorted
(by source, topic, date), and the order costs O(number of shards) memory, not a list of windows.

The position in training is one number, the count of sequences consumed by all workers together;
global batch b is the sequences [b * batch, (b + 1) * batch), and each rank takes its contiguous slice
of it. So a resume continues at exactly the next sequence, with any number of workers, and within an
epoch every sequence is used once.
"""

from __future__ import annotations

import bisect
import os

import numpy as np
import torch

from pipeline.core.model.checkpoints import CheckpointError
from tokenization import shards

# Recorded in every checkpoint (TrainerState.data_order): a run resumes only in the order it started with.
ORDER = "global-feistel-v1"


def check_order(recorded: str, url: str, expected: str = ORDER) -> None:
    """Refuse to resume a checkpoint trained in another order: the remaining steps would see other windows."""
    if recorded != expected:
        raise CheckpointError(
            f"{url} was trained in data order '{recorded or 'shard-by-shard (before orders were recorded)'}', "
            f"this version draws '{expected}'; resuming would change the order mid-run. Finish that run with "
            f"the version that started it, or start a new run (run.name)")


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a 64-bit bijection whose every output bit depends on every input bit."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class WindowPermutation:
    """A seeded permutation of [0, n) in O(1) memory, evaluated on arrays of indices.

    A balanced Feistel network over the smallest 2^(2h) >= n is a bijection of [0, 2^(2h)) whatever
    its round function; cycle-walking (apply it again while the result is >= n) restricts it to a
    bijection of [0, n). 2^(2h) < 4n, so an index needs fewer than 4 applications on average.
    """

    ROUNDS = 6  # Luby-Rackoff: 4 rounds already look random; 2 more cost little

    def __init__(self, n: int, seed: int, epoch: int):
        if n < 1:
            raise ValueError(f"a permutation needs at least one element, got {n}")
        self.n = n
        self.half = max(1, ((n - 1).bit_length() + 1) // 2)
        self.mask = np.uint64((1 << self.half) - 1)
        self.keys = np.random.SeedSequence([seed, epoch]).generate_state(self.ROUNDS, dtype=np.uint64)

    def _network(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half)
        left, right = x >> h, x & self.mask
        with np.errstate(over="ignore"):  # the round function multiplies modulo 2^64 on purpose
            for key in self.keys:
                left, right = right, left ^ (_mix(right ^ key) & self.mask)
        return (left << h) | right

    def __call__(self, index: np.ndarray) -> np.ndarray:
        index = np.asarray(index, dtype=np.uint64)
        if index.size and int(index.max()) >= self.n:
            raise IndexError(f"index {int(index.max())} outside the permutation of {self.n}")
        out = self._network(index)
        outside = out >= self.n
        while outside.any():
            out[outside] = self._network(out[outside])
            outside = out >= self.n
        return out.astype(np.int64)


class EpochLayout:
    """One epoch's windows: per-shard grid offsets, their cumulative counts, and the permutation."""

    def __init__(self, shard_tokens: np.ndarray, seq_len: int, seed: int, epoch: int):
        rng = np.random.default_rng([seed, epoch])
        self.offsets = rng.integers(0, seq_len, size=len(shard_tokens))
        windows = np.maximum(0, (shard_tokens - 1 - self.offsets) // seq_len)
        self.starts = np.concatenate([[0], np.cumsum(windows)])  # first window number of each shard
        self.size = int(self.starts[-1])
        self.permutation = WindowPermutation(self.size, seed, epoch)
        self.seq_len = seq_len

    def windows(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions in this epoch's order -> (shard, first token) of the windows there."""
        number = self.permutation(index)
        shard = np.searchsorted(self.starts, number, side="right") - 1
        return shard, self.offsets[shard] + (number - self.starts[shard]) * self.seq_len


class SequenceOrder:
    """Maps global sequence numbers to (epoch, shard, first token), epoch after epoch."""

    def __init__(self, shard_tokens: list[int], seq_len: int, seed: int):
        self.shard_tokens, self.seq_len, self.seed = np.asarray(shard_tokens, dtype=np.int64), seq_len, seed
        if not (self.shard_tokens - 1 >= 2 * seq_len).any():
            raise ValueError(f"no shard holds enough tokens for sequences of {seq_len}: {list(shard_tokens)}")
        self._epoch_starts = [0]  # global sequence number at which each epoch begins, grown on demand
        self._layouts: dict[int, EpochLayout] = {}  # the current epoch's, and the next one's at a boundary

    def layout(self, epoch: int) -> EpochLayout:
        if epoch not in self._layouts:
            self._layouts = {e: v for e, v in self._layouts.items() if e == epoch - 1}
            self._layouts[epoch] = EpochLayout(self.shard_tokens, self.seq_len, self.seed, epoch)
        return self._layouts[epoch]

    def epoch_size(self, epoch: int) -> int:
        """Sequences in an epoch (the offsets can drop a window here and there, so epochs differ slightly)."""
        return self.layout(epoch).size

    def _epoch_of(self, sequence: int) -> int:
        while self._epoch_starts[-1] <= sequence:
            self._epoch_starts.append(self._epoch_starts[-1] + self.epoch_size(len(self._epoch_starts) - 1))
        return bisect.bisect_right(self._epoch_starts, sequence) - 1

    def locate_range(self, first: int, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Global sequences [first, first + count) -> arrays (epoch, shard, first token)."""
        epochs, shard_ids, starts = [], [], []
        sequence, end = first, first + count
        while sequence < end:  # a range may cross an epoch boundary
            epoch = self._epoch_of(sequence)
            stop = min(end, self._epoch_starts[epoch + 1])
            base = self._epoch_starts[epoch]
            s, t = self.layout(epoch).windows(np.arange(sequence - base, stop - base, dtype=np.uint64))
            epochs.append(np.full(stop - sequence, epoch))
            shard_ids.append(s)
            starts.append(t)
            sequence = stop
        if not epochs:
            return (np.empty(0, np.int64),) * 3
        return np.concatenate(epochs), np.concatenate(shard_ids), np.concatenate(starts)

    def locate(self, sequence: int) -> tuple[int, int, int]:
        """Global sequence number -> (epoch, shard, first token)."""
        epoch, shard, start = self.locate_range(sequence, 1)
        return int(epoch[0]), int(shard[0]), int(start[0])


class ShardLoader:
    """The micro-batches of one rank, addressed by the global sequence count (no hidden state).

    Windows are read with pread from the shard files (a remote split: this node's verified copies),
    not through a memory map: a mapped page stays in the process's RSS, so over an epoch every rank
    would show the whole split as its own memory. Read this way, a worker holds one batch.
    """

    def __init__(self, dataset_dir: str, seq_len: int, seed: int, split: str = "train", cache: str | None = None):
        files = shards.local_split(dataset_dir, split, cache)
        if not files:
            raise ValueError(f"{dataset_dir} has no '{split}' shards")
        self.files = [open(path, "rb", buffering=0) for path, _ in files]
        self.seq_len = seq_len
        self.order = SequenceOrder([n for _, n in files], seq_len, seed)

    def sequences(self, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Global sequences [first, first + count) as inputs and targets, each (count, seq_len) int64."""
        _, shard_ids, starts = self.order.locate_range(first, count)
        size = shards.TOKEN_DTYPE.itemsize
        rows = np.empty((count, self.seq_len + 1), dtype=np.int64)
        for i in np.lexsort((starts, shard_ids)):  # file by file, front to back: the page cache's order
            fd = self.files[shard_ids[i]].fileno()
            raw = os.pread(fd, (self.seq_len + 1) * size, shards.HEADER_BYTES + int(starts[i]) * size)
            rows[i] = np.frombuffer(raw, dtype=shards.TOKEN_DTYPE)
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]

    def micro_batch(self, consumed: int, global_batch: int, rank: int, world: int,
                    micro: int, micro_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Micro-step `micro` of this rank's slice of the global batch that starts after `consumed`."""
        per_rank = global_batch // world
        return self.sequences(consumed + rank * per_rank + micro * micro_batch, micro_batch)
