"""Samplers: which of a shard's eligible rows a sample returns.

A sampler sees only row positions and their priorities, never the Arrow data, so a shard can
swap strategies without touching storage.

* ``UniformSampler`` draws without replacement, each eligible row equally likely.
* ``FifoSampler`` returns the oldest eligible rows (Reverb's FIFO selector). With a replay
  ratio k and rows that may be drawn k times, every row is used in its first k chances, before
  it can go stale, so no generated sample is wasted; its importance weights are all 1.
* ``PrioritizedSampler`` draws row i with probability ``P(i) = w_i / sum_j w_j`` where
  ``w_i = max(priority_i, min_priority) ** alpha`` (Schaul et al., prioritized experience
  replay, proportional variant). A batch of k rows is k such draws without replacement
  (Efraimidis-Spirakis keys), so one row never appears twice in a batch; for k = 1 the draw is
  exactly ``P``. ``importance_weights`` gives the correction ``(N * P(i)) ** -beta``, divided by
  its batch maximum so weights only ever scale the loss down.

A sampler's only state is its random generator; ``state_dict``/``load_state_dict`` save and
restore it, so a restored shard continues the same random stream.
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

    def weights(self, priorities: np.ndarray) -> np.ndarray:
        """Unnormalised sampling weight of each row (all ones for uniform sampling)."""
        ...

    def state_dict(self) -> dict:
        """JSON-serialisable state (the random generator's)."""
        ...

    def load_state_dict(self, state: dict) -> None:
        """Restores a state from ``state_dict``."""
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

    def weights(self, priorities: np.ndarray) -> np.ndarray:
        """Every row weighs 1."""
        return np.ones(np.shape(priorities), dtype=np.float64)

    def state_dict(self) -> dict:
        return {"kind": "uniform", "rng": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self._rng.bit_generator.state = state["rng"]


class FifoSampler:
    """The ``n`` eligible rows inserted first; deterministic, no random state."""

    def sample(
        self, candidates: np.ndarray | int, n: int, priorities: np.ndarray | None = None
    ) -> np.ndarray:
        """The first ``min(n, len(candidates))`` candidates in insertion order.

        Args:
            candidates: eligible positions (ascending positions are insertion order), or their
                count.
            n: rows wanted.
            priorities: ignored.
        """
        positions = np.sort(_as_positions(candidates))
        return positions[: min(max(int(n), 0), positions.size)]

    def weights(self, priorities: np.ndarray) -> np.ndarray:
        """Every row weighs 1."""
        return np.ones(np.shape(priorities), dtype=np.float64)

    def state_dict(self) -> dict:
        return {"kind": "fifo"}

    def load_state_dict(self, state: dict) -> None:
        pass


class PrioritizedSampler:
    """Proportional prioritized sampling without replacement within a batch.

    Args:
        alpha: priority exponent; 0 is uniform, 1 fully proportional.
        min_priority: priorities below this count as this, so no row is starved for ever.
        seed: seed of the sampler's own random generator.
    """

    def __init__(self, alpha: float = 0.6, min_priority: float = 1e-3, seed: int | None = 0):
        if not (np.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"alpha must be finite and >= 0, got {alpha}")
        if not (np.isfinite(min_priority) and min_priority > 0):
            raise ValueError(f"min_priority must be finite and > 0, got {min_priority}")
        self.alpha = float(alpha)
        self.min_priority = float(min_priority)
        self.seed = seed
        self._rng = np.random.default_rng(seed)

    def weights(self, priorities: np.ndarray) -> np.ndarray:
        """``max(priority, min_priority) ** alpha`` per row."""
        p = np.maximum(np.asarray(priorities, dtype=np.float64), self.min_priority)
        return p**self.alpha

    def sample(
        self, candidates: np.ndarray | int, n: int, priorities: np.ndarray | None = None
    ) -> np.ndarray:
        """Draws ``min(n, len(candidates))`` distinct positions, proportional to the weights.

        Args:
            candidates: eligible positions, or their count.
            n: rows wanted.
            priorities: one priority per candidate (required).

        Returns:
            The chosen positions, highest key first.
        """
        positions = _as_positions(candidates)
        k = min(max(int(n), 0), positions.size)
        if k == 0:
            return np.empty(0, dtype=np.int64)
        if priorities is None or np.shape(priorities) != positions.shape:
            raise ValueError("PrioritizedSampler needs one priority per candidate")
        w = self.weights(priorities)
        # Efraimidis-Spirakis: the k largest keys log(u) / w are k sequential draws without
        # replacement, each proportional to the weights of the rows not drawn yet.
        keys = np.log(self._rng.random(positions.size)) / w
        if k == positions.size:
            order = np.argsort(-keys, kind="stable")
        else:
            top = np.argpartition(-keys, k - 1)[:k]
            order = top[np.argsort(-keys[top], kind="stable")]
        return positions[order]

    def state_dict(self) -> dict:
        return {"kind": "prioritized", "rng": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self._rng.bit_generator.state = state["rng"]


def importance_weights(probabilities: np.ndarray, beta: float) -> np.ndarray:
    """Prioritized-replay importance weights ``(N * P(i)) ** -beta / max_j (N * P(j)) ** -beta``.

    N (the number of eligible rows) cancels in the ratio, so it is not an argument.

    Args:
        probabilities: ``P(i)`` of each sampled row: its single-draw probability over all
            eligible rows of the buffer.
        beta: correction exponent; 0 gives all ones, 1 the full correction.

    Returns:
        One weight per row in (0, 1]; the batch's least likely row gets 1.
    """
    probs = np.asarray(probabilities, dtype=np.float64)
    if probs.size == 0:
        return probs
    if not np.all((probs > 0) & np.isfinite(probs)):
        raise ValueError("sampling probabilities must be finite and > 0")
    # log space: (N P)^-beta / max(...) = exp(-beta * (log P - min log P))
    logp = np.log(probs)
    return np.exp(-float(beta) * (logp - logp.min()))


def annealed_beta(beta0: float, step: int, total_steps: int) -> float:
    """``beta`` annealed linearly from ``beta0`` at step 0 to 1 at ``total_steps``."""
    if total_steps <= 0:
        return 1.0
    frac = min(max(step / total_steps, 0.0), 1.0)
    return float(beta0 + (1.0 - beta0) * frac)


def make_sampler(kind: str, *, alpha: float = 0.6, min_priority: float = 1e-3,
                 seed: int | None = 0) -> Sampler:
    """``uniform``, ``fifo`` or ``prioritized``."""
    if kind == "uniform":
        return UniformSampler(seed)
    if kind == "fifo":
        return FifoSampler()
    if kind == "prioritized":
        return PrioritizedSampler(alpha=alpha, min_priority=min_priority, seed=seed)
    raise ValueError(f"unknown sampler {kind!r}: expected 'uniform', 'fifo' or 'prioritized'")
