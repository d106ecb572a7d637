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

A weighted mixture (data.sources) keeps that one number. Each source has its own SequenceOrder over
its own shards, with its own epochs, and `MixtureOrder` deals the global sequence numbers out to the
sources: every period of PERIOD consecutive numbers gives each source a fixed quota of them (its weight's
share, by largest remainders), at positions a seeded permutation per period picks. So the n-th number a
source receives is its own sequence n, read in its own order: a small source with a large weight is
up-sampled (it runs through more epochs), a large one with a small weight down-sampled, and any slice of
a batch holds each source in its proportion up to sampling noise (hypergeometric: the quotas are drawn
without replacement from the period), with no state but the position.
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
# A mixture's order: this, then each source's share of the draw (mixture_order), so changed weights are refused too.
MIXTURE_ORDER = "mixture-feistel-v1"
# Global sequences per period of a mixture: each source's quota of a period is its share of this many. A power
# of 4, so the period's permutation is a Feistel network with no cycle-walking; a share below 1 / PERIOD is refused.
PERIOD = 1 << 16
# Keys the mixture's seed streams (the periods', each source's epochs) apart from the single order's (seed, epoch).
_MIXTURE_STREAM = 0x6D69787475726531  # "mixture1"


def shares(weights: list[float]) -> list[float]:
    """Weights as fractions of their sum, to 6 significant digits: what a mixture's order is drawn from and
    recorded with (so 4:1 and 0.8:0.2 are the same mixture)."""
    total = sum(weights)
    return [float(f"{w / total:.6g}") for w in weights]


def mixture_order(names: list[str], weights: list[float]) -> str:
    """The data order of a mixture of these sources (in the dataset's order) at these weights."""
    return f"{MIXTURE_ORDER}:" + ",".join(f"{n}={s:g}" for n, s in zip(names, shares(weights)))


def check_order(recorded: str, url: str, expected: str = ORDER) -> None:
    """Refuse to resume a checkpoint trained in another order: the remaining steps would see other windows."""
    if recorded == expected:
        return
    if MIXTURE_ORDER in recorded or MIXTURE_ORDER in expected:
        raise CheckpointError(
            f"{url} was trained on the data order '{recorded}', this run's is '{expected}' (data.sources: their "
            f"names and weights); resuming would change the mixture mid-run. Resume with the weights that started "
            f"it, or start a new run (run.name)")
    raise CheckpointError(
        f"{url} was trained in data order '{recorded or 'shard-by-shard (before orders were recorded)'}', "
        f"this version draws '{expected}'; resuming would change the order mid-run. Finish that run with "
        f"the version that started it, or start a new run (run.name)")


def _substream(seed: int, index: int) -> int:
    """A seed of its own for one of a mixture's streams (0: the periods' permutations, 1 + s: source s's epochs)."""
    return int(np.random.SeedSequence([seed, _MIXTURE_STREAM, index]).generate_state(1, np.uint64)[0])


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


