"""The Learner: draws batches from the replay buffer, trains, publishes the new adapter.

It pulls its own batches (the driver only says "step"), so generators never wait on it; a wait
for eligible rows longer than `replay.sample_timeout_s` is an error that names the stalled side.
"""

from __future__ import annotations

import logging
import time

import torch

from rlhf_ray.config import Config


class Learner:
    def __init__(self, cfg: Config, replay_shards: list, weight_store=None):
        torch.set_num_threads(cfg.learner.torch_threads)
        from rlhf_ray.learner.ppo import PPOTrainer
        from rlhf_ray.replay.client import ReplayClient

        self.cfg = cfg
        self.trainer = PPOTrainer(cfg)
        self.replay = ReplayClient(replay_shards)
        self.weight_store = weight_store
        self.version = 0  # the last published version; generators serve it
        self.publish_failures = 0

    def step(self) -> dict:
        from rlhf_ray.weights.store import publish, state_nbytes

        cfg = self.cfg
        n = cfg.learner.batch_size
        start = time.perf_counter()
        if not self.replay.wait_for(n, self.version, cfg.replay.sample_timeout_s):
            eligible = self.replay.num_eligible(self.version)
            raise TimeoutError(
                f"learner waited {cfg.replay.sample_timeout_s:.0f}s for {n} eligible rows at "
                f"version {self.version} and found {eligible}: the generators/scorers are "
                "stalled or too slow (see rollout/ and reward/ metrics)"
            )
        wait_s = time.perf_counter() - start
        table = self.replay.sample(n, self.version)
        metrics = self.trainer.train_on(table)
        metrics["replay/sample_wait_s"] = wait_s
        # staleness against the published version the generators were serving
        metrics["learner/staleness_mean"] = float(
            sum(self.version - v for v in table.column("policy_version").to_pylist()) / len(table)
        )
        # publish the new adapter; a failed publish keeps the old version for the generators
        if self.weight_store is not None:
            state = self.trainer.adapter_state()
            t0 = time.perf_counter()
            try:
                self.version = publish(self.weight_store, state)
            except Exception:
                self.publish_failures += 1
                logging.getLogger("rlhf_ray").exception(
                    "publishing version %d failed; generators keep version %d",
                    self.trainer.version, self.version)
            metrics["weights/broadcast_s"] = time.perf_counter() - t0
            metrics["weights/bytes"] = float(state_nbytes(state))
            metrics["weights/publish_failures"] = float(self.publish_failures)
        else:
            self.version = self.trainer.version
        metrics["weights/version"] = float(self.version)
        metrics["learner/samples"] = _samples(table)
        return metrics

    def save(self, path: str) -> str:
        self.trainer.save(path)
        return path

    def get_version(self) -> int:
        return self.version


def _samples(table, k: int = 2) -> list[dict]:
    """A few (prompt, response, reward) rows of the batch, for the log."""
    rows = table.slice(0, k).select(["prompt_text", "response_text", "reward"]).to_pylist()
    return [{"prompt": r["prompt_text"], "response": r["response_text"],
             "reward": round(float(r["reward"]), 3)} for r in rows]
