"""A weighted mixture's draw (train/data.py's MixtureOrder and MixedOrder): each source gets its own sequence
numbers exactly once and in full, every slice of every batch holds the sources in their proportions within a
stated statistical bound, any position is found alone as in sequence, and the recorded order names the weights."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.core.model.checkpoints import CheckpointError
from train.data import ORDER, PERIOD, MixedOrder, MixtureOrder, SequenceOrder, apportion, check_order, mixture_order


def test_quotas_are_the_largest_remainder_apportionment_and_a_vanishing_share_is_refused():
    assert list(apportion([0.8, 0.2], PERIOD)) == [52429, 13107]  # 52428.8 and 13107.2: the larger remainder wins
    assert list(apportion([1, 1, 1], 10)) == [4, 3, 3]  # equal remainders: the first
    assert list(apportion([4, 1], 10)) == [8, 2] and apportion([3.3, 2.9, 1e-3], PERIOD).sum() == PERIOD
    with pytest.raises(ValueError, match="at least 1/65536"):
        apportion([1, 1e-6], PERIOD)


@pytest.mark.parametrize("shares", [[0.8, 0.2], [0.5, 0.3, 0.2], [0.97, 0.02, 0.01]])
def test_each_source_receives_its_own_numbers_once_each_and_whole_periods_exactly_its_quota(shares):
    order = MixtureOrder(shares, seed=3)
    n = 2 * PERIOD + PERIOD // 3  # two whole periods and part of a third
    source, local = order.sources(np.arange(n))
    drawn = order.drawn(n)
    for s in range(len(shares)):
        # a bijection onto [0, drawn): source s has read exactly its first `drawn` sequences, none twice
        assert np.array_equal(np.sort(local[source == s]), np.arange(drawn[s]))
        assert (source[:2 * PERIOD] == s).sum() == 2 * order.quotas[s]  # whole periods: exactly the quota
    assert np.array_equal(drawn, np.bincount(source, minlength=len(shares)))
    for k in (0, 5, 700, PERIOD - 1, PERIOD, PERIOD + 3, 100, n):  # forward and back: its memory never leaks in
        assert np.array_equal(order.drawn(k), np.bincount(source[:k], minlength=len(shares))), k
    # the period's own order is no block of one source then the other: the sources interleave within it
    assert abs(np.corrcoef(source[:PERIOD], np.arange(PERIOD))[0, 1]) < 5 / math.sqrt(PERIOD)


def test_any_position_is_found_alone_as_in_sequence_and_the_seed_fixes_the_draw():
    n = 3 * PERIOD
    source, local = MixtureOrder([0.7, 0.3], seed=11).sources(np.arange(n))
    picks = np.random.default_rng(0).integers(0, n, 500)
    alone = MixtureOrder([0.7, 0.3], seed=11)  # a resuming rank: a new process, asking for scattered positions
    got = [alone.sources(np.array([p])) for p in picks[:50]]
    assert [(int(s[0]), int(v[0])) for s, v in got] == list(zip(source[picks[:50]], local[picks[:50]]))
    assert all(np.array_equal(a, b) for a, b in zip(alone.sources(picks), (source[picks], local[picks])))
    assert not np.array_equal(MixtureOrder([0.7, 0.3], seed=12).sources(np.arange(1000))[0], source[:1000])


@pytest.mark.parametrize("batch,world", [(8, 1), (64, 2), (512, 8), (96, 3)])
def test_every_ranks_slice_of_every_batch_holds_each_source_in_its_share(batch, world):
    """The bound: a rank's slice of one global batch (m sequences) is a sample without replacement of one or two
    periods, so a source's count in it is hypergeometric, with a variance at most the binomial m q (1 - q). Each
    count, of every slice of the first 200 batches and of each rank's 200 slices together, lies within 5 of those
    standard deviations of m q (a miss has a chance of 1 in 1.7 million per count)."""
    order, steps, per_rank = MixtureOrder([0.8, 0.2], seed=5), 200, batch // world
    q = order.quotas / PERIOD
    for rank in range(world):
        firsts = np.arange(steps) * batch + rank * per_rank
        source, _ = order.sources((firsts[:, None] + np.arange(per_rank)).ravel())
        counts = (source.reshape(steps, per_rank)[:, :, None] == np.arange(2)).sum(axis=1)  # (step, source)
        sd = np.sqrt(per_rank * q * (1 - q))
        assert (np.abs(counts - per_rank * q) <= 5 * sd).all(), (rank, counts.min(0), counts.max(0))
        total, sd_total = counts.sum(0), np.sqrt(steps * per_rank * q * (1 - q))
        assert (np.abs(total - steps * per_rank * q) <= 5 * sd_total).all(), (rank, total)
        assert (total > 0).all()


def test_a_small_up_sampled_source_runs_through_whole_epochs_and_a_large_one_through_part_of_one():
    seq_len = 64
    big, small = [50_000, 30_000, 70_000], [3_000, 2_000]  # ~2300 windows an epoch against ~75
    mixed = MixedOrder(["web", "books"], [big, small], [0.8, 0.2], seq_len, seed=7)
    n = 5000  # ~1000 of books: ~13 of its epochs; ~4000 of web: under 2 of its 2300-window epochs
    epochs, shard_ids, starts = mixed.locate_range(0, n)
    source, local = mixed.mixture.sources(np.arange(n))
    assert set(shard_ids[source == 0]) <= {0, 1, 2} and set(shard_ids[source == 1]) == {3, 4}  # numbered web, then books
    books = mixed.sources[1]
    assert mixed.epochs(n)["books"] == pytest.approx(books.epochs(int((source == 1).sum())))
    assert mixed.epochs(n)["books"] > 10 and mixed.epochs(n)["web"] < 2
    for epoch in range(10):  # each whole epoch of books: every window of it exactly once
        mine = (source == 1) & (epochs == epoch)
        windows = list(zip(shard_ids[mine] - 3, starts[mine]))
        assert len(windows) == len(set(windows)) == books.epoch_size(epoch)
        assert set(windows) == {tuple(map(int, books.locate(int(i))[1:])) for i in
                                range(books._epoch_starts[epoch], books._epoch_starts[epoch + 1])}
    assert np.array_equal(epochs[source == 1], books.locate_many(local[source == 1])[0])
    # its own epochs, with its own seed: not the single-input order of the same shards at the run's seed
    alone = SequenceOrder(small, seq_len, seed=7)
    assert [alone.locate(i)[2] for i in range(20)] != [books.locate(i)[2] for i in range(20)]
    with pytest.raises(ValueError, match="source 'books': no shard holds enough tokens"):
        MixedOrder(["web", "books"], [big, [100]], [0.8, 0.2], seq_len, seed=7)


def test_the_recorded_order_names_the_normalized_weights_and_a_changed_mixture_is_refused():
    order = mixture_order(["web", "books"], [4, 1])
    assert order == "mixture-feistel-v1:web=0.8,books=0.2" == mixture_order(["web", "books"], [0.8, 0.2])
    check_order(order, "ckpt", order)
    with pytest.raises(CheckpointError, match=r"'mixture-feistel-v1:web=0.8,books=0.2', this run's is "
                                              r"'mixture-feistel-v1:web=0.5,books=0.5' \(data.sources"):
        check_order(order, "ckpt", mixture_order(["web", "books"], [1, 1]))
    with pytest.raises(CheckpointError, match="data.sources"):
        check_order(ORDER, "ckpt", order)
