"""The samples-per-insert rate limiter: its rule, and the ratio under concurrent producers and
consumers through real Ray shards."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from rlhf_ray.replay.client import RateLimitTimeout, ReplayClient
from rlhf_ray.replay.ratelimiter import RateLimiter
from rlhf_ray.replay.shard import ReplayShard, make_shard_actors
from tests.replay.rows import make_rows


def test_rule_min_size_and_error_buffer():
    lim = RateLimiter(2.0, min_size_to_sample=4, error_buffer=4)
    # max_diff = 2*4 + 4 = 12: six rows may go in before any sample
    assert lim.insert_allowance() == 6
    assert lim.sample_allowance() == 0  # nothing inserted yet
    lim.record_insert(3)
    assert lim.sample_allowance() == 0  # below min_size_to_sample
    lim.record_insert(3)
    # diff = 12, min_diff = 4: 8 samples allowed, no more inserts
    assert (lim.insert_allowance(), lim.sample_allowance()) == (0, 8)
    lim.record_sample(8)
    assert (lim.insert_allowance(), lim.sample_allowance()) == (4, 0)


def test_forfeit_frees_producers():
    lim = RateLimiter(2.0, min_size_to_sample=1, error_buffer=2)
    lim.record_insert(2)  # diff 4 = max_diff
    assert lim.insert_allowance() == 0
    lim.forfeit(np.array([0, 1]))  # two rows leave after 0 and 1 samples: 3 samples forfeited
    assert lim.samples == 3 and lim.insert_allowance() == 1


@pytest.mark.parametrize("spi,eb", [(0.0, None), (2.0, 1.0), (float("inf"), None)])
def test_bad_settings_are_errors(spi, eb):
    with pytest.raises(ValueError):
        RateLimiter(spi, 1, eb)


def test_shard_enforces_the_limiter_in_process():
    shard = ReplayShard(capacity=100, rate_limiter=RateLimiter(1.0, 2, 2))
    consumed, new = shard.try_insert(make_rows(10))
    assert (consumed, new) == (4, 4)  # max_diff = 1*2 + 2
    # a resend of the same rows: the first 4 are duplicates (free), then 0 admitted
    assert shard.try_insert(make_rows(10)) == (4, 0)
    assert shard.sample(10, 0).num_rows == 4  # diff 4 - min_diff 0
    assert shard.summary(0)["sample_allowance"] == 0


def test_ratio_stays_in_error_buffer_with_concurrent_producers_and_consumers(ray_cluster):
    """2 producer and 2 consumer threads, 2 shards, spi = 1.5: at every observation each
    shard's inserts * spi - samples stays at most max_diff, and at least min_diff once sampling
    has begun (before, it climbs from 0); so does the buffer-wide sum."""
    import ray

    spi, min_size, eb, shards_n = 1.5, 16, 12.0, 2
    shards = make_shard_actors(shards_n, capacity=10_000, max_staleness=None,
                               max_times_sampled=None, seed=0, samples_per_insert=spi,
                               min_size_to_sample=min_size, error_buffer=eb)
    clients = [ReplayClient(shards, seed=i, insert_timeout_s=60, poll_s=0.01) for i in range(4)]
    stop = threading.Event()
    errors: list[BaseException] = []
    sampled = [0, 0]

    def produce(k: int) -> None:
        try:
            for b in range(25):
                clients[k].insert(make_rows(6, start=k * 10_000 + b * 6))
        except BaseException as e:  # noqa: BLE001 (reported by the test)
            errors.append(e)

    def consume(k: int) -> None:
        try:
            while not stop.is_set():
                c = clients[2 + k]
                if c.wait_for(5, 0, timeout_s=0.5, poll_s=0.01):
                    sampled[k] += c.sample(5, 0).num_rows
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=produce, args=(k,)) for k in range(2)]
    threads += [threading.Thread(target=consume, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    per_shard_min = spi * (-(-min_size // shards_n)) - eb / shards_n
    per_shard_max = spi * (-(-min_size // shards_n)) + eb / shards_n
    observations = 0
    try:
        while any(t.is_alive() for t in threads[:2]):
            for st in ray.get([s.stats.remote(0) for s in shards]):
                diff = st["limiter_inserts"] * spi - st["limiter_samples"]
                assert diff <= per_shard_max + 1e-9, st
                if st["limiter_samples"]:  # the floor holds from the first sample on
                    assert diff >= per_shard_min - 1e-9, st
            observations += 1
            time.sleep(0.02)
    finally:
        for t in threads[:2]:
            t.join()
        time.sleep(1.0)  # let the consumers drain what the limiter still admits
        stop.set()
        for t in threads[2:]:
            t.join()
    assert not errors, errors
    total = clients[0].stats(0)
    assert total["limiter_inserts"] == 300 == total["inserted"]
    diff = total["limiter_inserts"] * spi - total["limiter_samples"]
    assert spi * min_size - eb <= diff <= spi * min_size + eb
    assert sum(sampled) == total["sampled"] > 300  # the consumers took ~1.5 rows per insert
    assert observations > 5
    for s in shards:
        ray.kill(s)


def test_stalled_sides_time_out_with_a_clear_error(ray_cluster):
    import ray

    from rlhf_ray.config import load_config
    from rlhf_ray.learner.learner import Learner

    shards = make_shard_actors(1, capacity=100, max_staleness=None, max_times_sampled=None,
                               seed=0, samples_per_insert=1.0, min_size_to_sample=2,
                               error_buffer=2)
    try:
        client = ReplayClient(shards, insert_timeout_s=0.3, poll_s=0.01)
        # no learner samples: the producer side is the one held back
        with pytest.raises(RateLimitTimeout, match="learner is not sampling"):
            client.insert(make_rows(10))
        assert client.stats(0)["size"] == 4  # what was admitted stays stored
        # a learner asking for more than the limiter admits names the generators
        cfg = load_config(preset="tiny", overrides=["replay.sample_timeout_s=0.3",
                                                    "learner.batch_size=8"])
        learner = Learner.__new__(Learner)  # only the waiting logic is under test
        learner.cfg, learner.version = cfg, 0
        client.sample(4, 0)
        with pytest.raises(RateLimitTimeout, match="generators/scorers are stalled"):
            learner._draw(client, 8, 1.0)
    finally:
        for s in shards:
            ray.kill(s)


def test_rows_gone_stale_do_not_hold_inserts_back():
    """Stale rows are evicted (and forfeited) only at the next sample; until then the learner
    may be waiting for fresh inserts, so the insert allowance already discounts them."""
    shard = ReplayShard(capacity=100, max_staleness=1, rate_limiter=RateLimiter(2.0, 2, 2))
    assert shard.try_insert(make_rows(10)) == (3, 3)  # max_diff = 2*2 + 2 = 6: 3 rows
    assert shard.summary(0)["insert_allowance"] == 0
    # the learner moved on to version 5: the 3 rows (version 0) can never be sampled
    assert shard.summary(5)["eligible"] == 0
    assert shard.summary(5)["insert_allowance"] == 3
    assert shard.try_insert(make_rows(3, version=5, start=100)) == (3, 3)
