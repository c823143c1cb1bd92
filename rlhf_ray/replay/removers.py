"""Removers and the eligibility rule: which rows leave a shard, and which may be sampled.

Two separate decisions live here:

* A ``Remover`` chooses the rows to evict when a shard holds more than its capacity.
  ``FifoRemover`` evicts the oldest rows first: smallest ``inserted_at``, ties broken by
  insertion order. A batch carrying an ``inserted_at`` older than everything stored is therefore
  evicted first, even though it arrived last.
* ``EligibilityRule`` decides at sample time which rows may be returned: a row is eligible when
  ``learner_version - policy_version <= max_staleness`` and
  ``times_sampled < max_times_sampled``. Rows staler than ``max_staleness`` can never become
  eligible again (versions only grow), so the shard evicts them at sample time. Rows that reached
  ``max_times_sampled`` are kept (they still count for export and offline use) until the remover
  evicts them.

All functions work on whole numpy columns; none loops over rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Remover(Protocol):
    """Chooses rows to evict when a shard is over capacity."""

    capacity: int

    def select_evictions(self, inserted_at: np.ndarray) -> np.ndarray:
        """Returns the positions to evict.

        Args:
            inserted_at: the ``inserted_at`` column of every stored row, in insertion order
                (position 0 was inserted first).

        Returns:
            A 1-D int64 array of distinct positions; after removing them at most ``capacity``
            rows remain. Empty when the shard is within capacity.
        """
        ...


class FifoRemover:
    """Evicts the oldest rows (by ``inserted_at``, then insertion order) beyond ``capacity``.

    Args:
        capacity: the most rows a shard keeps; must be positive.
    """

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = int(capacity)

    def select_evictions(self, inserted_at: np.ndarray) -> np.ndarray:
        """Returns the positions of the ``len(inserted_at) - capacity`` oldest rows.

        Args:
            inserted_at: per-row insertion times, in insertion order.

        Returns:
            Positions to evict, ascending.
        """
        excess = inserted_at.size - self.capacity
        if excess <= 0:
            return np.empty(0, dtype=np.int64)
        # Common case: times never decrease along insertion order, so the oldest are a prefix.
        if inserted_at.size < 2 or bool(np.all(inserted_at[1:] >= inserted_at[:-1])):
            return np.arange(excess, dtype=np.int64)
        # General case: everything strictly older than the excess-th smallest time goes, then
        # rows tied with it, earliest inserted first, until `excess` are chosen.
        threshold = np.partition(inserted_at, excess - 1)[excess - 1]
        older = np.flatnonzero(inserted_at < threshold)
        tied = np.flatnonzero(inserted_at == threshold)[: excess - older.size]
        return np.sort(np.concatenate([older, tied])).astype(np.int64, copy=False)


@dataclass(frozen=True)
class EligibilityRule:
    """Which stored rows a sample may return.

    Attributes:
        max_staleness: the largest allowed ``learner_version - policy_version``; ``None`` means
            no limit.
        max_times_sampled: a row is returned at most this many times in its life; ``None``
            means no limit.
    """

    max_staleness: int | None = None
    max_times_sampled: int | None = None

    def __post_init__(self) -> None:
        if self.max_staleness is not None and self.max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0 or None, got {self.max_staleness}")
        if self.max_times_sampled is not None and self.max_times_sampled < 1:
            raise ValueError(
                f"max_times_sampled must be >= 1 or None, got {self.max_times_sampled}"
            )

    def stale(self, policy_version: np.ndarray, learner_version: int) -> np.ndarray:
        """Boolean mask of rows staler than ``max_staleness`` (never eligible again)."""
        if self.max_staleness is None:
            return np.zeros(policy_version.shape, dtype=bool)
        return (learner_version - policy_version) > self.max_staleness

    def exhausted(self, times_sampled: np.ndarray) -> np.ndarray:
        """Boolean mask of rows already returned ``max_times_sampled`` times."""
        if self.max_times_sampled is None:
            return np.zeros(times_sampled.shape, dtype=bool)
        return times_sampled >= self.max_times_sampled

    def eligible(
        self, policy_version: np.ndarray, times_sampled: np.ndarray, learner_version: int
    ) -> np.ndarray:
        """Boolean mask of rows a sample at ``learner_version`` may return."""
        return ~(self.stale(policy_version, learner_version) | self.exhausted(times_sampled))
