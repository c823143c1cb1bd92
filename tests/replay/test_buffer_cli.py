"""`rlhf-ray buffer inspect|export` on a run directory holding real durable shards."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from rlhf_ray.cli import main
from rlhf_ray.replay.shard import ReplayShard
from tests.replay.rows import make_rows


def uids(table: pa.Table) -> list[str]:
    return table.column("uid").to_pylist()


@pytest.fixture
def run_dir(tmp_path):
    """RUN_DIR/replay/online/shard-{0,1} and RUN_DIR/replay/offline/shard-0, some sampled.

    Returns the run directory and the rows each table holds.
    """
    run = tmp_path / "run"
    held: dict[str, list[str]] = {"online": [], "offline": []}
    for i in range(2):
        s = ReplayShard(capacity=25, seed=i, directory=run / "replay" / "online" / f"shard-{i}",
                        snapshot_every=3)
        for step in range(4):
            s.insert(make_rows(10, version=step, start=100 * i + 10 * step))
            s.sample(6, learner_version=step)
        held["online"] += uids(s.to_table())
        s.close()
    offline = make_rows(7, start=900)
    offline = offline.set_column(offline.column_names.index("source"), "source",
                                 pa.array(["offline:hh"] * 7))
    s = ReplayShard(capacity=100, directory=run / "replay" / "offline" / "shard-0")
    s.insert(offline)
    held["offline"] += uids(s.to_table())
    s.close()
    return run, held


def test_inspect_prints_each_table_and_shard(run_dir, capsys):
    run, held = run_dir
    assert main(["buffer", "inspect", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"table online: 2 shard(s), {len(held['online'])} rows, newest policy_version 3" in out
    assert "table offline: 1 shard(s), 7 rows" in out
    assert "  shard-0: 25 rows" in out and "  shard-1: 25 rows" in out
    assert "online 25" in out and "offline:hh 7" in out
    assert "staleness (vs v3): mean" in out and "times_sampled: mean" in out
    assert out.count("reward:") == 3
    bars = [line for line in out.splitlines() if line.rstrip().endswith("#")]
    assert len(bars) >= 3


def test_export_round_trips_rows(run_dir, tmp_path, capsys):
    run, held = run_dir
    out = tmp_path / "out" / "all.parquet"
    assert main(["buffer", "export", str(run), str(out)]) == 0
    total = len(held["online"]) + len(held["offline"])
    assert f"wrote {total} rows" in capsys.readouterr().out
    table = pq.read_table(out)
    assert sorted(uids(table)) == sorted(held["online"] + held["offline"])
    assert pc.sum(table.column("times_sampled")).as_py() > 0  # bookkeeping is exported too

    only = tmp_path / "offline.parquet"
    assert main(["buffer", "export", str(run), str(only), "--table", "offline"]) == 0
    assert sorted(uids(pq.read_table(only))) == sorted(held["offline"])


def test_run_dir_without_replay_is_an_error(tmp_path, capsys):
    assert main(["buffer", "inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "replay") in err
    assert main(["buffer", "export", str(tmp_path), str(tmp_path / "x.parquet")]) == 2
    assert str(tmp_path / "replay") in capsys.readouterr().err


def test_unknown_table_is_an_error(run_dir, tmp_path, capsys):
    run, _ = run_dir
    assert main(["buffer", "export", str(run), str(tmp_path / "x.parquet"), "--table", "nope"]) == 2
    err = capsys.readouterr().err
    assert "'nope'" in err and "offline" in err and "online" in err


def test_export_refuses_to_overwrite_or_to_write_a_non_parquet_name(run_dir, tmp_path, capsys):
    run, _ = run_dir
    config = run / "config.yaml"
    config.write_text("keep me\n")
    assert main(["buffer", "export", str(run), str(config)]) == 2
    assert ".parquet" in capsys.readouterr().err
    assert config.read_text() == "keep me\n"
    assert main(["buffer", "export", str(run), str(tmp_path)]) == 2
    out = tmp_path / "rows.parquet"
    assert main(["buffer", "export", str(run), str(out)]) == 0
    assert main(["buffer", "export", str(run), str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["buffer", "export", str(run), str(out), "--force"]) == 0
