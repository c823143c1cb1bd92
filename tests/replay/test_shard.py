"""ReplayShard, samplers and removers as plain Python objects (no Ray)."""

from __future__ import annotations

import collections
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from rlhf_ray.replay.removers import EligibilityRule, FifoRemover
from rlhf_ray.replay.samplers import UniformSampler
from rlhf_ray.replay.shard import ReplayShard
from rlhf_ray.types import EXPERIENCE_COLUMNS, EXPERIENCE_SCHEMA
from tests.replay.rows import make_rows


def by_uid(table: pa.Table) -> pa.Table:
    return table.sort_by("uid")


def uids(table: pa.Table) -> list[str]:
    return table.column("uid").to_pylist()


def shard(**kwargs) -> ReplayShard:
    kwargs.setdefault("capacity", 1000)
    return ReplayShard(**kwargs)


# ---- samplers and removers


def test_uniform_sampler_distinct_and_short():
    sampler = UniformSampler(seed=3)
    got = sampler.sample(np.array([10, 20, 30, 40]), 3)
    assert len(set(got.tolist())) == 3 and set(got.tolist()) <= {10, 20, 30, 40}
    assert sorted(sampler.sample(np.array([5, 6]), 10).tolist()) == [5, 6]
    assert sampler.sample(np.array([], dtype=np.int64), 4).size == 0
    assert sorted(sampler.sample(4, 4).tolist()) == [0, 1, 2, 3]
    assert sampler.sample(4, 0).size == 0


def test_uniform_sampler_is_seeded_and_roughly_uniform():
    a = [UniformSampler(seed=7).sample(100, 5).tolist() for _ in range(2)]
    assert a[0] == a[1]
    sampler = UniformSampler(seed=0)
    counts = np.bincount(np.concatenate([sampler.sample(10, 3) for _ in range(3000)]), minlength=10)
    # Each of 10 rows is picked with probability 0.3 per draw: 900 expected of 3000.
    assert counts.min() > 800 and counts.max() < 1000


def test_fifo_remover_oldest_first_ties_by_insertion_order():
    remover = FifoRemover(capacity=3)
    assert remover.select_evictions(np.array([1.0, 2.0, 3.0])).size == 0
    assert remover.select_evictions(np.array([1.0, 2.0, 3.0, 4.0, 5.0])).tolist() == [0, 1]
    # Out of order: the two smallest times go, wherever they sit.
    assert remover.select_evictions(np.array([5.0, 1.0, 4.0, 0.5, 3.0])).tolist() == [1, 3]
    # Ties at the cut: the earlier inserted of the tied rows goes first.
    assert remover.select_evictions(np.array([2.0, 1.0, 2.0, 2.0, 9.0])).tolist() == [0, 1]
    with pytest.raises(ValueError, match="capacity"):
        FifoRemover(0)


def test_eligibility_rule_masks():
    rule = EligibilityRule(max_staleness=2, max_times_sampled=2)
    versions = np.array([0, 3, 5, 3])
    times = np.array([0, 0, 1, 2])
    assert rule.stale(versions, 5).tolist() == [True, False, False, False]
    assert rule.eligible(versions, times, 5).tolist() == [False, True, True, False]
    unlimited = EligibilityRule()
    assert unlimited.eligible(versions, times + 100, 10**6).all()


# ---- insert / sample


def test_insert_sample_roundtrip_preserves_all_columns():
    rows = make_rows(12, version=3)
    s = shard()
    assert s.insert(rows) == 12
    assert s.size() == 12
    assert by_uid(s.to_table()).equals(by_uid(rows))

    got = s.sample(12, learner_version=3)
    assert got.schema.equals(EXPERIENCE_SCHEMA)
    assert got.num_rows == 12 and len(set(uids(got))) == 12
    expected = by_uid(rows).set_column(
        EXPERIENCE_COLUMNS.index("times_sampled"),
        "times_sampled",
        pa.array([1] * 12, type=pa.int64()),
    )
    assert by_uid(got).equals(expected)


def test_sample_returns_fewer_when_fewer_eligible():
    s = shard()
    s.insert(make_rows(3))
    assert s.sample(10, learner_version=0).num_rows == 3
    assert ReplayShard(capacity=5).sample(4, learner_version=0).num_rows == 0
    assert s.sample(0, learner_version=0).num_rows == 0


