"""On-disk format of a durable replay shard, and read-only access to it (no Ray, no actor).

A durable shard (``ReplayShard(directory=...)``) keeps one directory holding a *generation*
``G`` of files (``G`` written as 8 digits):

* ``snapshot-G.parquet``: every stored row, in insertion order, as ``ReplayShard.to_table()``
  writes them (``times_sampled`` and ``priority`` included). Generation 0 has no snapshot: it
  starts from an empty shard.
* ``snapshot-G.json``: the snapshot's meta (see below). It is renamed into place last, so its
  presence is what commits generation ``G``; a snapshot without it is ignored and deleted.
* ``wal-G.arrows``: the write-ahead log of every mutating call after the snapshot, one Arrow IPC
  *stream* (``pyarrow.ipc.open_stream`` reads it): a schema message, then one single-row record
  batch per call, without an end-of-stream marker. Each record is one ``write()`` on an
  ``O_APPEND`` descriptor, done (and, with ``fsync``, synced) before the call returns.
* ``LOCK``: ``flock``-ed by the live shard, so two live shards never write one directory.

WAL columns (``WAL_SCHEMA``), one row per record:

* ``seq`` (int64): the record's number; numbering runs on across generations (the meta's
  ``ops`` is the number of the first record of the generation's WAL).
* ``op`` (string): ``insert`` | ``sample`` | ``priorities``.
* ``learner_version`` (int64): the ``sample`` call's argument; null otherwise.
* ``uids`` (list<string>): ``sample``: the uids returned; ``priorities``: the uids given.
* ``values`` (list<float64>): ``priorities``: the priorities given.
* ``payload`` (binary): ``insert``: the rows the call handled (the first ``consumed`` rows of
  the validated table), as an IPC stream; replaying them through the insert code path
  reproduces dedup, evictions and rate-limiter counts.
* ``state`` (string): ``sample``: JSON of the sampler's ``state_dict()`` after the call, so the
  random stream continues as it would have.

The meta (JSON) holds ``format``, ``generation``, ``ops``, ``snapshots`` (snapshots taken so
far, this one included), ``rows``, ``next_seq`` (the next row insertion number), ``counters``
(the shard's lifetime counters), ``sampler`` and ``rate_limiter`` (their ``state_dict()``,
``None`` without a limiter) and ``config`` (capacity, eligibility rule, sampler and limiter
parameters; a shard refuses to open a directory written with another configuration). The WAL's
schema metadata (key ``rlhf_ray.replay``) carries the same meta as of the segment's start, which
is how generation 0 knows its configuration and initial sampler state.

Rotation (``write_snapshot``): the Parquet file and the next WAL segment (schema only) are
written under temporary names and renamed; then the meta is renamed, which commits; then the
older generation's files are deleted. A kill at any point leaves either the old generation
committed (the new files are leftovers, deleted on the next open) or the new one.

Recovery (``recover``) loads the newest committed generation and decodes its WAL. A final record
cut short by a kill (a prefix of one ``write()``) fails to decode and is dropped: its call never
returned. Arrow's message framing is the only check; there is no checksum, so on-disk corruption
other than a cut-off tail is not detected beyond what fails to decode.

Checkpoints (``save_checkpoint``): ``checkpoints/<tag>/`` holds hard links to one committed
generation's ``snapshot.parquet`` and ``snapshot.json``; a run checkpoint tags every shard at
the same moment. ``restore_checkpoint`` moves the current generation's files to
``set-aside/<tag>-<n>/`` (nothing is deleted) and makes the checkpoint the current generation.

Runs keep the tables of their buffers under ``RUN_DIR/replay/<table>/shard-<i>/``;
``find_tables`` lists them and ``read_shard`` rebuilds one shard's rows read-only.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

FORMAT_VERSION = 1
META_KEY = b"rlhf_ray.replay"
LOCK_NAME = "LOCK"

WAL_SCHEMA = pa.schema(
    [
        ("seq", pa.int64()),
        ("op", pa.string()),
        ("learner_version", pa.int64()),
        ("uids", pa.list_(pa.string())),
        ("values", pa.list_(pa.float64())),
        ("payload", pa.binary()),
        ("state", pa.string()),
    ]
)
WAL_OPS = ("insert", "sample", "priorities")

_GENERATION_FILE = re.compile(r"^(snapshot|wal)-(\d{8})\.(parquet|json|arrows)$")
_TMP_PREFIX = ".tmp-"
_SHARD_DIR = re.compile(r"^shard-(\d+)$")

log = logging.getLogger(__name__)


# ---- file names


def wal_path(directory: str | os.PathLike, generation: int) -> Path:
    return Path(directory) / f"wal-{generation:08d}.arrows"


def snapshot_path(directory: str | os.PathLike, generation: int) -> Path:
    return Path(directory) / f"snapshot-{generation:08d}.parquet"


def meta_path(directory: str | os.PathLike, generation: int) -> Path:
    return Path(directory) / f"snapshot-{generation:08d}.json"


def _tmp(path: Path) -> Path:
    return path.with_name(f"{_TMP_PREFIX}{path.name}")


# ---- WAL records


@dataclass
class WalRecord:
    """One decoded WAL record; fields an op does not use are None."""

    seq: int
    op: str
    learner_version: int | None = None
    uids: list[str] | None = None
    values: list[float] | None = None
    payload: pa.Table | None = None
    state: dict | None = None


def _record(seq: int, op: str, *, learner_version: int | None = None,
            uids: pa.Array | list[str] | None = None, values: list[float] | None = None,
            payload: bytes | None = None, state: dict | None = None) -> bytes:
    if uids is not None and isinstance(uids, pa.Array):
        offsets = pa.array([0, len(uids)], type=pa.int32())
        uid_list = pa.ListArray.from_arrays(offsets, uids.cast(pa.string()))
    else:
        uid_list = pa.array([uids], type=pa.list_(pa.string()))
    batch = pa.record_batch(
        [
            pa.array([seq], type=pa.int64()),
            pa.array([op], type=pa.string()),
            pa.array([learner_version], type=pa.int64()),
            uid_list,
            pa.array([values], type=pa.list_(pa.float64())),
            pa.array([payload], type=pa.binary()),
            pa.array([None if state is None else json.dumps(state)], type=pa.string()),
        ],
        schema=WAL_SCHEMA,
    )
    return batch.serialize().to_pybytes()


def encode_insert(seq: int, rows: pa.Table) -> bytes:
    """The WAL record of an insert that handled ``rows``."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, rows.schema) as writer:
        writer.write_table(rows)
    return _record(seq, "insert", payload=sink.getvalue().to_pybytes())


