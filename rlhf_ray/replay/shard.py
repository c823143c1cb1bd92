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

Durability (``directory=``): every call that changes the shard (``try_insert``/``insert``,
``sample``, ``update_priorities``) appends one record to a write-ahead log before it returns, and
every ``snapshot_every`` such calls the rows are written as a Parquet snapshot and the log starts
over; ``storage.py`` describes the files. A shard built on a directory that holds a snapshot or a
log recovers from it: it loads the newest snapshot and replays the log (inserts through the same
insert code, samples by their recorded uids and sampler state, priority updates as given), so it
equals the shard that wrote it in rows and their order, ``times_sampled``, ``priority``, every
counter, the limiter's counts and the next sample. Replayed calls are not logged again. A call
that changes nothing (an empty or rejected insert, a sample that returns and evicts nothing, a
priority update that finds no stored uid) writes no record. Records survive a kill of the process
once written; ``fsync=True`` also syncs each record and snapshot to the device, for machine
crashes. The configuration (capacity, eligibility rule, sampler and limiter parameters) is stored
with the data and must be the same when the directory is opened again. If a log write fails the
shard refuses further changes (its memory is ahead of its log); a new shard on the directory
recovers the logged state. Internal insertion sequence numbers are renumbered on recovery from a
snapshot (they only order rows and are not visible).

Left out on purpose: a uid is remembered only while its row is stored, so a retry that arrives
after its row was evicted is stored again.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.actor import ActorHandle

from rlhf_ray.replay import storage
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
_COUNTERS = ("inserted", "duplicates", "evicted_fifo", "evicted_stale", "sampled")
# How long a durable shard waits for its directory's lock: a restarted actor may start while the
# dead process it replaces is still being torn down.
_LOCK_WAIT_S = 10.0

