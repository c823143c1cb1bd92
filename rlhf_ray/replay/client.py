"""``ReplayClient``: the one way other actors and the driver talk to the replay shards.

Rows go to shard ``blake2b(uid) mod S``. The hash is stable across processes and runs (unlike
Python's salted ``hash``), so equal uids always land on the same shard, whichever client sends
them, and per-shard dedup makes retried inserts idempotent across the whole buffer.

A sample of n rows asks every shard for its summary (eligible rows, their total sampling weight,
the rate limiter's allowance), splits n across the shards and samples each shard in parallel:

* uniform: a multivariate hypergeometric split over the rows each shard can serve, the exact
  split of a uniform draw without replacement over their union;
* prioritized: a multinomial split by each shard's weight mass (capped at what it can serve,
  the excess moved to shards with room), so a single draw picks row i with probability
  ``w_i / sum of all eligible weights``; ``sample_batch`` returns that probability and the
  importance weight ``(N P(i)) ** -beta`` (normalised by the batch maximum) for every row.

With rate-limited shards, ``insert`` and ``wait_for`` wait (polling, with a timeout) for the
limiter's allowance; a timeout is a ``RateLimitTimeout`` that names the stalled side.

Limits: the summaries and the samples are separate calls, so with other clients sampling or
inserting at the same time a sample may come back short of n; callers that need n rows wait with
``wait_for`` and sample again. Rows of one prompt group land on different shards (the key is the
row uid), so there is no group-wise sampling here.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from ray.actor import ActorHandle

from rlhf_ray.replay.samplers import importance_weights
from rlhf_ray.replay.shard import validate_experience_table
from rlhf_ray.types import EXPERIENCE_SCHEMA


class RateLimitTimeout(TimeoutError):
    """A rate-limited insert or sample waited longer than its timeout."""


@dataclass
class SampledBatch:
    """Rows of one sample with their sampling probabilities and importance weights.

    Attributes:
        table: the Experience rows.
        probabilities: single-draw probability of each row over all eligible rows (uniform:
            ``1 / N``).
        weights: importance weight of each row in (0, 1] (all 1 for uniform sampling).
        num_eligible: N, the eligible rows the sample was drawn from.
    """

    table: pa.Table
    probabilities: np.ndarray
    weights: np.ndarray
    num_eligible: int

    @property
    def effective_sample_size(self) -> float:
        """Kish's effective sample size of the weights, as a fraction of the batch (1 = all)."""
        w = self.weights
        if w.size == 0:
            return 0.0
        return float(w.sum() ** 2 / (w.size * (w**2).sum()))

# Stats keys summed across shards, and means weighted by shard size.
_SUMMED = (
    "size",
    "capacity",
    "eligible",
    "stale",
    "exhausted",
    "inserted",
    "duplicates",
    "evicted_fifo",
    "evicted_stale",
    "sampled",
)
_SIZE_WEIGHTED = ("staleness_mean", "times_sampled_mean")


