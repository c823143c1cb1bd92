"""Samplers: which of a shard's eligible rows a sample returns.

A sampler sees only row positions and their priorities, never the Arrow data, so a shard can
swap strategies without touching storage. ``UniformSampler`` draws without replacement, each
eligible row equally likely. The ``priorities`` argument is the seam for a prioritized sampler
(the ``priority`` column of the Experience schema): uniform sampling ignores it.

Not here yet: prioritized sampling and the importance weights it would have to return.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Sampler(Protocol):
    """Picks up to ``n`` distinct positions out of ``candidates``."""

    def sample(
        self, candidates: np.ndarray | int, n: int, priorities: np.ndarray | None = None
    ) -> np.ndarray:
        """Chooses rows without replacement.

        Args:
            candidates: positions of the eligible rows (1-D integer array), or a count ``k``
                meaning positions ``0..k-1``.
            n: how many rows are wanted; fewer come back when fewer exist.
            priorities: one non-negative priority per candidate, aligned with
                ``candidates``; samplers that do not use priorities ignore it.

        Returns:
            A 1-D int64 array of ``min(n, len(candidates))`` distinct positions taken from
            ``candidates``.
        """
        ...


def _as_positions(candidates: np.ndarray | int) -> np.ndarray:
    if isinstance(candidates, (int, np.integer)):
        if candidates < 0:
            raise ValueError(f"candidate count must be >= 0, got {candidates}")
        return np.arange(int(candidates), dtype=np.int64)
    positions = np.asarray(candidates)
    if positions.ndim != 1:
        raise ValueError(f"candidates must be 1-D, got shape {positions.shape}")
    return positions.astype(np.int64, copy=False)


class UniformSampler:
    """Uniform sampling without replacement, reproducible from ``seed``.

    Args:
        seed: seed of the sampler's own random generator; two samplers with the same seed and
            the same call sequence return the same positions.
    """

    def __init__(self, seed: int | None = 0) -> None:
        self.seed = seed
        self._rng = np.random.default_rng(seed)

    def sample(
        self, candidates: np.ndarray | int, n: int, priorities: np.ndarray | None = None
    ) -> np.ndarray:
        """Draws ``min(n, len(candidates))`` distinct positions, each equally likely.

        Args:
            candidates: eligible positions, or their count.
            n: rows wanted.
            priorities: ignored (uniform sampling).

        Returns:
            The chosen positions, in random order.
        """
        positions = _as_positions(candidates)
        k = min(max(int(n), 0), positions.size)
        if k == 0:
            return np.empty(0, dtype=np.int64)
        if k == positions.size:
            return self._rng.permutation(positions)
        return self._rng.choice(positions, size=k, replace=False, shuffle=True)
