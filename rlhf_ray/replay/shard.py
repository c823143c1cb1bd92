"""One replay shard: a slice of the Experience table in Arrow, plus its bookkeeping.

``ReplayShard`` is a plain Python class (tests use it without Ray); ``ReplayShardActor`` is the
same class as a Ray actor, and ``make_shard_actors`` starts S of them. Storage:

* The immutable columns live in one ``pyarrow.Table``, rows in insertion order. Each insert is
  appended as new chunks and the table is compacted into one chunk once it has many.
* The columns that change after insertion, ``times_sampled`` and ``priority``, live in numpy
  arrays beside the table, together with copies of ``policy_version`` and ``inserted_at`` for
  the masks. They are written into the table only when rows are read (``sample``,
  ``to_table``), so sampling never rewrites Arrow data.
* ``uid`` is the dedup key: a dict maps each stored uid to a monotonically increasing insertion
  sequence number, so a retried insert is a no-op and priorities can be updated by uid.

Every hot path (eligibility, eviction, sampling) is a vectorised numpy mask; Python loops run
only over the uids of newly inserted or evicted rows.

An optional ``RateLimiter`` (``ratelimiter.py``) caps what each call may do: ``try_insert``
stores only the rows the limiter admits and says how many it consumed, ``sample`` returns at
most the admitted number, and rows evicted before they were sampled ``spi`` times are forfeited
to the limiter. The limiter never blocks; ``ReplayClient`` does the waiting.

Left out on purpose: a uid is remembered only while its row is stored, so a retry that arrives
after its row was evicted is stored again. There is no write-ahead log here yet; a shard's
contents are lost with its actor.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.actor import ActorHandle

from rlhf_ray.replay.ratelimiter import RateLimiter
from rlhf_ray.replay.removers import EligibilityRule, FifoRemover, Remover
from rlhf_ray.replay.samplers import Sampler, UniformSampler
from rlhf_ray.types import EXPERIENCE_COLUMNS, EXPERIENCE_SCHEMA, FINISH_REASONS

# Columns the shard mutates after insertion; kept in numpy, not in the stored table.
_MUTABLE_COLUMNS = ("times_sampled", "priority")
_DATA_SCHEMA = pa.schema([f for f in EXPERIENCE_SCHEMA if f.name not in _MUTABLE_COLUMNS])
# Columns whose nulls would break dedup, sharding or the bookkeeping masks.
_NON_NULL_COLUMNS = ("uid", "policy_version", "times_sampled", "priority", "inserted_at")
# Compact the stored table into one chunk once any column has more chunks than this.
_MAX_CHUNKS = 64


def validate_experience_table(table: pa.Table) -> pa.Table:
    """Checks that ``table`` holds Experience rows and returns it in schema column order.

    The columns must be exactly those of ``EXPERIENCE_SCHEMA`` with the same types (their order
    may differ; field nullability and metadata are not compared). Bookkeeping columns must not
    be null, the per-token lists must match ``response_ids`` in length, ``finish_reason`` must
    be known, ``reward`` finite and ``priority`` finite and non-negative.

    Args:
        table: candidate Experience rows (a ``RecordBatch`` is accepted too).

    Returns:
        The same rows with columns in ``EXPERIENCE_SCHEMA`` order and exactly its schema.

    Raises:
        ValueError: naming the first offending column (and, for row checks, the uid).
    """
    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    if not isinstance(table, pa.Table):
        raise ValueError(f"expected a pyarrow.Table of Experience rows, got {type(table)!r}")
    names = set(table.column_names)
    missing = [c for c in EXPERIENCE_COLUMNS if c not in names]
    if missing:
        raise ValueError(f"experience table is missing column(s) {missing}")
    extra = [c for c in table.column_names if c not in EXPERIENCE_COLUMNS]
    if extra:
        raise ValueError(f"experience table has unknown column(s) {extra}")
    if len(table.column_names) != len(names):
        raise ValueError(f"experience table has duplicate column names {table.column_names}")
    for field in EXPERIENCE_SCHEMA:
        got = table.schema.field(field.name).type
        if not got.equals(field.type):
            raise ValueError(
                f"experience column {field.name!r} has type {got}, expected {field.type}"
            )
    table = pa.Table.from_arrays(
        [table.column(c) for c in EXPERIENCE_COLUMNS], schema=EXPERIENCE_SCHEMA
    )
    if table.num_rows == 0:
        return table

    def first_uid(mask: pa.ChunkedArray | pa.Array) -> str:
        return str(table.column("uid").filter(mask)[0])

    for name in _NON_NULL_COLUMNS:
        if table.column(name).null_count:
            nulls = table.column(name).null_count
            raise ValueError(f"experience column {name!r} has {nulls} null(s)")
    n_tokens = pc.list_value_length(table.column("response_ids"))
    for name in ("behavior_logprobs", "ref_logprobs"):
        bad = pc.fill_null(pc.not_equal(pc.list_value_length(table.column(name)), n_tokens), True)
        if pc.any(bad).as_py():
            raise ValueError(
                f"experience column {name!r} differs in length from 'response_ids' "
                f"(first uid {first_uid(bad)})"
            )
    known = pc.is_in(table.column("finish_reason"), value_set=pa.array(FINISH_REASONS))
    bad = pc.invert(pc.fill_null(known, False))
    if pc.any(bad).as_py():
        raise ValueError(
            f"experience column 'finish_reason' must be one of {FINISH_REASONS} "
            f"(first uid {first_uid(bad)})"
        )
    bad = pc.invert(pc.fill_null(pc.is_finite(table.column("reward")), False))
    if pc.any(bad).as_py():
        raise ValueError(f"experience column 'reward' is not finite (first uid {first_uid(bad)})")
    priority = table.column("priority")
    bad = pc.invert(pc.and_(pc.is_finite(priority), pc.greater_equal(priority, 0.0)))
    if pc.any(bad).as_py():
        raise ValueError(
            f"experience column 'priority' must be finite and >= 0 (first uid {first_uid(bad)})"
        )
    return table


class ReplayShard:
    """A slice of the replay buffer: Arrow rows, a sampler, a remover and an eligibility rule.

    Args:
        capacity: the most rows this shard keeps; beyond it the remover evicts.
        max_staleness: largest ``learner_version - policy_version`` a sampled row may have;
            staler rows are evicted at sample time. ``None``: no limit.
        max_times_sampled: a row is returned by at most this many samples. ``None``: no limit.
        seed: seed of the default ``UniformSampler``.
        sampler: replaces the default ``UniformSampler(seed)``.
        remover: replaces the default ``FifoRemover(capacity)``; its capacity wins.
        rate_limiter: when given, inserts and samples keep its samples-per-insert ratio.
    """

    def __init__(
        self,
        *,
        capacity: int,
        max_staleness: int | None = None,
        max_times_sampled: int | None = None,
        seed: int | None = 0,
        sampler: Sampler | None = None,
        remover: Remover | None = None,
        rate_limiter: RateLimiter | None = None,
    ) -> None:
        self._limiter = rate_limiter
        self._remover: Remover = remover if remover is not None else FifoRemover(capacity)
        self._sampler: Sampler = sampler if sampler is not None else UniformSampler(seed)
        self._rule = EligibilityRule(max_staleness, max_times_sampled)

        # Storage: immutable columns in Arrow, bookkeeping in numpy, all in insertion order.
        self._data = _DATA_SCHEMA.empty_table()
        self._times_sampled = np.empty(0, dtype=np.int64)
        self._priority = np.empty(0, dtype=np.float64)
        self._policy_version = np.empty(0, dtype=np.int64)
        self._inserted_at = np.empty(0, dtype=np.float64)
        self._seq = np.empty(0, dtype=np.int64)  # ascending insertion sequence numbers
        self._seq_of_uid: dict[str, int] = {}
        self._next_seq = 0

        # Lifetime counters, reported by stats().
        self._inserted = 0
        self._duplicates = 0
        self._evicted_fifo = 0
        self._evicted_stale = 0
        self._sampled = 0

    # ---- writes

    def insert(self, table: pa.Table) -> int:
        """Stores Experience rows whose uid is not stored yet; evicts beyond capacity.

        A bad table raises before anything changes, so stored rows are never lost to it. Rows
        whose uid is already stored (or repeated within ``table``) are skipped: retrying an
        insert is a no-op. With a rate limiter, rows beyond its allowance are not stored; use
        ``try_insert`` to learn how many were.

        Args:
            table: rows with exactly the ``EXPERIENCE_SCHEMA`` columns.

        Returns:
            How many rows were new. When the shard is full of rows newer than these, some of
            them may be evicted again at once (counted in ``evicted_fifo``).

        Raises:
            ValueError: the table does not match the schema; the message names the column.
        """
        return self.try_insert(table)[1]

    def try_insert(self, table: pa.Table) -> tuple[int, int]:
        """Like ``insert``, but stops where the rate limiter's allowance ends.

        Duplicates of stored uids cost no allowance. The rows are taken in table order, so a
        caller resends ``table.slice(consumed)`` later.

        Returns:
            ``(consumed, new)``: the first ``consumed`` rows of ``table`` were handled (stored,
            or skipped as duplicates), ``new`` of them stored.
        """
        table = validate_experience_table(table)
        if table.num_rows == 0:
            return 0, 0
        allowance = self._limiter.insert_allowance() if self._limiter is not None else None

        # Dedup against stored uids and within the batch (first occurrence wins).
        keep: list[int] = []
        batch_uids: dict[str, int] = {}
        consumed = table.num_rows
        for i, uid in enumerate(table.column("uid").to_pylist()):
            if uid in self._seq_of_uid or uid in batch_uids:
                continue
            if allowance is not None and len(keep) >= allowance:
                consumed = i
                break
            batch_uids[uid] = self._next_seq + len(keep)
            keep.append(i)
        self._duplicates += consumed - len(keep)
        if not keep:
            return consumed, 0
        # take() copies into buffers this shard owns, so no object-store memory stays pinned.
        new = table.take(pa.array(keep, type=pa.int64()))

        self._data = pa.concat_tables([self._data, new.select(_DATA_SCHEMA.names)])
        if self._data.num_rows and self._data.column(0).num_chunks > _MAX_CHUNKS:
            self._data = self._data.combine_chunks()
        self._times_sampled = np.concatenate([self._times_sampled, _np(new, "times_sampled")])
        self._priority = np.concatenate([self._priority, _np(new, "priority")])
        self._policy_version = np.concatenate([self._policy_version, _np(new, "policy_version")])
        self._inserted_at = np.concatenate([self._inserted_at, _np(new, "inserted_at")])
        seqs = np.arange(self._next_seq, self._next_seq + len(keep), dtype=np.int64)
        self._seq = np.concatenate([self._seq, seqs])
        self._seq_of_uid.update(batch_uids)
        self._next_seq += len(keep)
        self._inserted += len(keep)
        if self._limiter is not None:
            self._limiter.record_insert(len(keep))

        evict = np.unique(self._remover.select_evictions(self._inserted_at))
        if evict.size:
            self._remove(evict)
            self._evicted_fifo += int(evict.size)
        return consumed, len(keep)

    def update_priorities(self, uids: list[str], priorities: list[float]) -> int:
        """Sets the ``priority`` of stored rows by uid; uids not stored are skipped.

        Args:
            uids: row uids.
            priorities: one finite, non-negative priority per uid.

        Returns:
            How many stored rows were updated.

        Raises:
            ValueError: lengths differ, or a priority is negative or not finite.
        """
        values = np.asarray(priorities, dtype=np.float64)
        if values.shape != (len(uids),):
            raise ValueError(f"got {len(uids)} uids but {values.size} priorities")
        if not np.all(np.isfinite(values) & (values >= 0)):
            raise ValueError("priorities must be finite and >= 0")
        found = [(self._seq_of_uid[u], i) for i, u in enumerate(uids) if u in self._seq_of_uid]
        if not found:
            return 0
        seqs, which = (np.asarray(x, dtype=np.int64) for x in zip(*found))
        self._priority[np.searchsorted(self._seq, seqs)] = values[which]
        return len(found)

    # ---- reads

    def sample(self, n: int, learner_version: int) -> pa.Table:
        """Returns up to ``n`` distinct eligible rows and counts them as sampled once more.

        Rows staler than ``max_staleness`` are evicted first (counted in ``evicted_stale``).

        Args:
            n: rows wanted; fewer come back when fewer are eligible.
            learner_version: the learner's current policy version.

        Returns:
            An Experience table whose ``times_sampled`` already includes this sample. With a
            rate limiter, at most its sample allowance of rows.
        """
        self._evict_stale(learner_version)
        eligible = np.flatnonzero(
            self._rule.eligible(self._policy_version, self._times_sampled, learner_version)
        )
        if self._limiter is not None:
            n = min(int(n), self._limiter.sample_allowance())
        chosen = self._sampler.sample(eligible, n, self._priority[eligible])
        self._times_sampled[chosen] += 1
        self._sampled += int(chosen.size)
        if self._limiter is not None:
            self._limiter.record_sample(int(chosen.size))
        return self._rows(chosen)

    def summary(self, learner_version: int) -> dict[str, Any]:
        """What a sample at ``learner_version`` could get now; evicts nothing.

        Returns:
            ``eligible`` (rows), ``mass`` (sum of the sampler's weights over eligible rows),
            ``sample_allowance`` and ``insert_allowance`` (the rate limiter's; ``None``
            without one) and ``size``.
        """
        mask = self._rule.eligible(self._policy_version, self._times_sampled, learner_version)
        limiter = self._limiter
        return {
            "eligible": int(np.count_nonzero(mask)),
            "mass": float(self._sampler.weights(self._priority[mask]).sum()),
            "sample_allowance": limiter.sample_allowance() if limiter is not None else None,
            "insert_allowance": limiter.insert_allowance() if limiter is not None else None,
            "size": self.size(),
        }

    def num_eligible(self, learner_version: int) -> int:
        """How many rows a sample at ``learner_version`` could return now (evicts nothing)."""
        mask = self._rule.eligible(self._policy_version, self._times_sampled, learner_version)
        return int(np.count_nonzero(mask))

    def size(self) -> int:
        """How many rows are stored."""
        return int(self._seq.size)

    def stats(self, learner_version: int) -> dict[str, Any]:
        """Current state and lifetime counters of this shard.

        Args:
            learner_version: the version staleness and eligibility are measured against.

        Returns:
            ``size``, ``capacity``, ``eligible``, ``stale`` and ``exhausted`` (stored rows now
            stale / sampled ``max_times_sampled`` times), ``staleness_mean``,
            ``staleness_max`` and ``times_sampled_mean`` over stored rows (0 when empty), and
            the lifetime counters ``inserted``, ``duplicates``, ``evicted_fifo``,
            ``evicted_stale`` and ``sampled`` (rows returned by samples).
        """
        size = self.size()
        staleness = learner_version - self._policy_version
        stale = self._rule.stale(self._policy_version, learner_version)
        exhausted = self._rule.exhausted(self._times_sampled)
        return {
            "size": size,
            "capacity": int(self._remover.capacity),
            "eligible": int(np.count_nonzero(~(stale | exhausted))),
            "stale": int(np.count_nonzero(stale)),
            "exhausted": int(np.count_nonzero(exhausted & ~stale)),
            "staleness_mean": float(staleness.mean()) if size else 0.0,
            "staleness_max": int(staleness.max()) if size else 0,
            "times_sampled_mean": float(self._times_sampled.mean()) if size else 0.0,
            "inserted": self._inserted,
            "duplicates": self._duplicates,
            "evicted_fifo": self._evicted_fifo,
            "evicted_stale": self._evicted_stale,
            "sampled": self._sampled,
            **({f"limiter_{k}": v for k, v in self._limiter.stats().items()}
               if self._limiter is not None else {}),
        }

    def to_table(self) -> pa.Table:
        """All stored rows in insertion order, with current bookkeeping, for export."""
        return self._rows(None)

    # ---- internals

    def _rows(self, positions: np.ndarray | None) -> pa.Table:
        """Materialises stored rows (all when ``positions`` is None) as an Experience table."""
        if positions is None:
            data, times_sampled, priority = self._data, self._times_sampled, self._priority
        else:
            data = self._data.take(pa.array(positions, type=pa.int64()))
            times_sampled, priority = self._times_sampled[positions], self._priority[positions]
        mutable = {
            "times_sampled": pa.array(times_sampled, type=pa.int64()),
            "priority": pa.array(priority, type=pa.float64()),
        }
        columns = [mutable[c] if c in mutable else data.column(c) for c in EXPERIENCE_COLUMNS]
        return pa.Table.from_arrays(columns, schema=EXPERIENCE_SCHEMA)

    def _evict_stale(self, learner_version: int) -> None:
        stale = np.flatnonzero(self._rule.stale(self._policy_version, learner_version))
        if stale.size:
            self._remove(stale)
            self._evicted_stale += int(stale.size)

    def _remove(self, positions: np.ndarray) -> None:
        """Drops the rows at ``positions`` (ascending, distinct) from all storage."""
        if self._limiter is not None:
            self._limiter.forfeit(self._times_sampled[positions])
        gone = self._data.column("uid").take(pa.array(positions, type=pa.int64()))
        for uid in gone.to_pylist():
            del self._seq_of_uid[uid]
        if positions[-1] == positions.size - 1:
            # The oldest rows (FIFO's usual case, positions ascending): a zero-copy slice.
            keep: slice | np.ndarray = slice(positions.size, None)
            self._data = self._data.slice(positions.size)
        else:
            keep = np.ones(self._seq.size, dtype=bool)
            keep[positions] = False
            self._data = self._data.filter(pa.array(keep))
        if self._data.num_rows and self._data.column(0).num_chunks > _MAX_CHUNKS:
            self._data = self._data.combine_chunks()
        self._times_sampled = self._times_sampled[keep]
        self._priority = self._priority[keep]
        self._policy_version = self._policy_version[keep]
        self._inserted_at = self._inserted_at[keep]
        self._seq = self._seq[keep]


def _np(table: pa.Table, name: str) -> np.ndarray:
    """One non-null numeric column as a numpy array this shard owns."""
    return np.array(table.column(name).to_numpy(), copy=True)


# The shard as a Ray actor. Calls run one at a time per shard; tables travel by value.
ReplayShardActor = ray.remote(num_cpus=0)(ReplayShard)


def make_shard_actors(
    num_shards: int,
    *,
    capacity: int,
    max_staleness: int | None,
    max_times_sampled: int | None,
    seed: int,
    name_prefix: str | None = None,
    num_cpus: float = 0,
    sampler: str = "uniform",
    alpha: float = 0.6,
    min_priority: float = 1e-3,
    samples_per_insert: float | None = None,
    min_size_to_sample: int = 1,
    error_buffer: float | None = None,
) -> list[ActorHandle]:
    """Starts ``num_shards`` replay shard actors.

    Args:
        num_shards: how many shards (S); rows are spread over them by uid.
        capacity: rows per shard (the buffer holds up to ``num_shards * capacity``).
        max_staleness: see ``ReplayShard``.
        max_times_sampled: see ``ReplayShard``.
        seed: base seed; shard i samples with seed ``seed + i``.
        name_prefix: when given, shard i is a named actor ``f"{name_prefix}-{i}"``.
        num_cpus: CPUs reserved per shard actor.
        sampler: ``uniform`` or ``prioritized`` (with ``alpha`` and ``min_priority``).
        samples_per_insert: when given, every shard gets a ``RateLimiter`` with this ratio.
        min_size_to_sample: rows the whole buffer must have received before sampling starts;
            each shard waits for its share, ``ceil(min_size_to_sample / S)``.
        error_buffer: the buffer-wide error buffer; each shard gets ``error_buffer / S`` (at
            least ``max(1, samples_per_insert)``), so the buffer-wide ratio stays within it.

    Returns:
        The actor handles, in shard order (pass them to ``ReplayClient``).
    """
    from rlhf_ray.replay.samplers import make_sampler

    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    handles = []
    for i in range(num_shards):
        options: dict[str, Any] = {"num_cpus": num_cpus}
        if name_prefix is not None:
            options["name"] = f"{name_prefix}-{i}"
        limiter = None
        if samples_per_insert is not None:
            floor = max(1.0, float(samples_per_insert))
            per_shard = None if error_buffer is None else max(floor, error_buffer / num_shards)
            limiter = RateLimiter(samples_per_insert, -(-min_size_to_sample // num_shards),
                                  per_shard)
        handles.append(
            ReplayShardActor.options(**options).remote(
                capacity=capacity,
                max_staleness=max_staleness,
                max_times_sampled=max_times_sampled,
                sampler=make_sampler(sampler, alpha=alpha, min_priority=min_priority,
                                     seed=seed + i),
                rate_limiter=limiter,
            )
        )
    return handles