def encode_sample(seq: int, learner_version: int, uids: pa.Array, sampler_state: dict) -> bytes:
    """The WAL record of a sample at ``learner_version`` that returned ``uids``."""
    return _record(seq, "sample", learner_version=int(learner_version), uids=uids,
                   state=sampler_state)


def encode_priorities(seq: int, uids: list[str], values: list[float]) -> bytes:
    """The WAL record of a priority update."""
    return _record(seq, "priorities", uids=list(uids), values=[float(v) for v in values])


def _decode(batch: pa.RecordBatch) -> WalRecord:
    if batch.num_rows != 1:
        raise ValueError(f"WAL record has {batch.num_rows} rows, expected 1")
    row = batch.to_pylist()[0]
    if row["op"] not in WAL_OPS or row["seq"] is None:
        raise ValueError(f"WAL record has unknown op {row['op']!r}")
    payload = None
    if row["op"] == "insert":
        payload = pa.ipc.open_stream(row["payload"]).read_all()
    return WalRecord(
        seq=int(row["seq"]),
        op=row["op"],
        learner_version=row["learner_version"],
        uids=row["uids"],
        values=row["values"],
        payload=payload,
        state=None if row["state"] is None else json.loads(row["state"]),
    )


@dataclass
class WalContents:
    """What ``read_wal`` found: the header meta, the whole records, and where they end."""

    header: dict | None
    records: list[WalRecord]
    good_bytes: int  # length of the prefix made of whole records (0: no readable header)
    total_bytes: int

    @property
    def torn_bytes(self) -> int:
        return self.total_bytes - self.good_bytes


