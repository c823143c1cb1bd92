"""``ReplayClient``: the one way other actors and the driver talk to the replay shards.

Rows go to shard ``blake2b(uid) mod S``. The hash is stable across processes and runs (unlike
Python's salted ``hash``), so equal uids always land on the same shard, whichever client sends
them, and per-shard dedup makes retried inserts idempotent across the whole buffer.

A sample of n rows asks every shard how many rows are eligible, splits n across the shards with
a multivariate hypergeometric draw (the exact split of a uniform draw without replacement over
the union of eligible rows), samples each shard in parallel and concatenates the results.

Limits: the counts and the samples are separate calls, so with other clients sampling or
inserting at the same time a sample may come back short of n; callers that need n rows wait with
``wait_for`` and sample again. Rows of one prompt group land on different shards (the key is the
row uid), so there is no group-wise sampling here.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from ray.actor import ActorHandle

from rlhf_ray.replay.shard import validate_experience_table
from rlhf_ray.types import EXPERIENCE_SCHEMA

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
    """

    def __init__(self, shard_handles: Sequence[ActorHandle], *, seed: int | None = None) -> None:
        if not shard_handles:
            raise ValueError("ReplayClient needs at least one shard handle")
        self._shards = list(shard_handles)
        self._rng = np.random.default_rng(seed)

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
        futures = []
        for s in range(len(self._shards)):
            rows = np.flatnonzero(shard_of_row == s)
            if rows.size:
                futures.append(self._shards[s].insert.remote(table.take(pa.array(rows))))
        return int(sum(ray.get(futures)))

    def sample(self, n: int, learner_version: int) -> pa.Table:
        """Draws ``n`` distinct eligible rows uniformly over all shards.

        Args:
            n: rows wanted; fewer come back when fewer are eligible.
            learner_version: the learner's current policy version.

        Returns:
            An Experience table; each row appears at most once and its ``times_sampled``
            includes this sample.
        """
        counts = np.asarray(self._eligible_per_shard(learner_version), dtype=np.int64)
        total = int(counts.sum())
        want = min(max(int(n), 0), total)
        if want == 0:
            return EXPERIENCE_SCHEMA.empty_table()
        if want == total:
            allocation = counts
        else:
            allocation = self._rng.multivariate_hypergeometric(counts, want)
        futures = [
            shard.sample.remote(int(k), learner_version)
            for shard, k in zip(self._shards, allocation)
            if k > 0
        ]
        return pa.concat_tables(ray.get(futures))

    def num_eligible(self, learner_version: int) -> int:
        """How many rows all shards together could return now."""
        return int(sum(self._eligible_per_shard(learner_version)))

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
            plus ``num_shards``.
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
        return out

    def export(self) -> pa.Table:
        """Every stored row of every shard (shard order, then insertion order)."""
        return pa.concat_tables(ray.get([s.to_table.remote() for s in self._shards]))

    def wait_for(
        self, n: int, learner_version: int, timeout_s: float, poll_s: float = 0.05
    ) -> bool:
        """Polls until at least ``n`` rows are eligible or ``timeout_s`` passes.

        Args:
            n: rows needed.
            learner_version: version eligibility is measured against.
            timeout_s: how long to wait at most, in seconds.
            poll_s: pause between polls, in seconds.

        Returns:
            True as soon as ``n`` rows are eligible; False when the timeout passed first.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            if self.num_eligible(learner_version) >= n:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(poll_s, remaining))

    def _eligible_per_shard(self, learner_version: int) -> list[int]:
        return ray.get([s.num_eligible.remote(learner_version) for s in self._shards])