def test_insert_same_rows_twice_keeps_one_copy():
    rows = make_rows(5)
    s = shard()
    assert s.insert(rows) == 5
    assert s.insert(rows) == 0  # a retry
    assert s.size() == 5
    # Duplicates within one batch too, and a partial overlap.
    assert s.insert(pa.concat_tables([make_rows(2, start=5), make_rows(2, start=5)])) == 2
    assert s.insert(make_rows(4, start=5)) == 2
    assert sorted(uids(s.to_table())) == sorted(f"p{i}/0/0" for i in range(9))
    stats = s.stats(0)
    assert stats["inserted"] == 9 and stats["duplicates"] == 5 + 2 + 2


def test_retry_does_not_reset_bookkeeping():
    rows = make_rows(2)
    s = shard()
    s.insert(rows)
    s.sample(2, learner_version=0)
    s.insert(rows)
    assert s.to_table().column("times_sampled").to_pylist() == [1, 1]


def test_fifo_eviction_keeps_newest_rows():
    s = shard(capacity=5)
    s.insert(make_rows(4, inserted_at=100.0))
    s.insert(make_rows(4, start=4, inserted_at=100.0))
    assert s.size() == 5
    assert uids(s.to_table()) == [f"p{i}/0/0" for i in range(3, 8)]
    assert s.stats(0)["evicted_fifo"] == 3
    # Rows with equal inserted_at (one experience_table call): insertion order decides.
    s = shard(capacity=3)
    s.insert(make_rows(5))
    assert uids(s.to_table()) == [f"p{i}/0/0" for i in range(2, 5)]


def test_fifo_eviction_uses_inserted_at_and_frees_the_uid():
    s = shard(capacity=3)
    s.insert(make_rows(3, inserted_at=100.0))
    # An older batch arriving late is the oldest: it is evicted first.
    s.insert(make_rows(1, start=10, inserted_at=0.0))
    assert uids(s.to_table()) == [f"p{i}/0/0" for i in range(3)]
    # A uid that was evicted is no longer stored, so it can be inserted again.
    s.insert(make_rows(1, start=10, inserted_at=500.0))
    assert uids(s.to_table()) == ["p1/0/0", "p2/0/0", "p10/0/0"]


def test_stale_rows_never_sampled_and_evicted():
    s = shard(max_staleness=2)
    s.insert(make_rows(1, version=0))
    s.insert(make_rows(3, start=1, version=3))  # staleness exactly 2 at learner version 5
    assert s.num_eligible(learner_version=5) == 3
    stats = s.stats(5)
    assert stats["stale"] == 1 and stats["staleness_max"] == 5
    for _ in range(20):
        assert "p0/0/0" not in uids(s.sample(4, learner_version=5))
    assert s.size() == 3
    assert "p0/0/0" not in uids(s.to_table())
    assert s.stats(5)["evicted_stale"] == 1


def test_max_times_sampled_caps_returns():
    s = shard(max_times_sampled=2, seed=1)
    s.insert(make_rows(5))
    seen: collections.Counter[str] = collections.Counter()
    for _ in range(30):
        got = s.sample(3, learner_version=0)
        seen.update(uids(got))
        # The returned counts are the running totals, including this sample.
        assert got.column("times_sampled").to_pylist() == [seen[u] for u in uids(got)]
    assert set(seen.values()) == {2} and len(seen) == 5
    assert s.num_eligible(0) == 0 and s.sample(3, learner_version=0).num_rows == 0
    stats = s.stats(0)
    assert stats["exhausted"] == 5 and stats["sampled"] == 10 and stats["size"] == 5


def test_times_sampled_counts():
    s = shard()
    s.insert(make_rows(4))
    s.sample(4, learner_version=0)
    s.sample(4, learner_version=0)
    s.sample(2, learner_version=0)
    counts = s.to_table().column("times_sampled").to_pylist()
    assert sum(counts) == 10 and min(counts) >= 2
    assert s.stats(0)["times_sampled_mean"] == pytest.approx(2.5)


def _drop(table: pa.Table, name: str) -> pa.Table:
    return table.drop_columns([name])


def _retype(table: pa.Table, name: str, type_: pa.DataType) -> pa.Table:
    i = table.column_names.index(name)
    return table.set_column(i, name, pc.cast(table.column(name), type_))


