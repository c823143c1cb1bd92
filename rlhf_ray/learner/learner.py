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
    """One learner; with ``learner.num = L`` it is rank ``rank`` of L data-parallel learners
    (see ``distributed.py``): each draws ``batch_size / L`` rows, rank 0 publishes."""

    def __init__(self, cfg: Config, replay_shards: list, weight_store=None,
                 offline_shards: list | None = None, rank: int = 0, world: int = 1):
        torch.set_num_threads(cfg.learner.torch_threads)
        from rlhf_ray.learner.ppo import PPOTrainer

        self.cfg = cfg
        self.rank, self.world = rank, world
        self.trainer = PPOTrainer(cfg)
        # ranks draw with different random streams (the same stream would pick the same rows)
        self.replay = make_replay_client(cfg, replay_shards, 7919 * rank)
        self.offline = (make_replay_client(cfg, offline_shards, 1 + 7919 * rank)
                        if offline_shards else None)
        self.weight_store = weight_store if rank == 0 else None
        self.version = 0  # the last published version; generators serve it
        self.publish_failures = 0

    # -- data parallel ---------------------------------------------------------------------
    def rendezvous(self) -> tuple[str, int]:
        """Rank 0: the address the group meets at."""
        from rlhf_ray.learner.distributed import rendezvous_address

        return rendezvous_address()

    def join(self, address: str, port: int) -> int:
        from rlhf_ray.learner.distributed import DataParallel

        # the models stay on the CPU in this build (num_gpus only reserves a GPU), so gloo
        self.trainer.dp = DataParallel(self.rank, self.world, address, port, backend="gloo",
                                       timeout_s=self.cfg.learner.dist_timeout_s)
        return self.rank

    def _draw(self, client, n: int, beta: float):
        """Waits until ``n`` rows are servable, then samples them. Several learners draw from
        one buffer at once, so a sample can come back short (another rank took rows between
        the wait and the sample); the rest is drawn again. The parts' importance weights are
        each normalized by their own maximum, and a row may then appear twice in a batch (when
        ``replay.max_times_sampled`` allows it)."""
        import numpy as np
        import pyarrow as pa

        from rlhf_ray.replay.client import RateLimitTimeout, SampledBatch

        timeout = self.cfg.replay.sample_timeout_s
        parts, need = [], n
        while need > 0:
            if not client.wait_for(need, self.version, timeout):
                eligible = client.num_eligible(self.version)
                servable = client.num_servable(self.version)
                limited = (" (the rate limiter holds back the rest: fewer rows were inserted "
                           "than replay.samples_per_insert needs)"
                           if servable < min(eligible, need) else "")
                raise RateLimitTimeout(
                    f"learner waited {timeout:.0f}s for {need} servable rows at version "
                    f"{self.version}: {eligible} eligible, {servable} servable{limited}; the "
                    "generators/scorers are stalled or too slow (see rollout/ and reward/ "
                    "metrics)"
                )
            part = client.sample_batch(need, self.version, beta)
            parts.append(part)
            need -= part.table.num_rows
        if len(parts) == 1:
            return parts[0]
        return SampledBatch(pa.concat_tables([p.table for p in parts]),
                            np.concatenate([p.probabilities for p in parts]),
                            np.concatenate([p.weights for p in parts]), parts[0].num_eligible)

    def step(self) -> dict:
        import numpy as np
        import pyarrow as pa

        from rlhf_ray.config import batch_split
        from rlhf_ray.replay.samplers import annealed_beta
        from rlhf_ray.weights.store import publish, state_nbytes

        cfg = self.cfg
        n_on, n_off = batch_split(cfg, self.world)
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
        # rank 0 publishes the new adapter; a failed publish keeps the old version for the
        # generators
        if self.world > 1 and self.rank > 0:
            self.version = self.trainer.version
        elif self.weight_store is not None:
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
        import json
        from pathlib import Path

        rngs = {"replay_rng": self.replay.rng_state(),
                "offline_rng": self.offline.rng_state() if self.offline else None}
        if self.rank > 0:  # the weights and optimizer are rank 0's; only the streams differ
            Path(path).mkdir(parents=True, exist_ok=True)
            (Path(path) / f"rank-{self.rank}.json").write_text(json.dumps(rngs))
            return path
        extra = {"published_version": self.version, "publish_failures": self.publish_failures,
                 **rngs}
        self.trainer.save(path, extra)
        return path

    def load(self, path: str) -> int:
        """Restores a ``save``; publishes the restored adapter as the saved version (the
        weight store of a resumed run starts below it), so generators serve it next."""
        from rlhf_ray.weights.store import publish

        import json
        from pathlib import Path

        extra = self.trainer.load(path)
        self.version = int(extra["published_version"])
        self.publish_failures = int(extra["publish_failures"])
        if self.rank > 0:
            own = Path(path) / f"rank-{self.rank}.json"
            # a run resumed with more learners: the new ranks keep their fresh streams
            extra = json.loads(own.read_text()) if own.is_file() else {
                "replay_rng": self.replay.rng_state(), "offline_rng": None}
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