def stable_shard(uid: str, num_shards: int) -> int:
    """The shard of ``uid`` among ``num_shards``: the same in every process and run."""
    digest = hashlib.blake2b(uid.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % num_shards


class ReplayClient:
    """Inserts into and samples from a set of replay shard actors.

    The client is cheap and holds only actor handles, so it can be passed to other actors.

    Args:
        shard_handles: the shard actors, in shard order (from ``make_shard_actors``). Every
            client of one buffer must list them in the same order.
        seed: seed for splitting samples across shards.
        sampler: ``uniform``, ``fifo`` or ``prioritized``: how samples split across shards;
            must match the shards' samplers. ``fifo`` splits like ``uniform`` (each shard then
            gives its oldest rows), so the buffer-wide order is FIFO only approximately.
        alpha, min_priority: the prioritized sampler's weight ``max(p, min_priority) ** alpha``
            (to compute each row's probability from its ``priority``).
        insert_timeout_s: how long ``insert`` waits for rate-limiter allowance.
        poll_s: pause between two polls of a waiting call.
    """

    def __init__(self, shard_handles: Sequence[ActorHandle], *, seed: int | None = None,
                 sampler: str = "uniform", alpha: float = 0.6, min_priority: float = 1e-3,
                 insert_timeout_s: float = 600.0, poll_s: float = 0.05) -> None:
        if not shard_handles:
            raise ValueError("ReplayClient needs at least one shard handle")
        if sampler not in ("uniform", "fifo", "prioritized"):
            raise ValueError(
                f"unknown sampler {sampler!r}: expected 'uniform', 'fifo' or 'prioritized'")
        self._shards = list(shard_handles)
        self._rng = np.random.default_rng(seed)
        self.sampler = sampler
        self.alpha, self.min_priority = float(alpha), float(min_priority)
        self.insert_timeout_s = insert_timeout_s
        self.poll_s = poll_s
        self.insert_wait_s = 0.0  # seconds the last insert waited for the rate limiter

    def rng_state(self) -> dict:
        """The random state that splits samples across shards (JSON-ready)."""
        return self._rng.bit_generator.state

    def load_rng_state(self, state: dict) -> None:
        self._rng.bit_generator.state = state

    @property
    def num_shards(self) -> int:
        """How many shards (S)."""
        return len(self._shards)

    def shard_for(self, uid: str) -> int:
        """The index of the shard that stores ``uid``."""
        return stable_shard(uid, len(self._shards))

    def insert(self, table: pa.Table) -> int:
        """Validates ``table``, splits it by shard and inserts the parts in parallel.

        Args:
            table: Experience rows (``EXPERIENCE_SCHEMA``).

        Returns:
            How many rows were new across all shards (duplicates of stored uids don't count).

        Raises:
            ValueError: the table does not match the schema (checked here, before any shard
                receives rows, so a bad table never lands partially).
        """
        table = validate_experience_table(table)
        if table.num_rows == 0:
            return 0
        shard_of_row = np.fromiter(
            (self.shard_for(u) for u in table.column("uid").to_pylist()),
            dtype=np.int64,
            count=table.num_rows,
        )
        pending = {}
        for s in range(len(self._shards)):
            rows = np.flatnonzero(shard_of_row == s)
            if rows.size:
                pending[s] = table.take(pa.array(rows))
        start = time.monotonic()
        new = 0
        while True:
            # every shard takes what its rate limiter admits; the rest is resent after a pause
            refs = {s: self._shards[s].try_insert.remote(part) for s, part in pending.items()}
            for s, (consumed, stored) in zip(refs, ray.get(list(refs.values()))):
                new += int(stored)
                part = pending.pop(s)
                if consumed < part.num_rows:
                    pending[s] = part.slice(consumed)
            self.insert_wait_s = time.monotonic() - start
            if not pending:
                return new
            if self.insert_wait_s > self.insert_timeout_s:
                left = sum(p.num_rows for p in pending.values())
                raise RateLimitTimeout(
                    f"insert waited {self.insert_wait_s:.0f}s for the rate limiter and {left} of "
                    f"{table.num_rows} rows are still not admitted ({new} stored): the producers "
                    "(generators/scorers) are ahead and the learner is not sampling — it is "
                    "stalled, failed or too slow (replay.samples_per_insert, "
                    "replay.insert_timeout_s)"
                )
            time.sleep(self.poll_s)

    def sample(self, n: int, learner_version: int) -> pa.Table:
        """Draws up to ``n`` distinct eligible rows (see ``sample_batch``); returns the rows."""
        return self.sample_batch(n, learner_version).table

    def sample_batch(self, n: int, learner_version: int, beta: float = 1.0) -> SampledBatch:
        """Draws up to ``n`` distinct eligible rows across all shards.

        Args:
            n: rows wanted; fewer come back when fewer are eligible or admitted by the rate
                limiters.
            learner_version: the learner's current policy version.
            beta: importance-weight exponent (prioritized sampling only).

        Returns:
            The rows (each at most once, ``times_sampled`` including this sample), their
            single-draw probabilities and importance weights.
        """
        summaries = self._summaries(learner_version)
        servable = np.array([_servable(su) for su in summaries], dtype=np.int64)
        eligible = int(sum(su["eligible"] for su in summaries))
        want = min(max(int(n), 0), int(servable.sum()))
        if want == 0:
            empty = np.empty(0, dtype=np.float64)
            return SampledBatch(EXPERIENCE_SCHEMA.empty_table(), empty, empty, eligible)
        if self.sampler != "prioritized":
            if want == servable.sum():
                allocation = servable
            else:
                allocation = self._rng.multivariate_hypergeometric(servable, want)
        else:
            mass = np.array([su["mass"] if k > 0 else 0.0 for su, k in zip(summaries, servable)])
            allocation = _capped_multinomial(self._rng, want, mass, servable)
        futures = [
            shard.sample.remote(int(k), learner_version)
            for shard, k in zip(self._shards, allocation)
            if k > 0
        ]
        table = pa.concat_tables(ray.get(futures))
        if self.sampler != "prioritized":
            probs = np.full(table.num_rows, 1.0 / max(eligible, 1))
            weights = np.ones(table.num_rows)
        else:
            total = float(sum(su["mass"] for su in summaries))
            w = np.maximum(table.column("priority").to_numpy(), self.min_priority) ** self.alpha
            probs = w / total
            weights = importance_weights(probs, beta)
        return SampledBatch(table, probs, weights, eligible)

    def num_eligible(self, learner_version: int) -> int:
        """How many rows all shards together could return now (before rate limits)."""
        return int(sum(su["eligible"] for su in self._summaries(learner_version)))

    def num_servable(self, learner_version: int) -> int:
        """How many rows a sample could return now: eligible and admitted by the rate limiters."""
        return int(sum(_servable(su) for su in self._summaries(learner_version)))

    def update_priorities(self, uids: list[str], priorities: list[float]) -> int:
        """Sets priorities by uid on the owning shards; returns how many rows were updated."""
        if len(uids) != len(priorities):
            raise ValueError(f"got {len(uids)} uids but {len(priorities)} priorities")
        parts: dict[int, tuple[list[str], list[float]]] = {}
        for uid, priority in zip(uids, priorities):
            part = parts.setdefault(self.shard_for(uid), ([], []))
            part[0].append(uid)
            part[1].append(float(priority))
        futures = [self._shards[s].update_priorities.remote(u, p) for s, (u, p) in parts.items()]
        return int(sum(ray.get(futures)))

    def stats(self, learner_version: int) -> dict[str, Any]:
        """Shard stats aggregated: counts summed, means weighted by shard size.

        Returns:
            The ``ReplayShard.stats`` keys over the whole buffer (``staleness_max`` is the max)
            plus ``num_shards``, ``reuse_ratio`` (rows returned by samples per row inserted),
            and with rate limiters ``limiter_inserts``,
            ``limiter_samples`` and ``limiter_ratio`` over all shards.
        """
        per_shard = ray.get([s.stats.remote(learner_version) for s in self._shards])
        out: dict[str, Any] = {key: sum(int(st[key]) for st in per_shard) for key in _SUMMED}
        size = out["size"]
        for key in _SIZE_WEIGHTED:
            weighted = sum(st[key] * st["size"] for st in per_shard)
            out[key] = float(weighted / size) if size else 0.0
        out["staleness_max"] = max(
            (int(st["staleness_max"]) for st in per_shard if st["size"]), default=0
        )
        out["num_shards"] = len(self._shards)
        out["reuse_ratio"] = out["sampled"] / out["inserted"] if out["inserted"] else 0.0
        if all("limiter_inserts" in st for st in per_shard):
            inserts = sum(st["limiter_inserts"] for st in per_shard)
            samples = sum(st["limiter_samples"] for st in per_shard)
            out["limiter_inserts"] = inserts
            out["limiter_samples"] = samples
            out["limiter_ratio"] = samples / inserts if inserts else 0.0
        return out

    def export(self) -> pa.Table:
        """Every stored row of every shard (shard order, then insertion order)."""
        return pa.concat_tables(ray.get([s.to_table.remote() for s in self._shards]))

    def wait_for(
        self, n: int, learner_version: int, timeout_s: float, poll_s: float = 0.05
    ) -> bool:
        """Polls until at least ``n`` rows are servable (eligible and admitted by the rate
        limiters) or ``timeout_s`` passes.

        Args:
            n: rows needed.
            learner_version: version eligibility is measured against.
            timeout_s: how long to wait at most, in seconds.
            poll_s: pause between polls, in seconds.

        Returns:
            True as soon as ``n`` rows are servable; False when the timeout passed first.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            if self.num_servable(learner_version) >= n:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(poll_s, remaining))

    def _summaries(self, learner_version: int) -> list[dict]:
        return ray.get([s.summary.remote(learner_version) for s in self._shards])


def _servable(summary: dict) -> int:
    """Rows one shard can serve now: eligible, and within its rate limiter's allowance."""
    allowance = summary["sample_allowance"]
    return summary["eligible"] if allowance is None else min(summary["eligible"], allowance)


def _capped_multinomial(rng: np.random.Generator, n: int, mass: np.ndarray,
                        cap: np.ndarray) -> np.ndarray:
    """Splits ``n`` draws across shards proportional to ``mass``, none above its ``cap``.

    Draws that land on a full shard are drawn again among the shards with room, so the result
    sums to ``n`` (callers guarantee ``n <= cap.sum()``).
    """
    allocation = np.zeros(mass.size, dtype=np.int64)
    left = n
    while left > 0:
        room = cap - allocation
        p = np.where(room > 0, mass, 0.0)
        if p.sum() <= 0:  # only zero-mass shards have room: split by room instead
            p = room.astype(np.float64)
        allocation += np.minimum(rng.multinomial(left, p / p.sum()), room)
        left = n - int(allocation.sum())
    return allocation
