"""Actor faults during a real tiny run: killed generators, scorers and replay shards are
restarted by Ray, their in-flight requests retried; a killed learner is replaced from the last
checkpoint; and every prompt and sample is accounted for."""

from __future__ import annotations

import json
import os
import re
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


def test_chaos_sigkilled_generator_scorer_shard_and_learner_the_run_finishes(ray_cluster,
                                                                           tmp_path):
    """One at a time: a generator, a scorer and a shard are restarted by Ray (their in-flight
    requests retried); the learner is replaced and the run goes back to its last checkpoint.
    The run ends with every prompt and sample accounted for."""
    import ray

    steps = 12
    cfg = load_config(preset="tiny", overrides=[
        f"run.output_dir={tmp_path}", "run.name=r", f"run.steps={steps}",
        "replay.sample_timeout_s=240", "run.checkpoint_every=3",
    ])
    trainer = Trainer(cfg)
    errors: list[BaseException] = []
    runner = threading.Thread(target=lambda: _run(trainer, errors))
    runner.start()
    killed: dict[str, tuple[int, int]] = {}
    try:
        for at_step, role in ((2, "generator"), (4, "scorer"), (5, "shard"), (7, "learner")):
            while trainer.step < at_step and runner.is_alive():
                time.sleep(0.2)
            assert runner.is_alive(), errors
            system = trainer.system
            actor = {"generator": system.generators[0], "scorer": system.scorers[0],
                     "shard": system.shards[0], "learner": system.learner}[role]
            old = _kill(actor)
            if role == "learner":  # a new learner, in a rebuilt system
                while trainer.system is system and runner.is_alive():
                    time.sleep(0.2)
                actor = trainer.system.learner
            new = ray.get(actor.pid.remote(), timeout=240)  # answered by the new process
            killed[role] = (old, new)
    finally:
        runner.join(timeout=900)
    assert not errors, errors
    assert set(killed) == {"generator", "scorer", "shard", "learner"}
    assert all(old != new for old, new in killed.values()), killed

    records = read_metrics(trainer.run_dir)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert records[-1]["health/learner_restarts"] == 1
    log_text = (trainer.run_dir / "train.log").read_text()
    assert re.search(r"the learner died at step (8|9|10)\b", log_text), log_text
    assert "continuing from step-00000006" in log_text
    # nothing unaccounted: independent counts of the cursor, the reports and the buffer
    account = json.loads((trainer.run_dir / "accounting.json").read_text())
    prompts, samples = account["prompts"], account["samples"]
    assert prompts["taken"] == prompts["generated"] + prompts["dropped"] + prompts["failed"]
    assert samples["generated"] == (samples["stored"] + samples["quarantined"]
                                    + samples["group_dropped"])
    assert samples["generated"] > 0 and account["learner_restarts"] == 1
    # the requests in flight at the last step finish before the final checkpoint
    assert samples["stored"] >= records[-1]["replay/inserted"]
    # the retried requests were not lost: the restarts happened within Ray's retries
    assert sum(r.get("rollout/requests_failed", 0) for r in records) == 0


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
