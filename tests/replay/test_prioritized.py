"""Prioritized sampling: frequencies follow priority^alpha, importance weights follow their formula."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from rlhf_ray.replay.client import ReplayClient
from rlhf_ray.replay.samplers import (
    PrioritizedSampler,
    UniformSampler,
    annealed_beta,
    importance_weights,
)
from rlhf_ray.replay.shard import ReplayShard, make_shard_actors
from tests.replay.rows import make_rows

PRIORITIES = np.array([0.1, 0.5, 1.0, 2.0, 4.0, 0.0])


def test_single_draw_frequencies_match_priorities():
    """20k single draws: a chi-square test does not reject P(i) = max(p_i, eps)^a / sum."""
    sampler = PrioritizedSampler(alpha=0.7, min_priority=0.05, seed=1)
    n = 20_000
    counts = np.zeros(PRIORITIES.size)
    for _ in range(n):
        counts[sampler.sample(PRIORITIES.size, 1, PRIORITIES)] += 1
    w = np.maximum(PRIORITIES, 0.05) ** 0.7
    expected = n * w / w.sum()
    assert stats.chisquare(counts, expected).pvalue > 1e-3
    # and uniform expectations are clearly rejected: the test has power
    assert stats.chisquare(counts, np.full(PRIORITIES.size, n / PRIORITIES.size)).pvalue < 1e-6


def test_batch_draw_is_sequential_sampling_without_replacement():
    """First two picks of a batch of 2: P(i then j) = P(i) * w_j / (W - w_i)."""
    p = np.array([1.0, 2.0, 3.0])
    sampler = PrioritizedSampler(alpha=1.0, min_priority=1e-6, seed=2)
    n = 30_000
    pairs: dict[tuple[int, int], int] = {}
    for _ in range(n):
        i, j = sampler.sample(3, 2, p)
        assert i != j
        pairs[(int(i), int(j))] = pairs.get((int(i), int(j)), 0) + 1
    keys = [(i, j) for i in range(3) for j in range(3) if i != j]
    expected = [n * p[i] / p.sum() * p[j] / (p.sum() - p[i]) for i, j in keys]
    assert stats.chisquare([pairs.get(k, 0) for k in keys], expected).pvalue > 1e-3


def test_importance_weights_match_formula():
    probs = np.array([0.5, 0.25, 0.125, 0.125])
    n, beta = 8, 0.6
    raw = (n * probs) ** -beta
    np.testing.assert_allclose(importance_weights(probs, beta), raw / raw.max(), rtol=1e-12)
    np.testing.assert_allclose(importance_weights(probs, 0.0), np.ones(4))
    assert importance_weights(probs, 1.0)[2] == 1.0  # least likely row gets the full weight
    with pytest.raises(ValueError, match="finite and > 0"):
        importance_weights(np.array([0.5, 0.0]), 0.5)


def test_beta_anneals_linearly_to_one():
    assert annealed_beta(0.4, 0, 10) == pytest.approx(0.4)
    assert annealed_beta(0.4, 5, 10) == pytest.approx(0.7)
    assert annealed_beta(0.4, 10, 10) == 1.0
    assert annealed_beta(0.4, 50, 10) == 1.0


def test_sampler_state_roundtrip_continues_the_stream():
    for make in (lambda: UniformSampler(3), lambda: PrioritizedSampler(seed=3)):
        a = make()
        a.sample(6, 2, PRIORITIES)
        b = make()
        b.load_state_dict(a.state_dict())
        np.testing.assert_array_equal(a.sample(6, 3, PRIORITIES), b.sample(6, 3, PRIORITIES))


def test_in_process_shard_samples_by_priority():
    shard = ReplayShard(capacity=100, sampler=PrioritizedSampler(alpha=1.0, seed=4))
    rows = make_rows(5)  # priorities 1..5
    shard.insert(rows)
    counts: dict[str, int] = {}
    n = 10_000
    for _ in range(n):
        uid = shard.sample(1, 0).column("uid")[0].as_py()
        counts[uid] = counts.get(uid, 0) + 1
    pri = rows.column("priority").to_numpy()
    expected = n * pri / pri.sum()
    got = [counts.get(u, 0) for u in rows.column("uid").to_pylist()]
    assert stats.chisquare(got, expected).pvalue > 1e-3


def test_client_across_shards_probabilities_and_weights(ray_cluster):
    """Through Ray, 3 shards: frequencies follow the buffer-wide P(i), and the returned
    probabilities and weights are the formula's."""
    import ray

    shards = make_shard_actors(3, capacity=100, max_staleness=None, max_times_sampled=None,
                               seed=5, sampler="prioritized", alpha=0.5, min_priority=1e-3)
    try:
        client = ReplayClient(shards, seed=5, sampler="prioritized", alpha=0.5,
                              min_priority=1e-3)
        rows = make_rows(10)
        client.insert(rows)
        pri = dict(zip(rows.column("uid").to_pylist(), rows.column("priority").to_numpy()))
        w = {u: p**0.5 for u, p in pri.items()}
        total = sum(w.values())
        counts = dict.fromkeys(pri, 0)
        n = 1500
        for _ in range(n):
            batch = client.sample_batch(1, 0, beta=0.5)
            uid = batch.table.column("uid")[0].as_py()
            counts[uid] += 1
            assert batch.probabilities[0] == pytest.approx(w[uid] / total)
            assert batch.num_eligible == 10
        expected = [n * w[u] / total for u in pri]
        assert stats.chisquare([counts[u] for u in pri], expected).pvalue > 1e-3

        batch = client.sample_batch(4, 0, beta=0.5)
        probs = np.array([w[u] / total for u in batch.table.column("uid").to_pylist()])
        np.testing.assert_allclose(batch.probabilities, probs, rtol=1e-9)
        raw = (10 * probs) ** -0.5
        np.testing.assert_allclose(batch.weights, raw / raw.max(), rtol=1e-9)
        assert 0 < batch.effective_sample_size <= 1
    finally:
        for s in shards:
            ray.kill(s)


def test_fifo_sampler_returns_the_oldest_eligible_rows_and_survives_recovery(tmp_path):
    from rlhf_ray.replay.samplers import FifoSampler

    shard = ReplayShard(capacity=100, max_times_sampled=2, sampler=FifoSampler(),
                        directory=str(tmp_path / "s"))
    rows = make_rows(6)
    shard.insert(rows)
    uids = rows.column("uid").to_pylist()
    assert shard.sample(4, 0).column("uid").to_pylist() == uids[:4]
    assert shard.sample(4, 0).column("uid").to_pylist() == uids[:4]  # second (last) use
    assert shard.sample(4, 0).column("uid").to_pylist() == uids[4:]
    shard.close()
    again = ReplayShard(capacity=100, max_times_sampled=2, sampler=FifoSampler(),
                        directory=str(tmp_path / "s"))
    assert again.sample(4, 0).column("uid").to_pylist() == uids[4:]  # their second use
    assert again.sample(4, 0).num_rows == 0
