"""Durable replay shards: write-ahead log, snapshots, recovery, and a SIGKILL-ed shard actor."""

from __future__ import annotations

import os
import shutil
import signal
import threading
from pathlib import Path

import pyarrow as pa
import pytest

from rlhf_ray.replay.client import ReplayClient
from rlhf_ray.replay.ratelimiter import RateLimiter
from rlhf_ray.replay.samplers import PrioritizedSampler
from rlhf_ray.replay.shard import ReplayShard, make_shard_actors
from rlhf_ray.replay.storage import read_shard, read_wal, recover
from tests.replay.rows import make_rows

DURABLE_KEYS = ("wal_bytes", "snapshots")


def uids(table: pa.Table) -> list[str]:
    return table.column("uid").to_pylist()


def durable_shard(directory: Path | None, snapshot_every: int = 1000,
                  fsync: bool = False) -> ReplayShard:
    """A shard with prioritized sampling, a rate limiter, FIFO and staleness eviction."""
    return ReplayShard(
        capacity=30,
        max_staleness=3,
        max_times_sampled=3,
        sampler=PrioritizedSampler(alpha=0.7, seed=5),
        rate_limiter=RateLimiter(1.0, min_size_to_sample=4, error_buffer=25.0),
        directory=directory,
        snapshot_every=snapshot_every,
        fsync=fsync,
    )


def run_ops(s: ReplayShard, steps: range) -> None:
    """Inserts (some partly refused by the limiter, some retried), samples, priority updates."""
    for step in steps:
        version = step // 3
        rows = make_rows(8, version=version, start=10 * step, inserted_at=100.0 * step)
        consumed, _ = s.try_insert(rows)
        if consumed < rows.num_rows:
            s.try_insert(rows.slice(consumed))  # the limiter's refusal, resent as a client does
        s.insert(rows.slice(0, 3))  # a retry: duplicates only
        got = s.sample(5, learner_version=version + 1)
        picked = uids(got)[:3]
        if picked:
            s.update_priorities(picked, [0.1 * (step + k) for k in range(len(picked))])
        s.update_priorities(["never-stored"], [1.0])  # finds nothing: writes nothing
        if step % 4 == 3:
            # A look from far ahead: no rows returned, but the older versions' rows turn stale
            # and are evicted before the next inserts.
            assert s.sample(0, learner_version=version + 3).num_rows == 0


def wal_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("wal-*.arrows"))


def without_durable_keys(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if k not in DURABLE_KEYS}


@pytest.mark.parametrize("snapshot_every", [1000, 7])
def test_recovered_shard_equals_live_shard(tmp_path, snapshot_every):
    live = durable_shard(tmp_path / "a", snapshot_every)
    run_ops(live, range(12))
    stats = live.stats(4)
    assert stats["evicted_fifo"] > 0 and stats["evicted_stale"] > 0 and stats["duplicates"] > 0
    assert stats["limiter_samples"] > 0
    if snapshot_every < 1000:
        assert stats["snapshots"] >= 3
        assert len(list((tmp_path / "a").glob("snapshot-*.parquet"))) == 1  # older ones deleted
    else:
        assert stats["snapshots"] == 0

    # What a SIGKILL leaves on disk is exactly the files as they are now: copy them.
    shutil.copytree(tmp_path / "a", tmp_path / "b", ignore=shutil.ignore_patterns("LOCK"))
    wal_before = [p.read_bytes() for p in wal_files(tmp_path / "b")]
    recovered = durable_shard(tmp_path / "b", snapshot_every)
    # Recovery logs nothing for the calls it replays.
    assert [p.read_bytes() for p in wal_files(tmp_path / "b")] == wal_before

    assert recovered.to_table().equals(live.to_table())
    for version in (0, 4, 9):
        assert recovered.stats(version) == live.stats(version)
    # The same random stream and limiter: the next calls agree, and so does a reader.
    for step in range(12, 16):
        assert recovered.sample(6, step // 3 + 1).equals(live.sample(6, step // 3 + 1))
        run_ops(live, range(step, step + 1))
        run_ops(recovered, range(step, step + 1))
        assert recovered.stats(step) == live.stats(step)
    table, meta = read_shard(tmp_path / "a")
    assert table.equals(live.to_table())
    assert meta["counters"]["inserted"] == live.stats(0)["inserted"]


@pytest.mark.parametrize("fsync", [False, True])
def test_reopen_after_close_in_place(tmp_path, fsync):
    s = durable_shard(tmp_path, snapshot_every=5, fsync=fsync)
    run_ops(s, range(6))
    expected, stats = s.to_table(), s.stats(2)
    s.close()
    with pytest.raises(RuntimeError, match="accepts no changes"):
        s.insert(make_rows(1, start=999))
    again = durable_shard(tmp_path, snapshot_every=5)
    assert again.to_table().equals(expected) and again.stats(2) == stats


def test_interrupted_rotation_leftovers_are_ignored_and_removed(tmp_path):
    live = durable_shard(tmp_path / "live", snapshot_every=5)
    run_ops(live, range(3))
    generation = live.state_meta()["generation"]
    assert generation >= 1
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "live", old, ignore=shutil.ignore_patterns("LOCK"))
    run_ops(live, range(3, 6))
    assert live.state_meta()["generation"] > generation

    # Killed after the new generation's meta was committed, before the old files were deleted.
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "live", crashed, ignore=shutil.ignore_patterns("LOCK"))
    for path in old.glob("*-*"):
        shutil.copy(path, crashed / path.name)
    # ... and, in another crash, while writing the generation after it (not committed).
    nxt = live.state_meta()["generation"] + 1
    (crashed / f"snapshot-{nxt:08d}.parquet").write_bytes(b"half a parquet file")
    (crashed / f"wal-{nxt:08d}.arrows").write_bytes(b"")
    (crashed / f".tmp-snapshot-{nxt:08d}.json").write_text("{")
    recovered = durable_shard(crashed, snapshot_every=5)
    assert recovered.to_table().equals(live.to_table())
    assert recovered.stats(3) == live.stats(3)
    current = live.state_meta()["generation"]
    assert sorted(p.name for p in crashed.iterdir()) == sorted(
        ["LOCK", f"snapshot-{current:08d}.json", f"snapshot-{current:08d}.parquet",
         f"wal-{current:08d}.arrows"])


