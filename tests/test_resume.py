"""Checkpoint and resume (case C19): a killed driver's run continues from its last checkpoint
and, in deterministic mode (--sync, one thread per actor), ends with the adapter an
uninterrupted run ends with; checkpoints are atomic; the buffer goes back with the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from rlhf_ray import checkpoint
from rlhf_ray.config import load_config
from rlhf_ray.driver import Trainer
from rlhf_ray.metrics import read_metrics
from rlhf_ray.replay import storage
from rlhf_ray.replay.shard import ReplayShard
from rlhf_ray.types import experience_table
from tests.conftest import make_rows

SYNC = ["run.sync=true", "run.steps=6", "run.checkpoint_every=2"]


def _adapter(run_dir: Path, step: int) -> dict:
    return load_file(str(checkpoint.root(run_dir) / checkpoint.tag(step) / "learner"
                         / "adapter_state.safetensors"))


def test_killed_driver_resumes_to_the_uninterrupted_runs_adapter(ray_cluster, tmp_path):
    # the uninterrupted run, in this process
    cfg = load_config(preset="tiny", overrides=[f"run.output_dir={tmp_path}", "run.name=whole",
                                                *SYNC])
    Trainer(cfg).run()
    whole = tmp_path / "whole"

    # the same run in its own driver process, SIGKILLed after step 5 (checkpoint at 4)
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlhf_ray.cli", "train", "--preset", "tiny",
         f"run.output_dir={tmp_path}", "run.name=cut", *SYNC],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cut = tmp_path / "cut"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            metrics = cut / "metrics.jsonl"
            if metrics.is_file() and '"step": 5,' in metrics.read_text():
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert checkpoint.latest(cut)[0] == 4
    assert [r["step"] for r in read_metrics(cut)] == [1, 2, 3, 4, 5]
    stored_before = _online_inserted(cut)

    resumed_cfg = load_config(files=[str(cut / "config.yaml")])
    trainer = Trainer(resumed_cfg, cut, resume=True)
    trainer.run()

    a, b = _adapter(whole, 6), _adapter(cut, 6)
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff <= 1e-6, diff
    assert max(v.abs().max().item() for v in a.values()) > 0  # trained, not the zero init
    # step 5 was redone: the metrics are the uninterrupted run's, once each
    got, want = read_metrics(cut), read_metrics(whole)
    assert [r["step"] for r in got] == list(range(1, 7))
    for g, w in zip(got, want):
        assert g["reward/mean"] == pytest.approx(w["reward/mean"], abs=1e-9)
        assert g["policy/loss"] == pytest.approx(w["policy/loss"], abs=1e-6)
    # the rows inserted for step 5 before the kill were set aside, not lost or doubled
    account = json.loads((cut / "accounting.json").read_text())
    assert account["set_aside_rows"]["online"] == stored_before - _inserted_at(cut, 4) > 0
    assert account["samples"]["unaccounted"] == 0 and account["prompts"]["unaccounted"] == 0
    assert account == {**json.loads((whole / "accounting.json").read_text()),
                       "set_aside_rows": account["set_aside_rows"]}
    set_aside = list((cut / "replay" / "online").glob("shard-*/set-aside/step-00000004-*"))
    assert set_aside and sum(storage.read_shard(p)[0].num_rows for p in set_aside) >= 1


def _online_inserted(run_dir: Path) -> int:
    return sum(storage.read_shard(p)[1]["counters"]["inserted"]
               for p in storage.find_tables(run_dir)["online"])


def _inserted_at(run_dir: Path, step: int) -> int:
    total = 0
    for p in storage.find_tables(run_dir)["online"]:
        meta = json.loads((p / "checkpoints" / checkpoint.tag(step) / "snapshot.json").read_text())
        total += meta["counters"]["inserted"]
    return total


def test_resume_extends_a_finished_run_and_refuses_a_non_run(ray_cluster, tmp_path,
                                                             monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_never_written")  # must reach no file
    cfg = load_config(preset="tiny", overrides=[f"run.output_dir={tmp_path}", "run.name=r",
                                                "run.steps=3", "run.checkpoint_every=0"])
    Trainer(cfg).run()
    run_dir = tmp_path / "r"
    assert checkpoint.committed_steps(run_dir) == [3]  # only the final one
    more = load_config(files=[str(run_dir / "config.yaml")], overrides=["run.steps=5"])
    trainer = Trainer(more, run_dir, resume=True)
    trainer.run()
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5]
    assert checkpoint.latest(run_dir)[0] == 5
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert b"hf_secret_never_written" not in path.read_bytes(), path
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        Trainer(more, tmp_path / "nothing-here", resume=True)


def test_checkpoint_writes_are_atomic(tmp_path):
    run_dir = tmp_path
    tmp = checkpoint.begin(run_dir, 2)
    (tmp / "learner").mkdir()
    checkpoint.commit(run_dir, 2, tmp, {"step": 2}, keep=2)
    assert checkpoint.latest(run_dir)[0] == 2
    # a crash while writing step 4: a half-filled temporary folder, LATEST untouched
    tmp = checkpoint.begin(run_dir, 4)
    (tmp / "learner").mkdir()
    assert checkpoint.latest(run_dir)[0] == 2
    assert checkpoint.committed_steps(run_dir) == [2]
    # a crash after the rename but before LATEST moved: the complete folder is used
    checkpoint.commit(run_dir, 4, tmp, {"step": 4}, keep=2)
    (checkpoint.root(run_dir) / "LATEST").write_text("step-00000002\n")
    assert checkpoint.latest(run_dir)[0] == 2  # LATEST names a complete checkpoint: kept
    (checkpoint.root(run_dir) / "LATEST").write_text("step-00000009\n")
    assert checkpoint.latest(run_dir)[0] == 4  # names none: the newest complete one
    # the next write clears leftovers and keeps the newest two
    for step in (6, 8):
        checkpoint.commit(run_dir, step, checkpoint.begin(run_dir, step), {"step": step}, 2)
    assert checkpoint.committed_steps(run_dir) == [6, 8]
    assert not list(checkpoint.root(run_dir).glob(".tmp-*"))
    assert checkpoint.shard_tags_to_keep(run_dir, 2) == ["step-00000008"]


def _rows(start: int, n: int):
    rows = make_rows([[1, 2]] * n, [[3, 4]] * n, [[-1.0, -1.0]] * n)
    for i, r in enumerate(rows):
        r["uid"], r["prompt_uid"] = f"u{start + i}", f"p{start + i}"
    return experience_table(rows)


def test_shard_checkpoint_restores_rows_sampler_and_counters_and_sets_the_rest_aside(tmp_path):
    d = tmp_path / "shard-0"
    shard = ReplayShard(capacity=64, directory=d, seed=3, snapshot_every=1000)
    shard.insert(_rows(0, 10))
    shard.sample(4, 0)
    info = shard.checkpoint("step-00000001", keep=[])
    assert info["rows"] == 10 and info["inserted"] == 10
    expected_next = shard.sample(3, 0).column("uid").to_pylist()  # what comes after
    shard.insert(_rows(10, 5))
    shard.close()

    result = storage.restore_checkpoint(d, "step-00000001")
    assert result["rows_after"] == 5
    restored = ReplayShard(capacity=64, directory=d, seed=3, snapshot_every=1000)
    assert restored.size() == 10
    assert restored.stats(0)["sampled"] == 4 and restored.stats(0)["inserted"] == 10
    assert restored.sample(3, 0).column("uid").to_pylist() == expected_next  # same RNG stream
    restored.close()
    aside, _meta = storage.read_shard(result["set_aside"])
    assert aside.num_rows == 15  # everything the shard held when it was set aside
    assert set(aside.column("uid").to_pylist()) >= {f"u{i}" for i in range(10, 15)}
    with pytest.raises(FileNotFoundError, match="no checkpoint 'step-00000009'"):
        storage.restore_checkpoint(d, "step-00000009")


def test_learner_state_round_trip_is_exact(tmp_path):
    import torch

    from rlhf_ray.learner.ppo import PPOTrainer
    from tests.conftest import tiny_config

    cfg = tiny_config("algorithm.advantage=gae", "learner.ppo_epochs=2")
    rows = make_rows([[1, 2, 3]] * 4, [[4, 5], [6, 7], [5, 4], [7, 6]], [[-2.0, -2.0]] * 4,
                     reward=[1.0, 0.0, 0.5, 0.2])
    table = experience_table(rows)
    first = PPOTrainer(cfg)
    first.train_on(table)
    first.save(str(tmp_path / "ck"), {"note": "x"})
    after_first = first.train_on(table)

    second = PPOTrainer(cfg)
    assert second.load(str(tmp_path / "ck")) == {"note": "x"}
    after_second = second.train_on(table)
    assert after_second["policy/loss"] == pytest.approx(after_first["policy/loss"], abs=1e-7)
    for name, p in first.adapter_state().items():
        torch.testing.assert_close(second.adapter_state()[name], p, atol=1e-7, rtol=0)
    for a, b in zip(first.policy.value_head.parameters(), second.policy.value_head.parameters()):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=0)
    assert second.version == first.version == 2


def _fake_run(tmp_path, *overrides):
    import yaml

    cfg = load_config(preset="tiny", overrides=[f"run.output_dir={tmp_path}", "run.name=r",
                                                *overrides])
    run_dir = tmp_path / "r"
    (run_dir / "replay" / "online" / "shard-0").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return run_dir


def test_a_resume_that_changes_fixed_settings_is_refused_before_touching_the_run(tmp_path):
    from rlhf_ray.config import ConfigError

    run_dir = _fake_run(tmp_path)
    before = (run_dir / "config.yaml").read_text()
    for override, key in [("replay.num_shards=3", "replay.num_shards"),
                          ("model.lora_rank=8", "model"),
                          ("replay.sampler=prioritized", "replay.sampler")]:
        changed = load_config(files=[str(run_dir / "config.yaml")], overrides=[override])
        with pytest.raises(ConfigError, match=rf"{key} differs from the run's config.yaml"):
            Trainer(changed, run_dir, resume=True)
    assert (run_dir / "config.yaml").read_text() == before
    more = load_config(files=[str(run_dir / "config.yaml")], overrides=["run.steps=9"])
    Trainer(more, run_dir, resume=True)  # more steps are fine
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        Trainer(more, "", resume=True)


def test_one_driver_per_run_directory_and_torn_metrics_lines(tmp_path):
    from rlhf_ray.driver import lock_run_dir

    run_dir = _fake_run(tmp_path)
    fd = lock_run_dir(run_dir)
    with pytest.raises(FileExistsError, match="in use by another rlhf-ray driver"):
        lock_run_dir(run_dir)
    os.close(fd)
    os.close(lock_run_dir(run_dir))  # free again
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "rollout/pro')
    assert checkpoint.truncate_metrics(run_dir, 1) == 2
    assert read_metrics(run_dir) == [{"step": 1}]


def test_checkpoint_folders_without_a_complete_one_are_not_a_fresh_start(ray_cluster, tmp_path):
    run_dir = _fake_run(tmp_path)
    (checkpoint.root(run_dir) / "step-00000002" / "learner").mkdir(parents=True)
    cfg = load_config(files=[str(run_dir / "config.yaml")])
    with pytest.raises(FileNotFoundError, match="none is complete"):
        Trainer(cfg, run_dir, resume=True).run()
