"""Properties of the global sample order (bigtrain/data/order.py)."""
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bigtrain.config import BatchConfig, ConfigError
from bigtrain.data.order import SampleOrder, _encrypt, batch_size_at, permutation, permute

SMALL_N = [1, 2, 3, 4, 5, 7, 8, 16, 17, 97, 256, 1000, 1009, 1024, 4099]
seeds = st.integers(min_value=-(2**40), max_value=2**40)
ledgers = st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 200)), max_size=6).map(
    lambda rs: [(s, s + w) for s, w in rs])


@pytest.mark.parametrize("n", SMALL_N)
def test_permutation_is_a_bijection(n):
    for seed, epoch in [(0, 0), (1234, 0), (1234, 7), (-5, 2**40)]:
        perm = permutation(n, seed, epoch)
        assert perm.dtype == np.int64
        assert np.array_equal(np.sort(perm), np.arange(n))


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 5000), seed=seeds, epoch=st.integers(0, 10**6))
def test_permutation_is_a_bijection_for_any_n(n, seed, epoch):
    assert np.array_equal(np.sort(permutation(n, seed, epoch)), np.arange(n))


def test_permutation_is_pinned():
    """The order is part of every run's identity: it must never change between versions."""
    assert permutation(10, 1234, 0).tolist() == [7, 1, 8, 2, 9, 4, 5, 6, 3, 0]
    assert permute(10**12, 1, 3, np.array([0, 1, 10**12 - 1])).tolist() == [436409101208, 190706900341, 191918486761]


@settings(max_examples=50, deadline=None)
@given(n=st.one_of(st.integers(1, 5000), st.integers(1, 2**62)), seed=seeds, epoch=st.integers(0, 10**6),
       size=st.integers(33, 300), data=st.data())
def test_small_and_large_index_arrays_agree(n, seed, epoch, size, data):
    """Up to 32 indices are walked on Python ints, more in numpy: one permutation either way."""
    idx = np.array(data.draw(st.lists(st.integers(0, n - 1), min_size=size, max_size=size)), dtype=np.int64)
    whole = _encrypt(n, seed, epoch, idx)  # numpy (permute itself may look consecutive indices up in a block)
    pieces = [_encrypt(n, seed, epoch, idx[i:i + 7]) for i in range(0, size, 7)]  # Python ints
    assert whole.dtype == np.int64 and np.array_equal(whole, np.concatenate(pieces))


@settings(max_examples=50, deadline=None)
@given(n=st.one_of(st.integers(1, 20_000), st.integers(1, 2**62)), seed=seeds, epoch=st.integers(0, 10**6),
       size=st.integers(4, 600), data=st.data())
