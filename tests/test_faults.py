"""Actor faults during a real tiny run: killed generators, scorers and replay shards are
restarted by Ray, their in-flight requests retried, and every sample is accounted for."""

from __future__ import annotations

import os
import signal
import threading
import time

from rlhf_ray.config import load_config
from rlhf_ray.driver import Trainer
from rlhf_ray.metrics import read_metrics


def _kill(actor) -> int:
    import ray

    pid = ray.get(actor.pid.remote(), timeout=120)
    os.kill(pid, signal.SIGKILL)
    return pid


def test_sigkilled_generator_scorer_and_shard_restart_and_the_run_finishes(ray_cluster,
                                                                          tmp_path):
    import ray

    steps = 10
    cfg = load_config(preset="tiny", overrides=[
        f"run.output_dir={tmp_path}", "run.name=r", f"run.steps={steps}",
        "replay.sample_timeout_s=240",
    ])
    trainer = Trainer(cfg)
    errors: list[BaseException] = []
    runner = threading.Thread(target=lambda: _run(trainer, errors))
    runner.start()
    killed: dict[str, tuple[int, int]] = {}
    try:
        for at_step, role in ((2, "generator"), (4, "scorer"), (6, "shard")):
            while trainer.step < at_step and runner.is_alive():
                time.sleep(0.2)
            assert runner.is_alive(), errors
            system = trainer.system
            actor = {"generator": system.generators[0], "scorer": system.scorers[0],
                     "shard": system.shards[0]}[role]
            old = _kill(actor)
            new = ray.get(actor.pid.remote(), timeout=240)  # answered by the restarted actor
            killed[role] = (old, new)
    finally:
        runner.join(timeout=900)
    assert not errors, errors
    assert all(old != new for old, new in killed.values()), killed

    records = read_metrics(trainer.run_dir)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    # every reported sample was stored or quarantined (a retried score inserts nothing twice)
    generated = sum(r.get("rollout/samples", 0) for r in records)
    quarantined = sum(r.get("reward/quarantined", 0) for r in records)
    assert generated == records[-1]["replay/inserted"] + quarantined
    assert sum(r.get("rollout/requests_failed", 0) for r in records) == 0  # all were retried


def _run(trainer, errors):
    try:
        trainer.run()
    except BaseException as e:  # noqa: BLE001 (reported by the test)
        errors.append(e)


def test_a_role_that_keeps_failing_stops_the_run_with_its_name(ray_cluster, tmp_path):
    """No restarts left: the killed generator's request fails for good, its prompts count as
    dropped, and with run.max_failures=1 the run stops with an error naming the generator."""
    import pytest

    cfg = load_config(preset="tiny", overrides=[
        f"run.output_dir={tmp_path}", "run.name=r", "run.steps=50", "run.max_restarts=0",
        "run.max_failures=1",
    ])
    trainer = Trainer(cfg)
    errors: list[BaseException] = []
    runner = threading.Thread(target=lambda: _run(trainer, errors))
    runner.start()
    while trainer.step < 1 and runner.is_alive():
        time.sleep(0.2)
    _kill(trainer.system.generators[0])
    runner.join(timeout=600)
    assert not runner.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError), errors
    assert "generator 0 failed 1 requests in a row" in str(errors[0])
