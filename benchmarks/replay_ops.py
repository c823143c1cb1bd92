"""Throughput of the replay buffer: inserts and samples per second.

What it measures, for every combination of shard count (``--shards``, default 1 2 4) and row
batch size (``--batch``, default 1 16 256):

* ``insert``: one call stores one batch of new rows (fresh uids, so dedup never skips one) into
  an empty buffer; the buffer grows during the cell and its capacity is large enough that
  nothing is evicted.
* ``sample``: one call draws one batch of rows from a buffer pre-filled with ``--fill`` rows,
  with ``max_times_sampled=None``, no staleness limit and ``learner_version=0``, so every call
  sees the same eligible set.

each along two paths:

* ``inproc``: plain ``ReplayShard`` objects in this process. With S > 1 shards the script does
  the client's work itself, without Ray: rows are routed by ``stable_shard(uid, S)`` and a
  sample of n rows is split across the shards by a multivariate hypergeometric draw over their
  eligible counts, as ``ReplayClient`` does.
* ``ray``: ``make_shard_actors`` + ``ReplayClient`` on a local Ray cluster (``num_cpus=4``).
  The client validates each table once more on the driver and pays for serialisation, one
  ``num_eligible`` round trip per shard per sample and one insert/sample round trip per shard.

Rows are realistic in size: about 16 prompt tokens and 24 response tokens (uniform in 12..20
and 16..32), per-token float32 log-probs (behaviour and reference), short prompt/response texts.
All row tables are built before the timed loop. Each cell runs a few untimed warm-up calls,
then calls until ``--seconds`` have passed or ``--max-calls`` calls (and at most
``--max-rows`` rows for inserts) are done, whichever comes first, and reports calls/s,
rows/s and the mean latency per call.

Run it from the repository root (about 1-2 minutes on 2 cores)::

    python benchmarks/replay_ops.py
    python benchmarks/replay_ops.py --shards 1 4 --batch 16 --seconds 1 --json replay_ops.json
    python benchmarks/replay_ops.py --no-ray      # in-process only
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rlhf_ray.replay.client import ReplayClient, stable_shard
from rlhf_ray.replay.shard import ReplayShard, make_shard_actors, validate_experience_table
from rlhf_ray.types import EXPERIENCE_SCHEMA

PROMPT_TOKENS = (12, 20)  # inclusive range; mean 16
RESPONSE_TOKENS = (16, 32)  # inclusive range; mean 24
WARMUP_CALLS = 3
SEED = 0


# ---- rows


def _list_column(lengths: np.ndarray, values: np.ndarray, type_: pa.DataType) -> pa.Array:
    offsets = np.zeros(lengths.size + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=type_.value_type))


def _constant_column(value: Any, n: int, type_: pa.DataType) -> pa.Array:
    return pa.array([value] * n, type=type_)


def _neutral(type_: pa.DataType) -> Any:
    """A non-null filler for a schema column this script does not know (the schema may grow)."""
    if pa.types.is_list(type_):
        return []
    if pa.types.is_string(type_):
        return ""
    if pa.types.is_floating(type_) or pa.types.is_integer(type_):
        return 0
    raise TypeError(f"replay_ops.py has no filler for column type {type_}")


def build_rows(n: int, *, seed: int = SEED) -> pa.Table:
    """``n`` validated Experience rows with uids ``bench{i}/0/0``, built column-wise.

    Prompts hold 12..20 tokens, responses 16..32, with matching per-token log-prob lists.
    """
    rng = np.random.default_rng(seed)
    prompt_len = rng.integers(PROMPT_TOKENS[0], PROMPT_TOKENS[1] + 1, size=n)
    response_len = rng.integers(RESPONSE_TOKENS[0], RESPONSE_TOKENS[1] + 1, size=n)
    n_prompt, n_response = int(prompt_len.sum()), int(response_len.sum())
    types = {f.name: f.type for f in EXPERIENCE_SCHEMA}
    behavior = -rng.exponential(1.0, size=n_response).astype(np.float32)
    ref = behavior + rng.normal(0.0, 0.1, size=n_response).astype(np.float32)
    prompt_uids = [f"bench{i}" for i in range(n)]
    columns: dict[str, pa.Array] = {
        "uid": pa.array([f"{p}/0/0" for p in prompt_uids], type=pa.string()),
        "prompt_uid": pa.array(prompt_uids, type=pa.string()),
        "group_id": pa.array(prompt_uids, type=pa.string()),
        "prompt_text": pa.array(
            [f"Write a short, friendly review of movie number {i}." for i in range(n)]
        ),
        "response_text": pa.array(
            [f"Movie {i} was a delight from start to finish; the cast shines." for i in range(n)]
        ),
        "prompt_ids": _list_column(
            prompt_len, rng.integers(3, 49_000, size=n_prompt), types["prompt_ids"]
        ),
        "response_ids": _list_column(
            response_len, rng.integers(3, 49_000, size=n_response), types["response_ids"]
        ),
        "behavior_logprobs": _list_column(response_len, behavior, types["behavior_logprobs"]),
        "ref_logprobs": _list_column(response_len, ref, types["ref_logprobs"]),
        "reward": pa.array(rng.uniform(-1.0, 1.0, size=n), type=pa.float32()),
        "group_advantage": pa.array(rng.normal(0.0, 1.0, size=n), type=pa.float32()),
        "finish_reason": pa.array(np.where(rng.random(n) < 0.8, "stop", "length").tolist()),
        "policy_version": pa.array(np.zeros(n, dtype=np.int64)),
        "source": _constant_column("online", n, pa.string()),
        "times_sampled": pa.array(np.zeros(n, dtype=np.int64)),
        "priority": pa.array(np.ones(n, dtype=np.float64)),
        "inserted_at": pa.array(np.full(n, time.time(), dtype=np.float64)),
    }
    arrays = [
        columns[f.name] if f.name in columns else _constant_column(_neutral(f.type), n, f.type)
        for f in EXPERIENCE_SCHEMA
    ]
    return validate_experience_table(pa.Table.from_arrays(arrays, schema=EXPERIENCE_SCHEMA))


def with_prefix(table: pa.Table, prefix: str) -> pa.Table:
    """The same rows with ``prefix`` put in front of every uid (fresh uids for a new cell)."""
    uid = pc.binary_join_element_wise(pa.scalar(prefix), table.column("uid"), "")
    return table.set_column(table.schema.get_field_index("uid"), "uid", uid)


def cut(table: pa.Table, batch: int, calls: int) -> list[pa.Table]:
    """``calls`` consecutive tables of ``batch`` rows each, copied out of ``table``."""
    table = table.slice(0, batch * calls).combine_chunks()
    return [table.slice(i * batch, batch) for i in range(calls)]


# ---- the two paths


class InProcessBuffer:
    """S plain ``ReplayShard`` objects, routed and split the way ``ReplayClient`` does."""

    def __init__(self, num_shards: int, *, capacity: int, seed: int) -> None:
        self.shards = [
            ReplayShard(
                capacity=capacity, max_staleness=None, max_times_sampled=None, seed=seed + i
            )
            for i in range(num_shards)
        ]
        self._rng = np.random.default_rng(seed)

    def insert(self, table: pa.Table) -> int:
        if len(self.shards) == 1:
            return self.shards[0].insert(table)
        s = len(self.shards)
        shard_of_row = np.fromiter(
            (stable_shard(u, s) for u in table.column("uid").to_pylist()),
            dtype=np.int64,
            count=table.num_rows,
        )
        inserted = 0
        for i, shard in enumerate(self.shards):
            rows = np.flatnonzero(shard_of_row == i)
            if rows.size:
                inserted += shard.insert(table.take(pa.array(rows)))
        return inserted

    def sample(self, n: int, learner_version: int) -> pa.Table:
        if len(self.shards) == 1:
            return self.shards[0].sample(n, learner_version)
        counts = np.array([s.num_eligible(learner_version) for s in self.shards], dtype=np.int64)
        want = min(n, int(counts.sum()))
        allocation = (
            counts if want == counts.sum() else self._rng.multivariate_hypergeometric(counts, want)
        )
        parts = [
            shard.sample(int(k), learner_version)
            for shard, k in zip(self.shards, allocation)
            if k > 0
        ]
        return pa.concat_tables(parts) if parts else EXPERIENCE_SCHEMA.empty_table()

    def close(self) -> None:
        self.shards = []


class RayBuffer:
    """``make_shard_actors`` + ``ReplayClient``; ``close`` kills the actors."""

    def __init__(self, num_shards: int, *, capacity: int, seed: int) -> None:
        import ray

        self._handles = make_shard_actors(
            num_shards, capacity=capacity, max_staleness=None, max_times_sampled=None, seed=seed
        )
        ray.get([h.size.remote() for h in self._handles])  # wait until every actor is up
        self._client = ReplayClient(self._handles, seed=seed)

    def insert(self, table: pa.Table) -> int:
        return self._client.insert(table)

    def sample(self, n: int, learner_version: int) -> pa.Table:
        return self._client.sample(n, learner_version)

    def close(self) -> None:
        import ray

        for h in self._handles:
            ray.kill(h)
        self._handles = []


# ---- timing


def time_calls(
    call: Callable[[int], int], *, max_calls: int, seconds: float
) -> tuple[int, int, float]:
    """Runs ``call(i)`` for i = 0, 1, ... until ``seconds`` pass or ``max_calls`` are done.

    Returns:
        (calls made, rows handled, elapsed seconds).
    """
    rows = 0
    calls = 0
    start = time.perf_counter()
    deadline = start + seconds
    while calls < max_calls:
        rows += call(calls)
        calls += 1
        if time.perf_counter() >= deadline:
            break
    return calls, rows, time.perf_counter() - start


def bench_insert(make, pool: pa.Table, *, shards: int, batch: int, args, tag: str) -> dict:
    calls = max(1, min(args.max_calls, args.max_rows // batch))
    tables = cut(with_prefix(pool, f"{tag}/"), batch, WARMUP_CALLS + calls)
    buffer = make(shards, capacity=args.capacity, seed=SEED)
    try:
        for t in tables[:WARMUP_CALLS]:
            buffer.insert(t)
        timed = tables[WARMUP_CALLS:]
        n_calls, n_rows, elapsed = time_calls(
            lambda i: buffer.insert(timed[i]), max_calls=calls, seconds=args.seconds
        )
    finally:
        buffer.close()
    if n_rows != n_calls * batch:
        raise RuntimeError(f"insert stored {n_rows} rows, expected {n_calls * batch}")
    return _result("insert", shards, batch, n_calls, n_rows, elapsed)


def bench_sample(make, pool: pa.Table, *, shards: int, batch: int, args, tag: str) -> dict:
    buffer = make(shards, capacity=args.capacity, seed=SEED)
    try:
        rows = with_prefix(pool.slice(0, args.fill), f"{tag}/")
        for start in range(0, args.fill, 1024):
            buffer.insert(rows.slice(start, 1024))
        for _ in range(WARMUP_CALLS):
            buffer.sample(batch, 0)
        n_calls, n_rows, elapsed = time_calls(
            lambda i: buffer.sample(batch, 0).num_rows, max_calls=args.max_calls,
            seconds=args.seconds,
        )
    finally:
        buffer.close()
    if n_rows != n_calls * min(batch, args.fill):
        raise RuntimeError(f"sample returned {n_rows} rows over {n_calls} calls of {batch}")
    return _result("sample", shards, batch, n_calls, n_rows, elapsed)


def _result(op: str, shards: int, batch: int, calls: int, rows: int, elapsed: float) -> dict:
    return {
        "op": op,
        "shards": shards,
        "batch": batch,
        "calls": calls,
        "rows": rows,
        "seconds": elapsed,
        "calls_per_s": calls / elapsed,
        "rows_per_s": rows / elapsed,
        "ms_per_call": 1e3 * elapsed / calls,
    }


# ---- output


_COLUMNS = (
    ("path", "{:<6}"),
    ("op", "{:<6}"),
    ("shards", "{:>6}"),
    ("batch", "{:>5}"),
    ("calls", "{:>6}"),
    ("calls/s", "{:>9.0f}"),
    ("rows/s", "{:>10.0f}"),
    ("ms/call", "{:>8.3f}"),
)
_KEYS = ("path", "op", "shards", "batch", "calls", "calls_per_s", "rows_per_s", "ms_per_call")


def format_row(result: dict) -> str:
    return "  ".join(fmt.format(result[k]) for (_, fmt), k in zip(_COLUMNS, _KEYS))


def format_header() -> str:
    cells = []
    for name, fmt in _COLUMNS:
        width = int("".join(ch for ch in fmt.split(".")[0] if ch.isdigit()))
        cells.append(name.ljust(width) if "<" in fmt else name.rjust(width))
    line = "  ".join(cells)
    return f"{line}\n{'-' * len(line)}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4], help="shard counts S")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 256], help="rows per call")
    p.add_argument("--seconds", type=float, default=1.5, help="time budget per cell")
    p.add_argument("--max-calls", type=int, default=5000, help="call budget per cell")
    p.add_argument(
        "--max-rows", type=int, default=131072, help="most rows inserted per insert cell"
    )
    p.add_argument("--fill", type=int, default=16384, help="rows in the buffer for sampling")
    p.add_argument(
        "--capacity", type=int, default=1 << 20, help="rows per shard (never reached here)"
    )
    p.add_argument("--no-ray", action="store_true", help="only the in-process path")
    p.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if min(args.shards) < 1 or min(args.batch) < 1 or args.fill < max(args.batch):
        p.error("shards and batch must be >= 1, and --fill at least the largest batch")
    most_rows = max(args.max_rows, args.fill) + max(args.batch) * WARMUP_CALLS
    if args.capacity < most_rows:
        p.error(f"--capacity must be >= {most_rows} so that no insert evicts")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wall = time.perf_counter()
    pool_rows = max(
        args.fill,
        max((min(args.max_calls, args.max_rows // b) + WARMUP_CALLS) * b for b in args.batch),
    )
    t0 = time.perf_counter()
    pool = build_rows(pool_rows)
    print(
        f"built {pool_rows} rows ({pool.nbytes / pool_rows:.0f} B/row in Arrow) "
        f"in {time.perf_counter() - t0:.1f} s; python {platform.python_version()}, "
        f"pyarrow {pa.__version__}",
        flush=True,
    )

    paths: list[tuple[str, Callable]] = [("inproc", InProcessBuffer)]
    if not args.no_ray:
        import ray

        t0 = time.perf_counter()
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        print(f"ray {ray.__version__} started in {time.perf_counter() - t0:.1f} s", flush=True)
        paths.append(("ray", RayBuffer))

    results: list[dict] = []
    print(format_header(), flush=True)
    try:
        for path, make in paths:
            for op, bench in (("insert", bench_insert), ("sample", bench_sample)):
                for shards in args.shards:
                    for batch in args.batch:
                        tag = f"{path}-{op}-{shards}-{batch}"
                        result = {"path": path, **bench(
                            make, pool, shards=shards, batch=batch, args=args, tag=tag
                        )}
                        results.append(result)
                        print(format_row(result), flush=True)
    finally:
        if not args.no_ray:
            import ray

            ray.shutdown()
    wall = time.perf_counter() - wall
    print(f"total wall time {wall:.1f} s")
    if args.json:
        meta = {k: v for k, v in vars(args).items() if k != "json"}
        with open(args.json, "w") as f:
            json.dump({"args": meta, "wall_s": wall, "results": results}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