def read_wal(path: str | os.PathLike) -> WalContents:
    """Decodes one WAL segment; a cut-off or undecodable tail is left out (``torn_bytes``)."""
    with open(path, "rb") as f:
        data = f.read()
    reader = pa.BufferReader(data)
    try:
        schema = pa.ipc.read_schema(pa.ipc.read_message(reader))
    except (EOFError, OSError, pa.ArrowException, ValueError):
        return WalContents(None, [], 0, len(data))
    if not schema.remove_metadata().equals(WAL_SCHEMA):
        raise ValueError(f"{path}: not a replay WAL (schema {schema})")
    raw_meta = (schema.metadata or {}).get(META_KEY)
    header = json.loads(raw_meta) if raw_meta is not None else None
    good = reader.tell()
    records: list[WalRecord] = []
    while good < len(data):
        try:
            message = pa.ipc.read_message(reader)
            records.append(_decode(pa.ipc.read_record_batch(message, WAL_SCHEMA)))
        except (EOFError, OSError, pa.ArrowException, ValueError, KeyError, TypeError):
            break
        good = reader.tell()
    contents = WalContents(header, records, good, len(data))
    if contents.torn_bytes:
        log.info("%s: ignoring a torn tail of %d byte(s) after %d record(s)", path,
                 contents.torn_bytes, len(records))
    return contents


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_path(path: Path) -> None:
    """fsync a file, or a directory (so a rename inside it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WalWriter:
    """Appends records to one WAL segment; each ``append`` is one ``write()`` (and fsync).

    Use ``create`` for a new segment or ``reopen`` for the segment recovery found.
    """

    def __init__(self, path: Path, fd: int, size: int, fsync: bool) -> None:
        self.path = path
        self._fd: int | None = fd
        self.size = size
        self._fsync = fsync

    @classmethod
    def create(cls, path: Path, header: dict, *, fsync: bool) -> WalWriter:
        """Writes a segment holding only the schema (with ``header`` as metadata), atomically."""
        schema = WAL_SCHEMA.with_metadata({META_KEY: json.dumps(header).encode()})
        data = schema.serialize().to_pybytes()
        tmp = _tmp(path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, data)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if fsync:
            _fsync_path(path.parent)
        return cls.reopen(path, len(data), fsync=fsync)

    @classmethod
    def reopen(cls, path: Path, good_bytes: int, *, fsync: bool) -> WalWriter:
        """Opens an existing segment for appending, cutting off anything after ``good_bytes``."""
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            if os.fstat(fd).st_size != good_bytes:
                os.ftruncate(fd, good_bytes)
                if fsync:
                    os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, good_bytes, fsync)

    def append(self, record: bytes) -> None:
        """Writes one record; on a failed write, cuts the segment back to its last record."""
        if self._fd is None:
            raise ValueError(f"{self.path}: WAL is closed")
        try:
            _write_all(self._fd, record)
            if self._fsync:
                os.fsync(self._fd)
        except BaseException:
            try:
                os.ftruncate(self._fd, self.size)
            except OSError:
                pass
            raise
        self.size += len(record)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# ---- snapshots


def write_snapshot(directory: str | os.PathLike, generation: int, rows: pa.Table, meta: dict,
                   *, fsync: bool) -> WalWriter:
    """Commits generation ``generation``: its snapshot, an empty WAL segment, then the meta.

    Returns the writer of the new segment. Until the meta is renamed into place nothing is
    committed: on an error before that, the new files are removed and the error re-raised, and
    the previous generation stays the current one. Deleting the older generations is left to
    ``remove_stale_files``.
    """
    directory = Path(directory)
    parquet, wal, meta_file = (snapshot_path(directory, generation),
                               wal_path(directory, generation), meta_path(directory, generation))
    writer = None
    try:
        pq.write_table(rows, _tmp(parquet))
        if fsync:
            _fsync_path(_tmp(parquet))
        os.replace(_tmp(parquet), parquet)
        writer = WalWriter.create(wal, meta, fsync=fsync)
        with open(_tmp(meta_file), "w") as f:
            json.dump(meta, f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(_tmp(meta_file), meta_file)  # the commit
    except BaseException:
        if writer is not None:
            writer.close()
        for path in (parquet, wal, _tmp(parquet), _tmp(wal), _tmp(meta_file)):
            path.unlink(missing_ok=True)
        raise
    if fsync:
        _fsync_path(directory)
    return writer




def committed_generations(directory: str | os.PathLike) -> list[int]:
    """Generations whose meta file exists, ascending (0, which needs none, is not listed)."""
    found = []
    for name in os.listdir(directory):
        m = _GENERATION_FILE.match(name)
        if m and m.group(1) == "snapshot" and m.group(3) == "json":
            found.append(int(m.group(2)))
    return sorted(found)


def remove_stale_files(directory: str | os.PathLike, generation: int) -> None:
    """Deletes other generations' files and temporary files, keeping ``generation``'s."""
    directory = Path(directory)
    for name in os.listdir(directory):
        m = _GENERATION_FILE.match(name)
        stale = name.startswith(_TMP_PREFIX) or (m is not None and int(m.group(2)) != generation)
        if stale:
            try:
                (directory / name).unlink()
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("could not delete %s: %s", directory / name, e)


# ---- recovery


@dataclass
class Recovered:
    """The newest committed state of a shard directory, as found on disk (nothing applied)."""

    directory: Path
    generation: int
    rows: pa.Table | None  # the snapshot's rows (None for generation 0)
    meta: dict | None  # the snapshot's meta, or the generation-0 WAL header; None: empty dir
    records: list[WalRecord] = field(default_factory=list)
    wal_exists: bool = False  # the segment exists and its header is readable
    wal_bytes: int = 0  # bytes of whole records (and header) in the segment
    torn_bytes: int = 0

    @property
    def next_op(self) -> int:
        first = int(self.meta["ops"]) if self.meta is not None else 0
        return first + len(self.records)


def recover(directory: str | os.PathLike) -> Recovered:
    """Reads the newest committed generation of ``directory``; writes and deletes nothing.

    Raises:
        FileNotFoundError: ``directory`` does not exist.
        ValueError: the files contradict each other (a record out of sequence, a row count
            that differs from the meta, an unknown format).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"replay shard directory {directory} does not exist")
    generations = committed_generations(directory)
    generation = generations[-1] if generations else 0
    rows = meta = None
    if generation:
        with open(meta_path(directory, generation)) as f:
            meta = json.load(f)
        rows = pq.read_table(snapshot_path(directory, generation))
        if rows.num_rows != int(meta["rows"]):
            raise ValueError(f"{snapshot_path(directory, generation)} holds {rows.num_rows} "
                             f"rows, its meta says {meta['rows']}")
    out = Recovered(directory, generation, rows, meta)
    path = wal_path(directory, generation)
    if path.exists():
        wal = read_wal(path)
        out.wal_exists = wal.header is not None
        out.wal_bytes, out.torn_bytes, out.records = wal.good_bytes, wal.torn_bytes, wal.records
        if out.meta is None:
            out.meta = wal.header
    if out.meta is not None and int(out.meta.get("format", -1)) != FORMAT_VERSION:
        raise ValueError(f"{directory}: unknown replay format {out.meta.get('format')!r}")
    first = int(out.meta["ops"]) if out.meta is not None else 0
    for i, record in enumerate(out.records):
        if record.seq != first + i:
            raise ValueError(f"{path}: record {i} has seq {record.seq}, expected {first + i}")
    return out