def test_consecutive_indices_from_cached_blocks_agree(n, seed, epoch, size, data):
    """A step's consecutive indices are looked up in cached 4096-index blocks (also across a block
    boundary and at the epoch's end): the same numbers as each index computed on its own."""
    size = min(size, n)
    start = data.draw(st.sampled_from(sorted({0, max(0, n - size), max(0, min(n - size, 4096 - size // 2))})))
    idx = np.arange(start, start + size, dtype=np.int64)
    looked_up = permute(n, seed, epoch, idx)
    assert np.array_equal(looked_up, [permute(n, seed, epoch, idx[i:i + 1])[0] for i in range(size)])
    if size % 2 == 0:  # the index's shape is kept
        assert np.array_equal(permute(n, seed, epoch, idx.reshape(2, -1)), looked_up.reshape(2, -1))


def test_permute_huge_n_is_cheap():
    n = 2**61 + 12345
    idx = np.array([0, 1, n - 1, n // 2])
    out = permute(n, 7, 0, idx)
    assert ((out >= 0) & (out < n)).all() and len(set(out.tolist())) == 4


@settings(max_examples=50, deadline=None)
@given(n=st.integers(10, 3000), seed=seeds, epoch=st.integers(0, 1000))
def test_epochs_differ(n, seed, epoch):
    assert not np.array_equal(permutation(n, seed, epoch), permutation(n, seed, epoch + 1))
    assert not np.array_equal(permutation(n, seed, epoch), permutation(n, seed + 1, epoch))


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 500), seed=seeds, batch=st.integers(1, 64), start=st.integers(0, 2000))
def test_stream_matches_epoch_permutations(n, seed, batch, start):
    order = SampleOrder(n, seed)
    pos, new = order.next_batch(start, batch)
    assert pos.tolist() == list(range(start, start + batch)) and new == start + batch
    expected = [permutation(n, seed, p // n)[p % n] for p in pos.tolist()]
    assert order.sample_at(pos).tolist() == expected


@settings(max_examples=50, deadline=None)
@given(n=st.integers(8, 2000), seed=seeds, batch=st.sampled_from([1, 3, 8, 32, 64]))
def test_no_repeats_within_an_epoch(n, seed, batch):
    order = SampleOrder(n, seed)
    seen, pos = [], 0
    while pos < n:
        positions, pos = order.next_batch(pos, batch)
        seen += order.sample_at(positions[positions < n]).tolist()
    assert sorted(seen) == list(range(n))


@settings(max_examples=50, deadline=None)
@given(seed=seeds, world=st.sampled_from([1, 2, 4, 8]), per_rank=st.integers(1, 8), pos=st.integers(0, 10**6))
def test_union_over_ranks_is_the_global_batch(seed, world, per_rank, pos):
    order = SampleOrder(997, seed)
    positions, _ = order.next_batch(pos, world * per_rank)
    batch = order.sample_at(positions)
    shares = [SampleOrder.rank_columns(batch, r, world) for r in range(world)]
    assert all(len(s) == per_rank for s in shares)
    assert sorted(np.concatenate(shares).tolist()) == sorted(batch.tolist())


def test_rank_columns_needs_a_divisor():
    with pytest.raises(ValueError):
        SampleOrder.rank_columns(np.arange(6), 0, 4)
    with pytest.raises(ValueError):
        SampleOrder.rank_columns(np.arange(8), 4, 4)


@settings(max_examples=50, deadline=None)
@given(seed=seeds, world=st.sampled_from([1, 2, 4, 8]), micro=st.sampled_from([1, 2, 4]), pos=st.integers(0, 10**5))
def test_batch_is_independent_of_micro_and_world(seed, world, micro, pos):
    order, size = SampleOrder(333, seed, skip=[(pos + 5, pos + 9)]), 64
    positions, _ = order.next_batch(pos, size)
    batch = order.sample_at(positions)
    micro_batches = [share[i:i + micro] for r in range(world)
                     for share in [SampleOrder.rank_columns(batch, r, world)]
                     for i in range(0, len(share), micro)]
    assert all(len(m) == micro for m in micro_batches)
    assert sorted(np.concatenate(micro_batches).tolist()) == sorted(batch.tolist())


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 700), seed=seeds, skips=ledgers, batch=st.integers(1, 40),
       stop_after=st.integers(0, 20), total=st.integers(1, 30))
def test_resume_gives_the_same_future(n, seed, skips, batch, stop_after, total):
    straight = SampleOrder(n, seed, skips)
    pos, expected = 0, []
    for _ in range(total):
        positions, pos = straight.next_batch(pos, batch)
        expected.append(straight.sample_at(positions).tolist())
    first = SampleOrder(n, seed, skips)
    pos, got = 0, []
    for _ in range(min(stop_after, total)):
        positions, pos = first.next_batch(pos, batch)
        got.append(first.sample_at(positions).tolist())
    resumed = SampleOrder(n, seed, first.skips)  # what a checkpoint restores: (N, seed, ledger, position)
    for _ in range(total - len(got)):
        positions, pos = resumed.next_batch(pos, batch)
        got.append(resumed.sample_at(positions).tolist())
    assert got == expected


@settings(max_examples=50, deadline=None)
@given(skips=ledgers, start=st.integers(0, 3000), size=st.integers(0, 500))
def test_skips_are_honoured(skips, start, size):
    order = SampleOrder(50, 0, skips)
    positions, new = order.next_batch(start, size)
    skipped = {p for s, e in skips for p in range(s, e)}
    expected = [p for p in range(start, start + size + 200 * 6 + 1) if p not in skipped][:size]
    assert positions.tolist() == expected
    assert new == (expected[-1] + 1 if expected else start)


@settings(max_examples=50, deadline=None)
@given(skips=ledgers)
def test_ledger_merges_into_disjoint_sorted_ranges(skips):
    order = SampleOrder(10, 0, skips)
    ranges = order.skips
    assert all(s < e for s, e in ranges)
    assert all(e1 < s2 for (_, e1), (s2, _) in zip(ranges, ranges[1:]))  # touching ranges merge too
    covered = {p for s, e in ranges for p in range(s, e)}
    assert covered == {p for s, e in skips for p in range(s, e)}


def test_huge_skip_ranges_are_fast():
    order = SampleOrder(1000, 3)
    for k in range(1000):
        order.add_skip(10 + k * 10**12, 10 + k * 10**12 + 10**12 - 1)  # leaves one position per 10**12
    t = time.perf_counter()
    positions, new = order.next_batch(0, 500)
    samples = order.sample_at(positions)
    elapsed = time.perf_counter() - t
    assert positions[:10].tolist() == list(range(10))
    assert positions[10] == 10 + 10**12 - 1 and len(samples) == 500
    assert new == positions[-1] + 1 and elapsed < 1.0


def test_empty_data_is_a_config_error():
    with pytest.raises(ConfigError):
        SampleOrder(0, 1)


def test_rampup_closed_form():
    cfg = BatchConfig(global_size=64, micro_size=8, rampup={"start": 16, "increment": 16, "samples": 300})
    assert [batch_size_at(s, cfg) for s in (0, 99, 100, 199, 200, 299, 300, 10**9)] == \
        [16, 16, 32, 32, 48, 48, 64, 64]
    assert batch_size_at(123, BatchConfig(global_size=64, micro_size=8)) == 64
    flat = BatchConfig(global_size=64, micro_size=8, rampup={"start": 64, "increment": 8, "samples": 10})
    assert batch_size_at(0, flat) == 64