def test_second_live_shard_on_one_directory_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("rlhf_ray.replay.shard._LOCK_WAIT_S", 0.2)
    s = durable_shard(tmp_path)
    with pytest.raises(RuntimeError, match="in use"):
        durable_shard(tmp_path)
    s.close()
    durable_shard(tmp_path).close()


def test_other_configuration_is_refused(tmp_path):
    durable_shard(tmp_path).close()
    with pytest.raises(ValueError, match="capacity"):
        ReplayShard(capacity=31, directory=tmp_path)


def test_torn_wal_tail_keeps_earlier_records(tmp_path):
    s = durable_shard(tmp_path)
    reference = durable_shard(None)
    run_ops(s, range(5))
    run_ops(reference, range(5))
    last = make_rows(4, version=9, start=500, inserted_at=10_000.0)
    assert s.insert(last) == 4
    s.close()
    (wal,) = wal_files(tmp_path)
    records = len(read_wal(wal).records)
    os.truncate(wal, wal.stat().st_size - 5)  # the last record, cut short by a kill

    assert len(read_wal(wal).records) == records - 1
    table, meta = read_shard(tmp_path)  # read-only: the torn tail stays on disk
    assert meta["torn_bytes"] > 0 and wal.stat().st_size == meta["wal_bytes"] + meta["torn_bytes"]
    recovered = durable_shard(tmp_path)
    assert recovered.to_table().equals(reference.to_table()) and table.equals(
        reference.to_table())
    assert without_durable_keys(recovered.stats(2)) == reference.stats(2)
    assert not set(uids(last)) & set(uids(recovered.to_table()))
    # The torn bytes were cut off, so records appended now are readable after a reopen.
    assert recovered.insert(last) == 4 and reference.insert(last) == 4
    recovered.close()
    again = durable_shard(tmp_path)
    assert again.to_table().equals(reference.to_table())
    assert recover(tmp_path).torn_bytes == 0


def test_bad_calls_write_nothing(tmp_path):
    s = durable_shard(tmp_path)
    s.insert(make_rows(4))
    (wal,) = wal_files(tmp_path)
    size, stats = wal.stat().st_size, s.stats(0)
    assert stats["wal_bytes"] == size

    bad = make_rows(3, start=10)
    with pytest.raises(ValueError, match="reward"):
        s.insert(bad.drop_columns(["reward"]))
    i = bad.column_names.index("finish_reason")
    with pytest.raises(ValueError, match="finish_reason"):
        s.try_insert(bad.set_column(i, "finish_reason", pa.array(["stop", "eos", "stop"])))
    with pytest.raises(ValueError):
        s.update_priorities(uids(s.to_table())[:1], [-1.0])
    with pytest.raises(ValueError):
        s.update_priorities(uids(s.to_table())[:1], [1.0, 2.0])
    assert s.insert(bad.slice(0, 0)) == 0
    assert wal.stat().st_size == size and s.stats(0) == stats
    # A good call after them is logged.
    assert s.insert(bad) == 3 and wal.stat().st_size > size


# ---- a shard actor killed with SIGKILL


@pytest.fixture
def durable_actors(ray_cluster, tmp_path):
    """Starts durable shard actors under ``tmp_path/replay/online``; kills them after the test."""
    started = []

    def start(num_shards: int):
        handles = make_shard_actors(
            num_shards, capacity=100_000, max_staleness=None, max_times_sampled=None, seed=0,
            directory=tmp_path / "replay" / "online", snapshot_every=4,
        )
        started.extend(handles)
        return handles

    yield start
    for handle in started:
        ray_cluster.kill(handle)


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def test_sigkilled_shard_actor_keeps_every_acknowledged_insert(
    durable_actors, ray_cluster, tmp_path
):
    handles = durable_actors(2)
    client = ReplayClient(handles, seed=0)
    pids = ray_cluster.get([h.pid.remote() for h in handles])
    acknowledged: set[str] = set()
    killer = None
    for batch in range(24):
        if batch == 6:
            _kill(pids[0])  # between calls: the next insert reaches a dead process
        if batch == 14:
            # while inserts are in flight: whichever call it hits is retried after the restart
            killer = threading.Timer(0.05, _kill, args=(pids[1],))
            killer.start()
        rows = make_rows(25, start=25 * batch)
        client.insert(rows)  # returned: acknowledged
        acknowledged.update(uids(rows))
        if batch == 14:
            killer.join()
    new_pids = ray_cluster.get([h.pid.remote() for h in handles])
    assert new_pids[0] != pids[0] and new_pids[1] != pids[1]  # both were restarted

    stored = uids(client.export())
    assert len(stored) == len(set(stored))
    assert set(stored) == acknowledged
    for handle in handles:
        stats = ray_cluster.get(handle.stats.remote(0))
        assert stats["inserted"] == stats["size"] > 0
        assert stats["snapshots"] >= 1
    # The files alone (no Ray, no actor) hold the same rows.
    on_disk: list[str] = []
    for i in range(2):
        table, _ = read_shard(tmp_path / "replay" / "online" / f"shard-{i}")
        on_disk.extend(uids(table))
    assert sorted(on_disk) == sorted(acknowledged)