def lock_directory(directory: str | os.PathLike, wait_s: float = 0.0) -> int:
    """Takes the directory's ``LOCK`` (``flock``, released when the process dies); returns its fd.

    Args:
        directory: the shard directory.
        wait_s: how long to keep trying while another process holds the lock.

    Raises:
        RuntimeError: another live shard still holds it after ``wait_s``.
    """
    path = Path(directory) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise RuntimeError(f"replay shard directory {directory} is in use by another "
                                   f"shard (its {LOCK_NAME} is held)") from None
            time.sleep(0.05)


def unlock_directory(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


# ---- checkpoints

CHECKPOINTS_DIR = "checkpoints"
SET_ASIDE_DIR = "set-aside"


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (snapshot files are immutable once committed), or a copy where the file
    system refuses links."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def save_checkpoint(directory: str | os.PathLike, generation: int, tag: str, *,
                    fsync: bool) -> Path:
    """Keeps committed generation ``generation`` as checkpoint ``tag``.

    ``checkpoints/<tag>/`` gets the generation's ``snapshot.parquet`` and ``snapshot.json``
    (hard links, so a later rotation deleting the originals frees nothing the checkpoint needs).
    The folder is filled under a temporary name and renamed: it exists whole or not at all.
    """
    directory = Path(directory)
    root = directory / CHECKPOINTS_DIR
    root.mkdir(exist_ok=True)
    final, tmp = root / tag, root / f"{_TMP_PREFIX}{tag}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _link_or_copy(snapshot_path(directory, generation), tmp / "snapshot.parquet")
    _link_or_copy(meta_path(directory, generation), tmp / "snapshot.json")
    if final.exists():  # the same tag again (a retried call): the newer state wins
        shutil.rmtree(final)
    os.replace(tmp, final)
    if fsync:
        _fsync_path(root)
    return final


