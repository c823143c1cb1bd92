"""The Learner: draws batches from the replay buffer, trains, publishes the new adapter.

It pulls its own batches (the driver only says "step"), so generators never wait on it; a wait
for servable rows longer than `replay.sample_timeout_s` is an error that names the stalled side.

A batch is `(1 - replay.offline_fraction) * batch_size` rows from the online table plus the rest
from the offline table (when one is configured). With prioritized sampling each row's importance
weight (beta annealed from `replay.priority_beta` to 1 over `run.steps`) scales its loss, and the
trainer's new per-row priorities go back to the buffer after the update.
"""

from __future__ import annotations

import logging
import time

import torch

from rlhf_ray.config import Config


def make_replay_client(cfg: Config, shards: list, seed_offset: int = 0):
    """A ReplayClient configured like the shards the driver started."""
    from rlhf_ray.replay.client import ReplayClient

    rep = cfg.replay
    return ReplayClient(shards, seed=cfg.run.seed + seed_offset, sampler=rep.sampler,
                        alpha=rep.priority_alpha, min_priority=rep.min_priority,
                        insert_timeout_s=rep.insert_timeout_s)


class Learner:
    def __init__(self, cfg: Config, replay_shards: list, weight_store=None,
                 offline_shards: list | None = None):
        torch.set_num_threads(cfg.learner.torch_threads)
        from rlhf_ray.learner.ppo import PPOTrainer

        self.cfg = cfg
        self.trainer = PPOTrainer(cfg)
        self.replay = make_replay_client(cfg, replay_shards)
        self.offline = make_replay_client(cfg, offline_shards, 1) if offline_shards else None
        self.weight_store = weight_store
        self.version = 0  # the last published version; generators serve it
        self.publish_failures = 0

    def _draw(self, client, n: int, beta: float):
        """Waits until ``n`` rows are servable, then samples them."""
        from rlhf_ray.replay.client import RateLimitTimeout

        timeout = self.cfg.replay.sample_timeout_s
        if not client.wait_for(n, self.version, timeout):
            eligible = client.num_eligible(self.version)
            servable = client.num_servable(self.version)
            limited = (" (the rate limiter holds back the rest: fewer rows were inserted than "
                       "replay.samples_per_insert needs)" if servable < min(eligible, n) else "")
            raise RateLimitTimeout(
                f"learner waited {timeout:.0f}s for {n} servable rows at version "
                f"{self.version}: {eligible} eligible, {servable} servable{limited}; the "
                "generators/scorers are stalled or too slow (see rollout/ and reward/ metrics)"
            )
        return client.sample_batch(n, self.version, beta)

    def step(self) -> dict:
        import numpy as np
        import pyarrow as pa

        from rlhf_ray.config import batch_split
        from rlhf_ray.replay.samplers import annealed_beta
        from rlhf_ray.weights.store import publish, state_nbytes

        cfg = self.cfg
        n_on, n_off = batch_split(cfg)
        beta = annealed_beta(cfg.replay.priority_beta, self.trainer.version, cfg.run.steps)
        start = time.perf_counter()
        parts = [self._draw(self.replay, n_on, beta)]
        if n_off:
            parts.append(self._draw(self.offline, n_off, beta))
        wait_s = time.perf_counter() - start
        table = pa.concat_tables([p.table for p in parts])
        self._last_uids = table.column("uid").to_pylist()
        weights = np.concatenate([p.weights for p in parts])
        metrics = self.trainer.train_on(table.append_column("is_weight", pa.array(weights)))
        # new priorities go back to the table each row came from
        priorities = self.trainer.row_priorities
        if cfg.replay.sampler == "prioritized":
            offset = 0
            for client, part in zip([self.replay, self.offline], parts):
                k = part.table.num_rows
                client.update_priorities(part.table.column("uid").to_pylist(),
                                         priorities[offset:offset + k])
                offset += k
        online = parts[0]
        metrics["replay/sample_wait_s"] = wait_s
        metrics["replay/effective_sample_size"] = online.effective_sample_size
        metrics["replay/is_weight_mean"] = float(online.weights.mean()) if n_on else 1.0
        metrics["replay/priority_beta"] = beta
        metrics["replay/batch_times_sampled_mean"] = float(
            np.mean(online.table.column("times_sampled").to_numpy()))
        metrics["replay/offline_rows"] = float(n_off)
        # staleness against the published version the generators were serving
        versions = online.table.column("policy_version").to_numpy()
        metrics["learner/staleness_mean"] = float(np.mean(self.version - versions))
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
        """The trainer's state (see ``PPOTrainer.save``) plus the published version, the
        publish failures and the random state of the learner's replay clients."""
        extra = {"published_version": self.version, "publish_failures": self.publish_failures,
                 "replay_rng": self.replay.rng_state(),
                 "offline_rng": self.offline.rng_state() if self.offline else None}
        self.trainer.save(path, extra)
        return path

    def load(self, path: str) -> int:
        """Restores a ``save``; publishes the restored adapter as the saved version (the
        weight store of a resumed run starts below it), so generators serve it next."""
        from rlhf_ray.weights.store import publish

        extra = self.trainer.load(path)
        self.version = int(extra["published_version"])
        self.publish_failures = int(extra["publish_failures"])
        self.replay.load_rng_state(extra["replay_rng"])
        if self.offline is not None and extra.get("offline_rng") is not None:
            self.offline.load_rng_state(extra["offline_rng"])
        if self.weight_store is not None and self.version > 0:
            publish(self.weight_store, self.trainer.adapter_state(), version=self.version)
        return self.version

    def get_version(self) -> int:
        return self.version

    def pid(self) -> int:
        """The actor's process id (for operations and fault tests)."""
        import os

        return os.getpid()


def _samples(table, k: int = 2) -> list[dict]:
    """A few (prompt, response, reward) rows of the batch, for the log."""
    rows = table.slice(0, k).select(["prompt_text", "response_text", "reward"]).to_pylist()
    return [{"prompt": r["prompt_text"], "response": r["response_text"],
             "reward": round(float(r["reward"]), 3)} for r in rows]
