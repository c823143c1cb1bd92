"""`rlhf-ray`: the command line.

    rlhf-ray train [--preset NAME] [--config FILE ...] [--sync] [--address ADDR] [key=value ...]
    rlhf-ray train --resume RUN_DIR [key=value ...]
    rlhf-ray offline [--algo dpo|ipo|iql|cql] [--data FILE] [--preset NAME] [key=value ...]
    rlhf-ray eval RUN_DIR [--samples N] [--temperature T] [--top-p P] [--top-k K] [--limit N]
    rlhf-ray models [--prepare NAME]
    rlhf-ray presets
    rlhf-ray buffer inspect RUN_DIR
    rlhf-ray buffer export RUN_DIR OUT.parquet [--table NAME]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rlhf_ray.config import OFFLINE_ALGOS


def _train(args) -> int:
    from rlhf_ray.config import load_config
    from rlhf_ray.driver import train

    overrides = list(args.overrides)
    if args.sync:
        overrides.append("run.sync=true")
    if args.address:
        overrides.append(f"run.ray_address={args.address}")
    if args.resume is not None:
        # the run's own config, with the overrides on top (e.g. more run.steps)
        saved = Path(args.resume) / "config.yaml"
        if not saved.is_file():
            raise FileNotFoundError(f"--resume {args.resume}: not a run directory (no "
                                    "config.yaml)")
        cfg = load_config(files=[str(saved), *(args.config or [])], overrides=overrides)
        run_dir = train(cfg, Path(args.resume), resume=True)
    else:
        cfg = load_config(preset=args.preset, files=args.config or [], overrides=overrides)
        run_dir = train(cfg)
    print(f"run directory: {run_dir}")
    return 0


def _offline(args) -> int:
    from rlhf_ray.config import load_config
    from rlhf_ray.offline_driver import train_offline

    overrides = list(args.overrides)
    if args.algo:
        overrides.append(f"offline.algo={args.algo}")
    if args.data:
        overrides.append(f"offline.data={args.data}")
    if args.address:
        overrides.append(f"run.ray_address={args.address}")
    cfg = load_config(preset=args.preset, files=args.config or [], overrides=overrides)
    run_dir = train_offline(cfg)
    print(f"run directory: {run_dir}")
    return 0


def _eval(args) -> int:
    from rlhf_ray.evaluation import evaluate, format_report

    result = evaluate(args.run_dir, samples_per_prompt=args.samples, temperature=args.temperature,
                      top_p=args.top_p, top_k=args.top_k, limit=args.limit)
    print(format_report(result))
    return 0


def _models(args) -> int:
    from rlhf_ray.models.builtin import BUILTIN_MODELS, ensure_builtin

    if args.prepare:
        print(ensure_builtin(args.prepare))
        return 0
    for name, text in BUILTIN_MODELS.items():
        print(f"{name:<24} {text}")
    return 0


def _presets(args) -> int:
    from rlhf_ray.config import preset_names

    print("\n".join(preset_names()))
    return 0


def _buffer_inspect(args) -> int:
    from rlhf_ray.replay.storage import find_tables, read_shard

    tables = find_tables(args.run_dir)
    if not tables:
        print(f"no replay tables under {args.run_dir}/replay")
        return 0
    learner_version = _last_learner_version(args.run_dir)
    for name, shard_dirs in tables.items():
        shards = [(path, *read_shard(path)) for path in shard_dirs]
        versions = [t.column("policy_version") for _, t, _ in shards if t.num_rows]
        newest = max((int(v.to_numpy().max()) for v in versions), default=0)
        # staleness is measured against the learner's last version when the run logged one
        against = learner_version if learner_version is not None else newest
        total = sum(t.num_rows for _, t, _ in shards)
        print(f"table {name}: {len(shards)} shard(s), {total} rows, newest policy_version "
              f"{newest}" + (f", learner version {learner_version}"
                             if learner_version is not None else ""))
        for path, rows, meta in shards:
            print(_format_shard(path.name, rows, meta, against))
    return 0


def _last_learner_version(run_dir: str):
    """The policy version the run's last logged learner step published, or None."""
    from rlhf_ray.metrics import read_metrics

    try:
        records = read_metrics(run_dir)
    except (FileNotFoundError, ValueError):
        return None
    versions = [r["weights/version"] for r in records if "weights/version" in r]
    return int(versions[-1]) if versions else None


