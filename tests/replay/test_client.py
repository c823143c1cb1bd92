"""ReplayClient against two real ReplayShard actors on the local Ray test cluster."""

from __future__ import annotations

import collections
import time

import pyarrow as pa
import pytest

from rlhf_ray.replay.client import ReplayClient, stable_shard
from rlhf_ray.replay.shard import make_shard_actors
from tests.replay.rows import make_rows


def uids(table: pa.Table) -> list[str]:
    return table.column("uid").to_pylist()


@pytest.fixture
def make_shards(ray_cluster):
    """Starts two shard actors with the given limits; kills them after the test."""
    started = []

    def start(**limits):
        options = {"capacity": 1000, "max_staleness": None, "max_times_sampled": None, "seed": 0}
        options.update(limits)
        handles = make_shard_actors(2, **options)
        started.extend(handles)
        return handles

    yield start
    for handle in started:
        ray_cluster.kill(handle)


def test_insert_export_sample_roundtrip(make_shards):
    client = ReplayClient(make_shards(), seed=0)
    rows = make_rows(40, version=2)
    assert client.insert(rows) == 40
    assert client.export().sort_by("uid").equals(rows.sort_by("uid"))
    assert client.stats(2)["size"] == 40

    got = client.sample(40, learner_version=2)
    assert got.num_rows == 40
    assert got.column("times_sampled").to_pylist() == [1] * 40
    assert got.drop_columns(["times_sampled"]).sort_by("uid").equals(
        rows.drop_columns(["times_sampled"]).sort_by("uid")
    )


def test_rows_spread_over_both_shards(make_shards, ray_cluster):
    handles = make_shards()
    client = ReplayClient(handles)
    client.insert(make_rows(100))
    tables = ray_cluster.get([h.to_table.remote() for h in handles])
    assert sum(t.num_rows for t in tables) == 100 and min(t.num_rows for t in tables) > 20
    for shard_index, table in enumerate(tables):
        assert {client.shard_for(u) for u in uids(table)} == {shard_index}


def test_duplicate_insert_keeps_one_row_from_two_clients(make_shards):
    handles = make_shards()
    first, second = ReplayClient(handles), ReplayClient(list(handles))
    rows = make_rows(30)
    assert first.insert(rows) == 30
    assert second.insert(rows) == 0  # a retry through another client
    assert first.insert(rows.slice(0, 1)) == 0
    exported = second.export()
    assert exported.num_rows == 30 and len(set(uids(exported))) == 30
    assert first.stats(0)["duplicates"] == 31
    for uid in uids(rows):
        assert first.shard_for(uid) == second.shard_for(uid)


def test_shard_for_is_stable_across_processes(ray_cluster):
    uid_list = [f"p{i}/0/3" for i in range(50)]

    @ray_cluster.remote(num_cpus=0)
    def remote_shards(uids_: list[str]) -> list[int]:
        return [stable_shard(u, 2) for u in uids_]

    here = [stable_shard(u, 2) for u in uid_list]
    assert ray_cluster.get(remote_shards.remote(uid_list)) == here
    assert set(here) == {0, 1}


def test_sample_exactly_n_distinct_rows(make_shards):
    client = ReplayClient(make_shards(), seed=1)
    client.insert(make_rows(60))
    seen_shards = set()
    for _ in range(10):
        got = client.sample(16, learner_version=0)
        assert got.num_rows == 16 and len(set(uids(got))) == 16
        seen_shards |= {client.shard_for(u) for u in uids(got)}
    assert seen_shards == {0, 1}
    assert client.sample(500, learner_version=0).num_rows == 60
    assert client.stats(0)["sampled"] == 10 * 16 + 60


def test_sample_respects_limits_across_shards(make_shards):
    client = ReplayClient(make_shards(max_staleness=2, max_times_sampled=2), seed=2)
    client.insert(make_rows(5, version=0))
    client.insert(make_rows(10, start=5, version=4))
    assert client.num_eligible(learner_version=5) == 10
    counts: collections.Counter[str] = collections.Counter()
    for _ in range(20):
        got = client.sample(3, learner_version=5)
        assert len(set(uids(got))) == got.num_rows
        counts.update(uids(got))
    assert max(counts.values()) == 2 and sum(counts.values()) == 20
    assert not any(u.endswith("/0") for u in counts)
    stats = client.stats(5)
    assert stats["evicted_stale"] == 5 and stats["size"] == 10 and stats["eligible"] == 0
    assert stats["times_sampled_mean"] == pytest.approx(2.0)
    assert stats["num_shards"] == 2


def test_fifo_capacity_per_shard_keeps_newest(make_shards):
    client = ReplayClient(make_shards(capacity=5))
    for i in range(40):
        client.insert(make_rows(1, start=i, inserted_at=float(i)))
    kept = client.export()
    assert kept.num_rows == 10
    newest_per_shard = collections.defaultdict(list)
    for i in range(40):
        newest_per_shard[client.shard_for(f"p{i}/0/0")].append(f"p{i}/0/0")
    expected = {u for shard_uids in newest_per_shard.values() for u in shard_uids[-5:]}
    assert set(uids(kept)) == expected


def test_bad_insert_raises_and_keeps_rows(make_shards):
    client = ReplayClient(make_shards())
    client.insert(make_rows(10))
    before = client.export()
    with pytest.raises(ValueError, match="reward"):
        client.insert(make_rows(4, start=20).drop_columns(["reward"]))
    bad = make_rows(4, start=20)
    i = bad.column_names.index("policy_version")
    bad = bad.set_column(i, "policy_version", bad.column(i).cast(pa.int32()))
    with pytest.raises(ValueError, match="policy_version"):
        client.insert(bad)
    assert client.export().equals(before)


def test_update_priorities_routes_by_uid(make_shards):
    client = ReplayClient(make_shards())
    client.insert(make_rows(10))
    assert client.update_priorities(["p1/0/0", "p7/0/0", "missing/0/0"], [3.5, 0.25, 1.0]) == 2
    table = client.export()
    priority = dict(zip(uids(table), table.column("priority").to_pylist()))
    assert priority["p1/0/0"] == 3.5 and priority["p7/0/0"] == 0.25


def test_wait_for_times_out_then_sees_rows(make_shards, ray_cluster):
    client = ReplayClient(make_shards())
    start = time.monotonic()
    assert client.wait_for(5, learner_version=0, timeout_s=0.3) is False
    assert time.monotonic() - start >= 0.3

    # Another process inserts through its own copy of the client while we wait.
    @ray_cluster.remote(num_cpus=0)
    def insert_later(remote_client: ReplayClient, table: pa.Table, delay_s: float) -> int:
        time.sleep(delay_s)
        return remote_client.insert(table)

    ref = insert_later.remote(client, make_rows(8), 0.5)
    assert client.wait_for(5, learner_version=0, timeout_s=30.0) is True
    assert ray_cluster.get(ref) == 8
    assert client.num_eligible(0) == 8


def test_empty_buffer(make_shards):
    client = ReplayClient(make_shards())
    assert client.sample(4, learner_version=0).num_rows == 0
    assert client.export().num_rows == 0
    stats = client.stats(0)
    assert stats["size"] == 0 and stats["staleness_mean"] == 0.0
    with pytest.raises(ValueError):
        ReplayClient([])
