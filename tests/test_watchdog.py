"""The watchdog: a role with a call in flight for longer than run.watchdog_timeout_s is
reported with its name and last activity, in the log and in the health/ metrics, and the run
goes on when the role recovers."""

from __future__ import annotations

import time

from rlhf_ray.config import load_config
from rlhf_ray.driver import Trainer
from rlhf_ray.metrics import read_metrics
from rlhf_ray.scoring.rewards import letter_e_reward


def slow_reward(prompt: str, response: str) -> float:
    """letter-e, but 0.3 s a call: one scorer request (8 samples) takes about 2.4 s."""
    time.sleep(0.3)
    return letter_e_reward(prompt, response)


def test_a_slow_scorer_is_reported_as_stalled_with_its_last_activity(ray_cluster, tmp_path):
    cfg = load_config(preset="tiny", overrides=[
        f"run.output_dir={tmp_path}", "run.name=w", "run.steps=3", "run.sync=true",
        "scorer.reward=tests.test_watchdog:slow_reward", "run.watchdog_timeout_s=1",
    ])
    trainer = Trainer(cfg)
    trainer.run()
    log_text = (trainer.run_dir / "train.log").read_text()
    stalls = [line for line in log_text.splitlines() if "watchdog: scorer 0 has had a score call"
              in line]
    assert stalls, log_text
    assert "run.watchdog_timeout_s=1" in stalls[0]
    assert "its last activity: nothing yet" in stalls[0]  # the first request
    assert len(stalls) >= 3  # one per step's request
    assert "its last activity: scored a request" in stalls[1]
    assert "watchdog: scorer 0 made progress again" in log_text
    records = read_metrics(trainer.run_dir)
    assert records[-1]["health/stall_events"] == trainer.stall_events >= len(stalls) >= 1
    assert all(r["health/stalled_roles"] == 0 for r in records)  # recovered at every step
    assert "watchdog: learner" not in log_text  # the learner's steps are quick