def _format_shard(name: str, rows, meta: dict, newest: int) -> str:
    """One shard's block of `buffer inspect`: counts, staleness, times_sampled, sources, reward."""
    import numpy as np
    import pyarrow.compute as pc

    counters = meta["counters"]
    lines = [f"  {name}: {rows.num_rows} rows (generation {meta['generation']}, "
             f"{meta['wal_records']} log record(s), {meta['wal_bytes']} log bytes"
             + (f", {meta['torn_bytes']} torn" if meta["torn_bytes"] else "") + ")"]
    if meta["torn_bytes"]:
        lines.append(f"    WARNING: {meta['torn_bytes']} log bytes after the last whole record "
                     "were ignored: a write cut short by a crash, or a damaged log (records "
                     "after damage are lost)")
    if counters:
        lines.append("    lifetime: " + ", ".join(f"{k} {v}" for k, v in counters.items()))
    if not rows.num_rows:
        return "\n".join(lines)
    staleness = newest - rows.column("policy_version").to_numpy()
    lines.append(f"    staleness (vs v{newest}): mean {staleness.mean():.2f}, "
                 f"median {np.median(staleness):g}, max {staleness.max()}")
    times = rows.column("times_sampled").to_numpy()
    values, counts = np.unique(times, return_counts=True)
    shown = " ".join(f"{v}:{c}" for v, c in zip(values[:10], counts[:10]))
    if values.size > 10:
        shown += f" >={values[10]}:{counts[10:].sum()}"
    lines.append(f"    times_sampled: mean {times.mean():.2f}, max {times.max()}; {shown}")
    sources = pc.value_counts(rows.column("source")).to_pylist()
    sources.sort(key=lambda d: (-d["counts"], d["values"]))
    lines.append("    source: " + ", ".join(f"{d['values']} {d['counts']}" for d in sources))
    hist, edges = np.histogram(rows.column("reward").to_numpy(), bins=10)
    lines.append("    reward:")
    peak = max(int(hist.max()), 1)
    for count, lo, hi in zip(hist, edges[:-1], edges[1:]):
        bar = "#" * (max(1, round(30 * count / peak)) if count else 0)
        lines.append(f"      [{lo:8.3f}, {hi:8.3f}) {count:6d} {bar}".rstrip())
    return "\n".join(lines)


def _buffer_export(args) -> int:
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    from rlhf_ray.replay.storage import find_tables, read_shard
    from rlhf_ray.types import EXPERIENCE_SCHEMA

    tables = find_tables(args.run_dir)
    if args.table is not None:
        if args.table not in tables:
            raise ValueError(f"no replay table {args.table!r} under {args.run_dir}/replay "
                             f"(found: {', '.join(tables) or 'none'})")
        tables = {args.table: tables[args.table]}
    parts = [read_shard(path)[0] for paths in tables.values() for path in paths]
    rows = pa.concat_tables([EXPERIENCE_SCHEMA.empty_table(), *parts])
    out = Path(args.out)
    if out.suffix.lower() != ".parquet":
        raise ValueError(f"{out}: the export is a Parquet file; give a name ending in .parquet")
    if out.is_dir():
        raise IsADirectoryError(f"{out} is a directory; give a file name ending in .parquet")
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} exists; pass --force to overwrite it")
    parent = os.path.dirname(os.path.abspath(args.out))
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise NotADirectoryError(f"{parent} is a file, not a folder")
    os.makedirs(parent, exist_ok=True)
    pq.write_table(rows, args.out)
    print(f"wrote {rows.num_rows} rows from {len(parts)} shard(s) of "
          f"{', '.join(tables) or 'no tables'} to {args.out}")
    return 0