def checkpoint_tags(directory: str | os.PathLike) -> list[str]:
    root = Path(directory) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and not p.name.startswith(_TMP_PREFIX))


def drop_checkpoints(directory: str | os.PathLike, keep: set[str]) -> None:
    """Deletes the checkpoints (and leftover temporary ones) whose tag is not in ``keep``."""
    root = Path(directory) / CHECKPOINTS_DIR
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.is_dir() and p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)


def restore_checkpoint(directory: str | os.PathLike, tag: str | None) -> dict[str, Any]:
    """Makes checkpoint ``tag`` the shard's current state (``None``: the empty start state).

    Nothing is deleted: the current generation's files (snapshot, log) move to
    ``set-aside/<tag>-<n>/``, a folder with a shard directory's layout that ``read_shard``
    reads, and the checkpoint's snapshot becomes the current generation with an empty log.
    Takes the directory's lock, so no live shard may hold it.

    Returns:
        ``set_aside`` (the folder, or None when there was nothing to move), ``rows_after``
        (rows inserted after the checkpoint, counted from the two states' ``inserted``
        counters) and ``generation`` (the restored one).

    Raises:
        FileNotFoundError: the shard has no checkpoint ``tag``.
        RuntimeError: a live shard holds the directory.
    """
    directory = Path(directory)
    source = directory / CHECKPOINTS_DIR / tag if tag is not None else None
    if source is not None and not (source / "snapshot.json").is_file():
        raise FileNotFoundError(f"replay shard {directory} has no checkpoint {tag!r} "
                                f"(it has {checkpoint_tags(directory) or 'none'})")
    fd = lock_directory(directory, wait_s=10.0)
    try:
        before = recover(directory)
        inserted_now = 0
        if before.meta is not None:
            inserted_now = int(read_shard(directory)[1]["counters"].get("inserted", 0))
        meta = None
        if source is not None:
            with open(source / "snapshot.json") as f:
                meta = json.load(f)
        inserted_then = int(meta["counters"]["inserted"]) if meta is not None else 0
        movable = [p for p in directory.iterdir()
                   if p.is_file() and (_GENERATION_FILE.match(p.name)
                                       or p.name.startswith(_TMP_PREFIX))]
        set_aside = None
        if movable:
            parent = directory / SET_ASIDE_DIR
            parent.mkdir(exist_ok=True)
            n = sum(1 for _ in parent.iterdir())
            set_aside = parent / f"{tag or 'start'}-{n}"
            set_aside.mkdir()
            for p in movable:
                os.replace(p, set_aside / p.name)
        generation = 0
        if meta is not None:
            generation = int(meta["generation"])
            _link_or_copy(source / "snapshot.parquet", snapshot_path(directory, generation))
            _link_or_copy(source / "snapshot.json", meta_path(directory, generation))
        return {"set_aside": str(set_aside) if set_aside else None,
                "rows_after": max(0, inserted_now - inserted_then), "generation": generation}
    finally:
        unlock_directory(fd)