log = logging.getLogger(__name__)


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
        directory: makes the shard durable in this directory (created if missing), recovering
            what it holds; ``None``: in memory only. One live shard per directory: its
            ``LOCK`` file is held until ``close`` or the process's end, and a second shard waits
            up to 10 s for it.
        snapshot_every: with ``directory``, write a snapshot and start a new log after this
            many logged calls.
        fsync: with ``directory``, also ``os.fsync`` every log record and snapshot.

    Raises:
        ValueError: ``directory`` was written with another configuration, or its files are
            inconsistent.
        RuntimeError: another live shard holds ``directory``.
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
        directory: str | os.PathLike | None = None,
        snapshot_every: int = 1000,
        fsync: bool = False,
    ) -> None:
        if int(snapshot_every) < 1:
            raise ValueError(f"snapshot_every must be >= 1, got {snapshot_every}")
        self._limiter = rate_limiter
        self._seen_version: int | None = None  # newest learner version seen (not persisted)
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

        # Durability (all unused without a directory).
        self._directory: Path | None = None
        self._snapshot_every = int(snapshot_every)
        self._fsync = bool(fsync)
        self._wal: storage.WalWriter | None = None
        self._lock_fd: int | None = None
        self._generation = 0
        self._ops = 0  # calls logged so far: the next log record's seq
        self._ops_since_snapshot = 0
        self._snapshots = 0
        self._failed: str | None = None  # why this shard refuses changes, once it does
        if directory is not None:
            self._open(Path(directory).absolute())

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
        self._check_writable()
        consumed, new = self._apply_insert(table)
        if self._wal is not None and consumed:
            self._log(storage.encode_insert(self._ops, table.slice(0, consumed)))
        return consumed, new

    def _apply_insert(self, table: pa.Table, *, admit_all: bool = False) -> tuple[int, int]:
        """``try_insert`` on a validated, non-empty table, without logging.

        ``admit_all`` (log replay) stores every new row: the log holds only rows that the
        limiter admitted when they were first inserted.
        """
        allowance = None
        if self._limiter is not None and not admit_all:
            allowance = self._limiter.insert_allowance(self._owed_by_stale())

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
        self._check_writable()
        uids = list(uids)
        updated = self._apply_priorities(uids, values)
        if self._wal is not None and updated:
            self._log(storage.encode_priorities(self._ops, uids, values.tolist()))
        return updated

    def _apply_priorities(self, uids: list[str], values: np.ndarray) -> int:
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
        self._check_writable()
        learner_version = int(learner_version)
        self._seen_version = max(self._seen_version or 0, learner_version)
        evicted = self._evict_stale(learner_version)
        eligible = np.flatnonzero(
            self._rule.eligible(self._policy_version, self._times_sampled, learner_version)
        )
        if self._limiter is not None:
            n = min(int(n), self._limiter.sample_allowance())
        chosen = self._sampler.sample(eligible, n, self._priority[eligible])
        self._mark_sampled(chosen)
        rows = self._rows(chosen)
        if self._wal is not None and (chosen.size or evicted):
            uids = rows.column("uid").combine_chunks()
            self._log(storage.encode_sample(self._ops, learner_version, uids,
                                            self._sampler.state_dict()))
        return rows

    def _mark_sampled(self, positions: np.ndarray) -> None:
        self._times_sampled[positions] += 1
        self._sampled += int(positions.size)
        if self._limiter is not None:
            self._limiter.record_sample(int(positions.size))

    def _owed_by_stale(self) -> float:
        """Samples the limiter still expects from rows already stale at the newest learner
        version this shard has seen: they are evicted (and forfeited) only at the next sample,
        but must not hold inserts back meanwhile (the learner may be waiting for those very
        inserts)."""
        if self._limiter is None or self._seen_version is None:
            return 0.0
        stale = self._rule.stale(self._policy_version, self._seen_version)
        if not stale.any():
            return 0.0
        owed = self._limiter.samples_per_insert - self._times_sampled[stale]
        return float(np.maximum(owed, 0.0).sum())

    def summary(self, learner_version: int) -> dict[str, Any]:
        """What a sample at ``learner_version`` could get now; evicts nothing.

        Returns:
            ``eligible`` (rows), ``mass`` (sum of the sampler's weights over eligible rows),
            ``sample_allowance`` and ``insert_allowance`` (the rate limiter's; ``None``
            without one) and ``size``.
        """
        self._seen_version = max(self._seen_version or 0, int(learner_version))
        mask = self._rule.eligible(self._policy_version, self._times_sampled, learner_version)
        limiter = self._limiter
        return {
            "eligible": int(np.count_nonzero(mask)),
            "mass": float(self._sampler.weights(self._priority[mask]).sum()),
            "sample_allowance": limiter.sample_allowance() if limiter is not None else None,
            "insert_allowance": (limiter.insert_allowance(self._owed_by_stale())
                                 if limiter is not None else None),
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
            ``evicted_stale`` and ``sampled`` (rows returned by samples). With a rate limiter,
            its stats prefixed ``limiter_``. When durable, ``wal_bytes`` (size of the current
            log segment) and ``snapshots`` (snapshots taken in the shard's life).
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
            **({"wal_bytes": self._wal.size, "snapshots": self._snapshots}
               if self._wal is not None else {}),
        }

    def checkpoint(self, tag: str, keep: list[str] | None = None) -> dict[str, Any]:
        """Snapshots now and keeps that snapshot as checkpoint ``tag`` (durable shards only).

        Args:
            tag: the checkpoint's name (a run uses ``step-<N>``).
            keep: when given, checkpoints whose tag is neither ``tag`` nor in ``keep`` are
                deleted.

        Returns:
            ``rows``, ``inserted`` (lifetime counter) and ``generation`` at the checkpoint.

        Raises:
            RuntimeError: an in-memory shard, or one that accepts no changes.
            OSError: the snapshot could not be written (the previous checkpoints stay).
        """
        if self._directory is None:
            raise RuntimeError("an in-memory replay shard has no checkpoints")
        self._check_writable()
        before = self._generation
        self._snapshot()
        if self._generation == before:
            raise OSError(f"{self._directory}: the snapshot for checkpoint {tag!r} failed "
                          "(see the shard's log)")
        storage.save_checkpoint(self._directory, self._generation, tag, fsync=self._fsync)
        if keep is not None:
            storage.drop_checkpoints(self._directory, {tag, *keep})
        return {"rows": self.size(), "inserted": self._inserted, "generation": self._generation}

    def to_table(self) -> pa.Table:
        """All stored rows in insertion order, with current bookkeeping, for export."""
        return self._rows(None)

    def pid(self) -> int:
        """The id of the process holding this shard (for tests and operations)."""
        return os.getpid()

    def close(self) -> None:
        """Closes the log and releases the directory; afterwards changes raise. Idempotent."""
        if self._wal is not None:
            self._wal.close()
            self._failed = self._failed or "it was closed"
        if self._lock_fd is not None:
            storage.unlock_directory(self._lock_fd)
            self._lock_fd = None

    def state_meta(self) -> dict[str, Any]:
        """Everything but the rows that recovery restores, as stored in a snapshot's meta."""
        return {
            "format": storage.FORMAT_VERSION,
            "generation": self._generation,
            "ops": self._ops,
            "snapshots": self._snapshots,
            "rows": self.size(),
            "next_seq": self._next_seq,
            "counters": {name: getattr(self, f"_{name}") for name in _COUNTERS},
            "sampler": self._sampler.state_dict(),
            "rate_limiter": self._limiter.state_dict() if self._limiter is not None else None,
            "config": self._config(),
        }

    # ---- durability

    def _config(self) -> dict[str, Any]:
        """The parameters a replay depends on (JSON-ready)."""
        sampler_state = self._sampler.state_dict()
        limiter = self._limiter
        return {
            "capacity": int(self._remover.capacity),
            "remover": type(self._remover).__name__,
            "max_staleness": self._rule.max_staleness,
            "max_times_sampled": self._rule.max_times_sampled,
            "sampler": {
                "kind": sampler_state.get("kind", type(self._sampler).__name__),
                "alpha": getattr(self._sampler, "alpha", None),
                "min_priority": getattr(self._sampler, "min_priority", None),
            },
            "rate_limiter": None if limiter is None else {
                "samples_per_insert": limiter.samples_per_insert,
                "min_size_to_sample": limiter.min_size_to_sample,
                "error_buffer": limiter.error_buffer,
            },
        }

    def _open(self, directory: Path) -> None:
        """Takes ``directory``, recovers its state and opens the log for appending."""
        directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = storage.lock_directory(directory, wait_s=_LOCK_WAIT_S)
        try:
            recovered = storage.recover(directory)
            if recovered.meta is not None:
                stored = recovered.meta["config"]
                current = json.loads(json.dumps(self._config()))
                if stored != current:
                    differ = sorted(k for k in set(stored) | set(current)
                                    if stored.get(k) != current.get(k))
                    raise ValueError(
                        f"replay shard directory {directory} was written with another "
                        f"configuration (differs in {differ}: stored "
                        f"{ {k: stored.get(k) for k in differ} }, given "
                        f"{ {k: current.get(k) for k in differ} })"
                    )
            self._restore(recovered)
            self._directory = directory
            storage.remove_stale_files(directory, recovered.generation)
            path = storage.wal_path(directory, recovered.generation)
            if recovered.wal_exists:
                if recovered.torn_bytes:
                    log.warning("%s: dropping a torn last record (%d bytes)", path,
                                recovered.torn_bytes)
                self._wal = storage.WalWriter.reopen(path, recovered.wal_bytes,
                                                     fsync=self._fsync)
            else:
                self._wal = storage.WalWriter.create(path, self.state_meta(), fsync=self._fsync)
        except BaseException:
            storage.unlock_directory(self._lock_fd)
            self._lock_fd = None
            raise

    def _restore(self, recovered: storage.Recovered) -> None:
        """Loads a recovered snapshot (or generation-0 start state) and replays its log."""
        if recovered.meta is None:
            return
        self._load_state(recovered.rows, recovered.meta)
        self._generation = recovered.generation
        for record in recovered.records:
            try:
                self._replay(record)
            except (KeyError, ValueError, TypeError, IndexError) as e:
                raise ValueError(
                    f"{recovered.directory}: log record {record.seq} ({record.op}) does not "
                    f"replay: {e!r}"
                ) from e
        self._ops = recovered.next_op
        self._ops_since_snapshot = len(recovered.records)

    def _load_state(self, rows: pa.Table | None, meta: dict[str, Any]) -> None:
        next_seq = int(meta["next_seq"])
        if rows is not None and rows.num_rows:
            rows = validate_experience_table(rows)
            self._data = rows.select(_DATA_SCHEMA.names).combine_chunks()
            self._times_sampled = _np(rows, "times_sampled")
            self._priority = _np(rows, "priority")
            self._policy_version = _np(rows, "policy_version")
            self._inserted_at = _np(rows, "inserted_at")
            self._seq = np.arange(next_seq - rows.num_rows, next_seq, dtype=np.int64)
            uids = rows.column("uid").to_pylist()
            self._seq_of_uid = dict(zip(uids, self._seq.tolist()))
            if len(self._seq_of_uid) != rows.num_rows:
                raise ValueError("snapshot holds duplicate uids")
        self._next_seq = next_seq
        for name in _COUNTERS:
            setattr(self, f"_{name}", int(meta["counters"][name]))
        self._sampler.load_state_dict(meta["sampler"])
        if self._limiter is not None and meta.get("rate_limiter") is not None:
            self._limiter.load_state_dict(meta["rate_limiter"])
        self._snapshots = int(meta["snapshots"])
        self._ops = int(meta["ops"])

    def _replay(self, record: storage.WalRecord) -> None:
        """Applies one log record as the call that wrote it did."""
        if record.op == "insert":
            table = record.payload
            if table is None or not table.schema.equals(EXPERIENCE_SCHEMA):
                raise ValueError("insert record without Experience rows")
            self._apply_insert(table, admit_all=True)
        elif record.op == "sample":
            self._evict_stale(int(record.learner_version))
            seqs = np.fromiter((self._seq_of_uid[u] for u in record.uids), dtype=np.int64,
                               count=len(record.uids))
            self._mark_sampled(np.searchsorted(self._seq, seqs))
            self._sampler.load_state_dict(record.state)
        elif record.op == "priorities":
            self._apply_priorities(record.uids, np.asarray(record.values, dtype=np.float64))
        else:
            raise ValueError(f"unknown op {record.op!r}")

    def _check_writable(self) -> None:
        if self._failed is not None:
            raise RuntimeError(
                f"replay shard on {self._directory} accepts no changes: {self._failed}"
            )

    def _log(self, record: bytes) -> None:
        """Appends a record for the call just applied; snapshots when one is due."""
        try:
            self._wal.append(record)
        except BaseException as e:
            self._failed = (f"writing its log failed ({e!r}); open a new shard on the "
                            f"directory to recover what was logged")
            raise
        self._ops += 1
        self._ops_since_snapshot += 1
        if self._ops_since_snapshot >= self._snapshot_every:
            self._snapshot()

    def _snapshot(self) -> None:
        """Commits the next generation (rows, empty log, meta) and deletes the older one."""
        generation = self._generation + 1
        self._generation, self._snapshots = generation, self._snapshots + 1
        meta = self.state_meta()
        try:
            wal = storage.write_snapshot(self._directory, generation, self.to_table(), meta,
                                         fsync=self._fsync)
        except OSError as e:
            # Nothing committed: keep logging to the current segment, retry later.
            self._generation, self._snapshots = generation - 1, self._snapshots - 1
            self._ops_since_snapshot = 0
            log.warning("%s: snapshot %d failed, keeping the current log: %r", self._directory,
                        generation, e)
            return
        self._wal.close()
        self._wal = wal
        self._ops_since_snapshot = 0
        storage.remove_stale_files(self._directory, generation)

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

    def _evict_stale(self, learner_version: int) -> int:
        """Evicts rows staler than the rule allows; returns how many."""
        stale = np.flatnonzero(self._rule.stale(self._policy_version, learner_version))
        if stale.size:
            self._remove(stale)
            self._evicted_stale += int(stale.size)
        return int(stale.size)

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


def shard_from_recovery(recovered: storage.Recovered) -> ReplayShard:
    """An in-memory shard holding what ``recovered`` describes; writes nothing to disk.

    The shard is built from the stored configuration (FIFO removal, the stored sampler kind and
    rate limiter), then loads the snapshot and replays the log as a durable shard's recovery
    does. Used by ``storage.read_shard``.

    Raises:
        ValueError: no stored configuration, or one with a remover other than FIFO or an
            unknown sampler kind.
    """
    from rlhf_ray.replay.samplers import make_sampler

    if recovered.meta is None:
        raise ValueError(f"{recovered.directory} holds no replay shard state")
    config = recovered.meta["config"]
    if config["remover"] != FifoRemover.__name__:
        raise ValueError(f"{recovered.directory} was written with remover "
                         f"{config['remover']!r}; only FifoRemover can be replayed here")
    sampler_cfg = config["sampler"]
    extra = {k: sampler_cfg[k] for k in ("alpha", "min_priority") if sampler_cfg.get(k) is not None}
    limiter_cfg = config["rate_limiter"]
    shard = ReplayShard(
        capacity=config["capacity"],
        max_staleness=config["max_staleness"],
        max_times_sampled=config["max_times_sampled"],
        sampler=make_sampler(sampler_cfg["kind"], seed=None, **extra),
        rate_limiter=None if limiter_cfg is None else RateLimiter(
            limiter_cfg["samples_per_insert"], limiter_cfg["min_size_to_sample"],
            limiter_cfg["error_buffer"]),
    )
    shard._restore(recovered)
    return shard


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
    directory: str | os.PathLike | None = None,
    snapshot_every: int = 1000,
    fsync: bool = False,
    max_restarts: int | None = None,
) -> list[ActorHandle]:
    """Starts ``num_shards`` replay shard actors.

    With ``directory`` the shards are durable and restartable: shard i keeps its log and
    snapshots in ``f"{directory}/shard-{i}"``, Ray restarts a shard whose process dies (up to
    ``max_restarts`` times) and the restarted shard recovers every call that returned. Calls in
    flight when the process died are retried on the restarted shard (``max_task_retries=-1``):
    a retried insert is a no-op for rows already stored (dedup by uid), but a retried sample
    that had already been logged counts its rows' ``times_sampled`` (and the limiter's samples)
    twice, and the first attempt's rows are lost with its reply: sampling is at-least-once.

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
        directory: folder of the shards' directories; ``None``: in memory only. Every process
            that may host a shard must see it at the same path (a relative path is made
            absolute here).
        snapshot_every: see ``ReplayShard``.
        fsync: see ``ReplayShard``.
        max_restarts: how often Ray restarts a dead shard; ``-1`` is without limit. Default:
            -1 with ``directory``, else 0 (a restarted in-memory shard would come back empty).

    Returns:
        The actor handles, in shard order (pass them to ``ReplayClient``).
    """
    from rlhf_ray.replay.samplers import make_sampler

    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if max_restarts is None:
        max_restarts = -1 if directory is not None else 0
    handles = []
    for i in range(num_shards):
        options: dict[str, Any] = {"num_cpus": num_cpus}
        if name_prefix is not None:
            options["name"] = f"{name_prefix}-{i}"
        if max_restarts:
            options["max_restarts"] = int(max_restarts)
        durable: dict[str, Any] = {}
        if directory is not None:
            options["max_task_retries"] = -1
            durable = {"directory": str(Path(directory).absolute() / f"shard-{i}"),
                       "snapshot_every": snapshot_every, "fsync": fsync}
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
                **durable,
            )
        )
    return handles