@pytest.mark.parametrize(
    ("make_bad", "column"),
    [
        (lambda t: _drop(t, "reward"), "reward"),
        (lambda t: _drop(t, "uid"), "uid"),
        (lambda t: _retype(t, "policy_version", pa.int32()), "policy_version"),
        (lambda t: _retype(t, "response_ids", pa.list_(pa.int64())), "response_ids"),
        (lambda t: _retype(t, "reward", pa.float64()), "reward"),
        (lambda t: t.append_column("extra", pa.array([0] * t.num_rows)), "extra"),
    ],
)
def test_bad_insert_names_column_and_keeps_rows(make_bad, column):
    s = shard()
    s.insert(make_rows(4))
    before = s.to_table()
    with pytest.raises(ValueError, match=column):
        s.insert(make_bad(make_rows(3, start=10)))
    assert s.to_table().equals(before)
    assert s.stats(0)["inserted"] == 4


def test_bad_row_values_rejected():
    rows = make_rows(2)
    i = rows.column_names.index("ref_logprobs")
    short = rows.set_column(i, "ref_logprobs", pa.array([[], []], type=pa.list_(pa.float32())))
    with pytest.raises(ValueError, match="ref_logprobs"):
        shard().insert(short)
    i = rows.column_names.index("finish_reason")
    odd = rows.set_column(i, "finish_reason", pa.array(["stop", "eos"]))
    with pytest.raises(ValueError, match="finish_reason"):
        shard().insert(odd)
    i = rows.column_names.index("uid")
    null_uid = rows.set_column(i, "uid", pa.array(["a", None], type=pa.string()))
    with pytest.raises(ValueError, match="uid"):
        shard().insert(null_uid)


def test_reordered_columns_accepted():
    rows = make_rows(3)
    s = shard()
    assert s.insert(rows.select(list(reversed(rows.column_names)))) == 3
    assert by_uid(s.to_table()).equals(by_uid(rows))


def test_update_priorities():
    s = shard(capacity=4)
    s.insert(make_rows(6))  # p0, p1 evicted
    assert s.update_priorities(["p3/0/0", "p0/0/0", "p5/0/0"], [0.5, 9.0, 7.0]) == 2
    table = s.to_table()
    priority = dict(zip(uids(table), table.column("priority").to_pylist()))
    assert priority["p3/0/0"] == 0.5 and priority["p5/0/0"] == 7.0
    assert priority["p2/0/0"] == 1.0 + 2 % 5  # untouched
    with pytest.raises(ValueError):
        s.update_priorities(["p3/0/0"], [-1.0])
    with pytest.raises(ValueError):
        s.update_priorities(["p3/0/0"], [1.0, 2.0])


def test_stats_keys_and_values():
    s = shard(capacity=10, max_staleness=1, max_times_sampled=3)
    assert s.stats(0)["size"] == 0 and s.stats(0)["staleness_mean"] == 0.0
    s.insert(make_rows(2, version=0))
    s.insert(make_rows(2, start=2, version=1))
    stats = s.stats(1)
    for key in (
        "size", "eligible", "staleness_mean", "times_sampled_mean",
        "evicted_fifo", "evicted_stale", "inserted", "duplicates",
    ):  # fmt: skip
        assert key in stats
    assert stats["size"] == 4 and stats["eligible"] == 4
    assert stats["staleness_mean"] == pytest.approx(0.5)
    assert s.stats(2)["eligible"] == 2


def test_same_seed_same_samples():
    a, b = shard(seed=11), shard(seed=11)
    for s in (a, b):
        s.insert(make_rows(50))
    for _ in range(3):
        assert uids(a.sample(7, 0)) == uids(b.sample(7, 0))


def _big_table(n: int, version: int) -> pa.Table:
    """``n`` rows fast: tile a small table and give each row its own uid."""
    base = make_rows(500, version=version)
    table = pa.concat_tables([base] * (n // 500))
    fresh = pa.array([f"big{i}/0/{version}" for i in range(table.num_rows)])
    return table.set_column(0, "uid", fresh)


def test_hundred_thousand_rows_stay_fast():
    s = shard(capacity=100_000, max_staleness=4, max_times_sampled=4)
    big = _big_table(120_000, version=0)
    start = time.perf_counter()
    for lo in range(0, big.num_rows, 1000):
        s.insert(big.slice(lo, 1000))
    assert s.size() == 100_000
    for _ in range(100):
        assert s.sample(256, learner_version=2).num_rows == 256
    s.update_priorities(uids(s.sample(1000, 2)), [2.0] * 1000)
    elapsed = time.perf_counter() - start
    assert s.stats(2)["evicted_fifo"] == 20_000
    assert elapsed < 20.0, f"too slow: {elapsed:.1f}s"