# ---- read-only access


def read_shard(path: str | os.PathLike) -> tuple[pa.Table, dict[str, Any]]:
    """The rows a shard would hold if it were opened on ``path`` now, and its meta.

    Does the shard's own recovery (snapshot, then WAL replay through ``ReplayShard``) in
    memory, writing and deleting nothing and taking no lock, so it may read the directory of a
    live shard (a record being written is treated as torn). A rotation racing the read is
    retried. Replays evict as ``FifoRemover``; a directory written with another remover is
    refused.

    Returns:
        ``(rows, meta)``: the rows in insertion order (``EXPERIENCE_SCHEMA``), and a dict with
        ``path``, ``generation``, ``ops`` (mutating calls so far), ``snapshots``,
        ``wal_records``, ``wal_bytes``, ``torn_bytes``, ``config``, ``counters`` (lifetime
        counters as in ``ReplayShard.stats``), ``sampler`` and ``rate_limiter`` (state dicts).
        A directory with no committed state gives no rows and ``config`` None.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: inconsistent files, or a configuration this reader cannot replay.
    """
    from rlhf_ray.replay.shard import shard_from_recovery
    from rlhf_ray.types import EXPERIENCE_SCHEMA

    for attempt in range(5):
        try:
            recovered = recover(path)
            break
        except FileNotFoundError:
            # A rotation deleted a file between listing and reading; the next listing is newer.
            if attempt == 4 or not Path(path).is_dir():
                raise
            time.sleep(0.05)
    info: dict[str, Any] = {
        "path": str(path),
        "generation": recovered.generation,
        "wal_records": len(recovered.records),
        "wal_bytes": recovered.wal_bytes,
        "torn_bytes": recovered.torn_bytes,
    }
    if recovered.meta is None:
        info.update(ops=0, snapshots=0, config=None, counters={}, sampler=None,
                    rate_limiter=None)
        return EXPERIENCE_SCHEMA.empty_table(), info
    shard = shard_from_recovery(recovered)
    state = shard.state_meta()
    info.update(ops=state["ops"], snapshots=state["snapshots"], config=state["config"],
                counters=state["counters"], sampler=state["sampler"],
                rate_limiter=state["rate_limiter"])
    return shard.to_table(), info


def find_tables(run_dir: str | os.PathLike) -> dict[str, list[Path]]:
    """The replay shard directories of a run: ``{table: [RUN_DIR/replay/<table>/shard-<i>]}``.

    Tables are sorted by name, shards by index; a table folder without ``shard-<i>`` folders is
    left out.

    Raises:
        FileNotFoundError: ``RUN_DIR/replay`` is not a directory (the message names it).
    """
    replay = Path(run_dir) / "replay"
    if not replay.is_dir():
        raise FileNotFoundError(f"no replay buffer in {run_dir}: {replay} is not a directory "
                                "(not a run directory, or a run with replay.durable=false)")
    tables: dict[str, list[Path]] = {}
    for table_dir in sorted(p for p in replay.iterdir() if p.is_dir()):
        shards = []
        for p in table_dir.iterdir():
            m = _SHARD_DIR.match(p.name)
            if m and p.is_dir():
                shards.append((int(m.group(1)), p))
        if shards:
            tables[table_dir.name] = [p for _, p in sorted(shards)]
    return tables
