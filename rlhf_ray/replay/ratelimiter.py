"""The samples-per-insert rate limiter of one replay shard (the rule of DeepMind's Reverb).

With ``spi`` samples per insert, ``inserts`` rows admitted and ``samples`` rows handed out, the
shard keeps ``diff = inserts * spi - samples`` inside ``[min_diff, max_diff]`` where

    min_diff = spi * min_size_to_sample - error_buffer
    max_diff = spi * min_size_to_sample + error_buffer

An insert of one row is admitted while ``diff + spi <= max_diff`` (else the producer, the
generators' side, waits for samples); a sample of one row is admitted once ``inserts >=
min_size_to_sample`` and while ``diff - 1 >= min_diff`` (else the consumer, the learner, waits
for inserts). ``error_buffer >= max(1, spi)`` guarantees one of the two is always admitted, so
the limiter itself cannot deadlock.

Rows that leave the shard before they were sampled ``spi`` times (evicted as stale, or by FIFO
at capacity) can never be sampled again; ``forfeit`` counts their missing samples as done, so a
producer is not held back by samples that can never happen.

The limiter only counts and answers "how many may go now"; it never blocks. Waiting (with a
timeout that names the stalled side) is the caller's job, in ``ReplayClient``.
"""

from __future__ import annotations

import math

import numpy as np


class RateLimiter:
    """Samples-per-insert accounting for one shard.

    Args:
        samples_per_insert: target ratio of rows sampled to rows inserted (> 0).
        min_size_to_sample: rows that must have been inserted before any sample.
        error_buffer: how far ``inserts * spi - samples`` may drift from its target, in rows;
            at least ``max(1, samples_per_insert)``.
    """

    def __init__(self, samples_per_insert: float, min_size_to_sample: int = 1,
                 error_buffer: float | None = None) -> None:
        spi = float(samples_per_insert)
        if not (math.isfinite(spi) and spi > 0):
            raise ValueError(f"samples_per_insert must be finite and > 0, got {samples_per_insert}")
        if min_size_to_sample < 1:
            raise ValueError(f"min_size_to_sample must be >= 1, got {min_size_to_sample}")
        eb = max(1.0, spi) if error_buffer is None else float(error_buffer)
        if not (math.isfinite(eb) and eb >= max(1.0, spi)):
            raise ValueError(
                f"error_buffer must be >= max(1, samples_per_insert) = {max(1.0, spi):g}, got "
                f"{error_buffer}"
            )
        self.samples_per_insert = spi
        self.min_size_to_sample = int(min_size_to_sample)
        self.error_buffer = eb
        self.min_diff = spi * self.min_size_to_sample - eb
        self.max_diff = spi * self.min_size_to_sample + eb
        self.inserts = 0
        self.samples = 0.0  # float: forfeits of a fractional spi are fractional

    @property
    def diff(self) -> float:
        return self.inserts * self.samples_per_insert - self.samples

    def insert_allowance(self, owed_by_leaving: float = 0.0) -> int:
        """How many rows may be inserted now.

        Args:
            owed_by_leaving: samples still expected from rows that are about to leave unsampled
                (stale, not yet evicted); they count as forfeited already.
        """
        room = (self.max_diff - self.diff + owed_by_leaving) / self.samples_per_insert
        return max(0, math.floor(room + 1e-9))

    def sample_allowance(self) -> int:
        """How many rows may be sampled now."""
        if self.inserts < self.min_size_to_sample:
            return 0
        return max(0, math.floor(self.diff - self.min_diff + 1e-9))

    def record_insert(self, n: int) -> None:
        self.inserts += int(n)

    def record_sample(self, n: int) -> None:
        self.samples += float(n)

    def forfeit(self, times_sampled: np.ndarray) -> None:
        """Counts the samples that rows leaving the shard with ``times_sampled`` will never get."""
        missing = np.maximum(self.samples_per_insert - np.asarray(times_sampled, float), 0.0)
        self.samples += float(missing.sum())

    def stats(self) -> dict:
        return {
            "inserts": self.inserts,
            "samples": self.samples,
            "ratio": self.samples / self.inserts if self.inserts else 0.0,
            "insert_allowance": self.insert_allowance(),
            "sample_allowance": self.sample_allowance(),
        }

    def state_dict(self) -> dict:
        return {"inserts": self.inserts, "samples": self.samples}

    def load_state_dict(self, state: dict) -> None:
        self.inserts = int(state["inserts"])
        self.samples = float(state["samples"])