class _Order:
    """locate_range and locate from a subclass's locate_many."""

    def locate_many(self, sequences: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError

    def locate_range(self, first: int, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Global sequences [first, first + count) -> arrays (epoch, shard, first token)."""
        return self.locate_many(np.arange(first, first + count, dtype=np.int64))

    def locate(self, sequence: int) -> tuple[int, int, int]:
        """Global sequence number -> (epoch, shard, first token)."""
        epoch, shard, start = self.locate_many(np.array([sequence], dtype=np.int64))
        return int(epoch[0]), int(shard[0]), int(start[0])


class SequenceOrder(_Order):
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

    def epochs(self, sequences: int) -> float:
        """Epochs that the first `sequences` sequences make, counting the current one's fraction."""
        epoch = self._epoch_of(sequences)
        return epoch + (sequences - self._epoch_starts[epoch]) / self.epoch_size(epoch)

    def locate_many(self, sequences: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Global sequence numbers, in any order -> arrays (epoch, shard, first token)."""
        sequences = np.asarray(sequences, dtype=np.int64)
        epochs, shard_ids, starts = (np.empty(len(sequences), np.int64) for _ in range(3))
        if not len(sequences):
            return epochs, shard_ids, starts
        self._epoch_of(int(sequences.max()))  # every epoch start up to the last one asked for
        epochs[:] = np.searchsorted(self._epoch_starts, sequences, side="right") - 1
        for epoch in np.unique(epochs):  # ascending, as the layout cache wants (a range may cross a boundary)
            here = epochs == epoch
            index = (sequences[here] - self._epoch_starts[epoch]).astype(np.uint64)
            shard_ids[here], starts[here] = self.layout(int(epoch)).windows(index)
        return epochs, shard_ids, starts


def apportion(shares: list[float], total: int) -> np.ndarray:
    """Integer quotas summing to `total` in proportion to `shares`, by largest remainders (ties: the first)."""
    exact = np.asarray(shares, dtype=np.float64) * total / sum(shares)
    quotas = np.floor(exact).astype(np.int64)
    quotas[np.argsort(quotas - exact, kind="stable")[:total - int(quotas.sum())]] += 1
    if not (quotas > 0).all():
        raise ValueError(f"shares {list(shares)}: each must be at least 1/{total} of their sum to be drawn at all")
    return quotas


class MixtureOrder:
    """Global sequence numbers -> (source, the source's own sequence number), a bijection onto each source's.

    Period p = n // PERIOD holds exactly quota_s of source s's numbers, [p * quota_s, (p + 1) * quota_s), in
    order: the period's positions are permuted (a WindowPermutation of its own seed stream, the period as its
    epoch) onto slots cut into consecutive buckets of the quotas, a slot's bucket is its position's source, and
    the k-th position of source s in the period takes its number p * quota_s + k. So a source drawn n times has
    drawn exactly its numbers [0, n), in their order. A period's table (a source and a number per position,
    PERIOD of each) is built when first asked for; two are kept, so memory does not grow with the corpus.
    """

    def __init__(self, shares: list[float], seed: int, period: int = PERIOD):
        self.period = period
        self.quotas = apportion(shares, period)
        self.bucket_starts = np.concatenate([[0], np.cumsum(self.quotas)])
        self.seed = _substream(seed, 0)
        self._tables: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # this period's and the one before

    def _table(self, period: int) -> tuple[np.ndarray, np.ndarray]:
        """Per position of the period: its source, and its rank among the period's positions of that source."""
        if period not in self._tables:
            slots = WindowPermutation(self.period, self.seed, period)(np.arange(self.period))
            source = (np.searchsorted(self.bucket_starts, slots, side="right") - 1).astype(np.int32)
            by_source = np.argsort(source, kind="stable")  # each source's positions, in order
            rank = np.empty(self.period, np.int32)
            rank[by_source] = np.arange(self.period) - self.bucket_starts[source[by_source]]
            self._tables = {p: v for p, v in self._tables.items() if p == period - 1}
            self._tables[period] = (source, rank)
        return self._tables[period]

    def sources(self, sequences: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global sequence numbers -> arrays (source, that source's sequence number)."""
        periods, positions = np.divmod(np.asarray(sequences, dtype=np.int64), self.period)
        source, local = np.empty(len(periods), np.int64), np.empty(len(periods), np.int64)
        for period in np.unique(periods):
            here = periods == period
            table_source, table_rank = self._table(int(period))
            s = table_source[positions[here]]
            source[here], local[here] = s, period * self.quotas[s] + table_rank[positions[here]]
        return source, local

    def drawn(self, sequences: int) -> np.ndarray:
        """How many of the first `sequences` global sequences each source gives: whole periods their quotas."""
        periods, rest = divmod(sequences, self.period)
        partial = self._table(periods)[0][:rest]
        return periods * self.quotas + np.bincount(partial, minlength=len(self.quotas))


class MixedOrder(_Order):
    """A mixture's global sequence numbers -> (epoch of their source, shard, first token), like SequenceOrder's;
    the shards are numbered source after source. Each source is read in a SequenceOrder of its own seed stream."""

    def __init__(self, names: list[str], shard_tokens: list[list[int]], weights: list[float], seq_len: int,
                 seed: int):
        self.names, self.shares = names, shares(weights)
        self.mixture = MixtureOrder(self.shares, seed)
        self.sources = []
        for i, (name, tokens) in enumerate(zip(names, shard_tokens)):
            try:
                self.sources.append(SequenceOrder(tokens, seq_len, _substream(seed, 1 + i)))
            except ValueError as err:
                raise ValueError(f"source '{name}': {err}") from None
        self.first_shard = np.cumsum([0] + [len(t) for t in shard_tokens])

    def locate_many(self, sequences: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        source, local = self.mixture.sources(sequences)
        epochs, shard_ids, starts = (np.empty(len(source), np.int64) for _ in range(3))
        for s in np.unique(source):
            here = source == s
            epochs[here], shard_ids[here], starts[here] = self.sources[s].locate_many(local[here])
            shard_ids[here] += self.first_shard[s]
        return epochs, shard_ids, starts

    def epochs(self, sequences: int) -> dict[str, float]:
        """Per source, the epochs of it that the first `sequences` global sequences make."""
        drawn = self.mixture.drawn(sequences)
        return {name: order.epochs(int(n)) for name, order, n in zip(self.names, self.sources, drawn)}


class ShardLoader:
    """The micro-batches of one rank, addressed by the global sequence count (no hidden state).

    Windows are read with pread from the shard files (a remote split: this node's verified copies),
    not through a memory map: a mapped page stays in the process's RSS, so over an epoch every rank
    would show the whole split as its own memory. Read this way, a worker holds one batch.
    """

    def __init__(self, dataset_dir: str, seq_len: int, seed: int, split: str = "train", cache: str | None = None,
                 weights: list[float] | None = None, manifest: dict | None = None):
        """weights: a mixture's, one per source in the dataset's order (train/mixture.py matches them to
        data.sources by name); None for a dataset of one input. manifest: the dataset's, when already read."""
        manifest = manifest or shards.load_manifest(dataset_dir)
        names = shards.source_names(manifest)
        if len(names) != len(weights or []):
            raise ValueError(f"{dataset_dir} has sources {names}, but {len(weights or [])} weight(s) were given")
        per_source = [shards.local_split(dataset_dir, split, cache, source=n, manifest=manifest) for n in names] or [
            shards.local_split(dataset_dir, split, cache, manifest=manifest)]
        files = [f for part in per_source for f in part]
        if not files:
            raise ValueError(f"{dataset_dir} has no '{split}' shards")
        self.files = [open(path, "rb", buffering=0) for path, _ in files]
        self.seq_len = seq_len
        self.order = (MixedOrder(names, [[n for _, n in part] for part in per_source], weights, seq_len, seed)
                      if names else SequenceOrder([n for _, n in files], seq_len, seed))

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