def _ray_connection_errors() -> tuple:
    """Ray's errors for a cluster that refuses the driver (a missing or wrong token)."""
    try:
        from ray.exceptions import AuthenticationError
    except ImportError:
        return ()
    return (AuthenticationError,)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf-ray", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="online RLHF (LoRA-PPO) on a Ray cluster")
    p.add_argument("--preset", default="default", help="named preset (`rlhf-ray presets`)")
    p.add_argument("--config", action="append", help="YAML config file (repeatable)")
    p.add_argument("--sync", action="store_true", help="generate, score, train strictly in turn")
    p.add_argument("--address", help="Ray cluster address (`auto` for `ray start --head`)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue this run from its newest checkpoint, with its config")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. learner.lr=1e-4")
    p.set_defaults(func=_train)

    p = sub.add_parser("offline", help="offline learning from stored data: DPO, IPO (pairs), "
                                       "token-level IQL, CQL (scored samples)")
    p.add_argument("--algo", choices=list(OFFLINE_ALGOS), help="default: offline.algo (dpo)")
    p.add_argument("--data", help="pairs (dpo/ipo) or scored samples (iql/cql): a .jsonl or "
                                  ".parquet file, or a buffer export; default: the builtin set "
                                  "(movie-review-preferences or movie-review-samples)")
    p.add_argument("--preset", default="default", help="named preset (`rlhf-ray presets`)")
    p.add_argument("--config", action="append", help="YAML config file (repeatable)")
    p.add_argument("--address", help="Ray cluster address (`auto` for `ray start --head`)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. offline.beta=0.2")
    p.set_defaults(func=_offline)

    p = sub.add_parser("eval", help="trained adapter vs reference on held-out prompts")
    p.add_argument("run_dir")
    p.add_argument("--samples", type=int, help="responses per prompt per model")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--limit", type=int, help="use only the first N held-out prompts")
    p.set_defaults(func=_eval)

    p = sub.add_parser("models", help="list builtin models, or build one into the cache")
    p.add_argument("--prepare", metavar="NAME")
    p.set_defaults(func=_models)

    p = sub.add_parser("presets", help="list named presets")
    p.set_defaults(func=_presets)

    p = sub.add_parser("buffer", help="read a run's replay buffer from disk (no Ray needed)")
    buffer = p.add_subparsers(dest="buffer_command", required=True)
    q = buffer.add_parser("inspect", help="rows, staleness, times_sampled, sources, rewards")
    q.add_argument("run_dir")
    q.set_defaults(func=_buffer_inspect)
    q = buffer.add_parser("export", help="write the stored rows to one Parquet file")
    q.add_argument("run_dir")
    q.add_argument("out", metavar="OUT.parquet")
    q.add_argument("--table", help="only this replay table (default: all)")
    q.add_argument("--force", action="store_true", help="overwrite OUT.parquet if it exists")
    q.set_defaults(func=_buffer_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    from rlhf_ray.config import ConfigError
    from rlhf_ray.data.prompts import DataError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `key=value` overrides may also stand after flags (`train --sync run.steps=2`)
    if args.command in ("train", "offline") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from rlhf_ray.driver import RunStopped

    clean = (ConfigError, DataError, FileNotFoundError, FileExistsError, NotADirectoryError,
             IsADirectoryError, ValueError, TimeoutError, RunStopped, *_ray_connection_errors())
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("rlhf-ray: interrupted; a training run continues with rlhf-ray train --resume "
              "RUN_DIR", file=sys.stderr)
        return 130
    except Exception as e:
        # an actor's error of a known kind (a rate-limit timeout naming the stalled side, a bad
        # offline file) arrives wrapped by Ray; it is reported by its message, without the
        # remote traceback
        cause = getattr(e, "cause", None)
        if isinstance(cause, clean):
            print(f"rlhf-ray: error: {type(cause).__name__}: {cause}", file=sys.stderr)
            return 2
        if isinstance(e, clean):
            print(f"rlhf-ray: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
