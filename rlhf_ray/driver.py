"""The driver: wires the actors and runs the loop. It does no heavy compute itself.

Asynchronous pipeline (default). Each generator always has a request in flight unless the
buffer is far enough ahead of the learner; each finished request goes to a scorer (round-robin),
which inserts the scored rows into the replay shards; the learner steps back to back, drawing
its own batches. The generators run ahead of the learner by at most `replay.max_staleness`
batches of new rows (counting rows buffered and rows in flight; with a replay ratio
`replay.samples_per_insert` = k, one learner step consumes batch_size / k new rows), so samples
are not generated only to go stale. With `replay.samples_per_insert` set, the shards' rate
limiters also hold back inserts that run ahead of the learner's sampling.

Faults: generators and scorers are restarted by Ray with their in-flight request retried
(`run.max_restarts`); a request that fails for good counts its prompts as dropped, and
`run.max_failures` such failures of one role in a row stop the run with an error naming it. The
learner is not restarted, and a run cannot be resumed yet.

`--sync` (`run.sync=true`) instead alternates strictly: generate and score rounds until the
buffer can serve a full batch, then one learner step. With a replay ratio k (via
`replay.max_times_sampled` / `replay.samples_per_insert`) the buffer serves k batches per
generated batch, so generation runs on every k-th step.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import yaml

from rlhf_ray.config import Config, batch_split
from rlhf_ray.types import PromptBatch

log = logging.getLogger("rlhf_ray")

# Step metrics that are sums over the generation/scoring work since the last learner step.
_SUMMED = ("rollout/prompts", "rollout/prompts_truncated", "rollout/prompts_dropped",
           "rollout/samples", "rollout/tokens", "reward/quarantined", "reward/groups_dropped",
           "perf/generate_s", "perf/score_s", "replay/insert_wait_s", "rollout/requests_failed")


def make_run_dir(cfg: Config) -> Path:
    name = cfg.run.name or datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.run.output_dir) / name
    if run_dir.exists() and any(run_dir.iterdir()):
        # also a run that failed at start: its replay/ logs would be reopened by the new run
        raise FileExistsError(
            f"run directory {run_dir} already exists and is not empty; choose another run.name "
            "or remove it"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    latest = Path(cfg.run.output_dir) / "latest"
    if latest.is_symlink() or not latest.exists():
        latest.unlink(missing_ok=True)
        latest.symlink_to(run_dir.resolve(), target_is_directory=True)
    return run_dir


def setup_logging(run_dir: Path) -> None:
    log.setLevel(logging.INFO)
    for h in list(log.handlers):
        log.removeHandler(h)
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(console)
    log.propagate = False


def required_cpus(cfg: Config) -> float:
    return (cfg.generator.num * cfg.generator.num_cpus + cfg.scorer.num * cfg.scorer.num_cpus
            + cfg.learner.num * cfg.learner.num_cpus)


def init_ray(cfg: Config):
    import ray

    env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for key in ("RLHF_RAY_CACHE", "HF_HUB_OFFLINE"):
        if key in os.environ:
            env[key] = os.environ[key]
    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return ray
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
    else:
        # The local cluster advertises at least the CPUs the config asks for: each actor runs
        # torch_threads threads, so a 2-core machine runs 3 one-thread actors, oversubscribed.
        cpus = cfg.run.ray_num_cpus or max(os.cpu_count() or 1, math.ceil(required_cpus(cfg)))
        ray.init(num_cpus=cpus, include_dashboard=False, runtime_env={"env_vars": env},
                 log_to_driver=True)
    return ray


def check_resources(cfg: Config) -> None:
    """A request the cluster cannot satisfy is an error before any actor starts."""
    import ray

    total = ray.cluster_resources()
    roles = [("generator", cfg.generator), ("scorer", cfg.scorer), ("learner", cfg.learner)]
    for resource, attr in (("CPU", "num_cpus"), ("GPU", "num_gpus")):
        have = total.get(resource, 0.0)
        need = sum(role.num * getattr(role, attr) for _, role in roles)
        for name, role in roles:
            if getattr(role, attr) > have:
                raise RuntimeError(
                    f"{name}.{attr}={getattr(role, attr)} but the cluster has {have:g} {resource}"
                )
        if need > have:
            parts = ", ".join(f"{n}: {r.num} x {getattr(r, attr):g}" for n, r in roles)
            raise RuntimeError(
                f"the config asks for {need:g} {resource} ({parts}) but the cluster has {have:g}"
            )


@dataclass
class System:
    generators: list
    scorers: list
    shards: list
    learner: object
    weight_store: object
    replay: object  # ReplayClient of the online table
    offline_shards: list = field(default_factory=list)

    def shutdown(self) -> None:
        """Kills this run's actors (a driver that lives on, e.g. a test session, gets its CPUs
        and memory back)."""
        import ray

        for actor in [*self.generators, *self.scorers, *self.shards, *self.offline_shards,
                      self.learner, self.weight_store]:
            ray.kill(actor)


def start_shards(cfg: Config, table: str, run_dir: Path | None) -> list:
    """The shard actors of one replay table: ``online`` (rate-limited, staleness-limited) or
    ``offline`` (rows loaded from files: no staleness, reuse or rate limit)."""
    from rlhf_ray.config import replay_error_buffer, replay_min_size
    from rlhf_ray.replay.shard import make_shard_actors

    rep = cfg.replay
    online = table == "online"
    limited = online and rep.samples_per_insert is not None
    return make_shard_actors(
        rep.num_shards, capacity=rep.capacity,
        max_staleness=rep.max_staleness if online else None,
        max_times_sampled=rep.max_times_sampled if online else None,
        seed=cfg.run.seed + (0 if online else 1000),
        sampler=rep.sampler, alpha=rep.priority_alpha, min_priority=rep.min_priority,
        samples_per_insert=rep.samples_per_insert if limited else None,
        min_size_to_sample=replay_min_size(cfg) if limited else 1,
        error_buffer=replay_error_buffer(cfg) if limited else None,
        # durable shards keep a write-ahead log and snapshots; Ray restarts a dead one
        directory=str(run_dir / "replay" / table) if (rep.durable and run_dir) else None,
        snapshot_every=rep.snapshot_every, fsync=rep.fsync,
    )


def build_system(cfg: Config, run_dir: Path | None = None) -> System:
    import ray

    from rlhf_ray.generation.generator import Generator
    from rlhf_ray.learner.learner import Learner, make_replay_client
    from rlhf_ray.models.builtin import resolve_model_path
    from rlhf_ray.scoring.scorer import RewardScorer
    from rlhf_ray.weights.store import WeightStore

    # convert/build the model once before several actors try to at the same time
    ray.get(ray.remote(num_cpus=0)(resolve_model_path).remote(cfg.model.name, cfg.model.cache_dir))
    store = ray.remote(num_cpus=0)(WeightStore).remote(keep=1)
    shards = start_shards(cfg, "online", run_dir)
    replay = make_replay_client(cfg, shards)
    offline_shards = start_shards(cfg, "offline", run_dir) if cfg.replay.offline_files else []
    g, s, lr = cfg.generator, cfg.scorer, cfg.learner
    # a dead generator or scorer is restarted by Ray and its in-flight request retried there:
    # a generate retry samples the same prompts again, a score retry re-inserts rows that
    # dedup by uid; a restarted generator pulls the newest weights before its next request
    restart = {"max_restarts": cfg.run.max_restarts, "max_task_retries": cfg.run.max_restarts}
    generators = [
        ray.remote(Generator).options(num_cpus=g.num_cpus, num_gpus=g.num_gpus, **restart)
        .remote(cfg, i, store) for i in range(g.num)
    ]
    scorers = [
        ray.remote(RewardScorer).options(num_cpus=s.num_cpus, num_gpus=s.num_gpus, **restart)
        .remote(cfg, i, replay) for i in range(s.num)
    ]
    learner = ray.remote(Learner).options(num_cpus=lr.num_cpus, num_gpus=lr.num_gpus).remote(
        cfg, shards, store, offline_shards
    )
    # surface construction errors (bad reward spec, missing model) before the loop starts
    ray.get([a.version.remote() for a in generators] + [learner.get_version.remote()])
    ray.get([sc.__ray_ready__.remote() for sc in scorers])
    if offline_shards:
        from rlhf_ray.replay.offline import load_offline_rows

        # JSONL rows are tokenized and given reference log-probs by a scorer actor
        table = load_offline_rows(cfg, scorers[0])
        loaded = make_replay_client(cfg, offline_shards, 1).insert(table)
        log.info("offline table: %d rows from %s", loaded, ", ".join(cfg.replay.offline_files))
    return System(generators, scorers, shards, learner, store, replay, offline_shards)


@dataclass
class _Window:
    """Generation/scoring stats accumulated between two learner steps."""

    sums: dict = field(default_factory=lambda: defaultdict(float))
    reward_sum: float = 0.0
    kl_sum: float = 0.0
    len_sum: float = 0.0
    trunc_sum: float = 0.0
    rows: int = 0
    lags: list = field(default_factory=list)

    def add_report(self, report, learner_version: int) -> None:
        st = report.stats
        if report.inserted:
            self.lags.append(learner_version - st.get("rollout/policy_version_mean", 0.0))
        for k in _SUMMED:
            if k in st:
                self.sums[k] += st[k]
        n = report.inserted if report.inserted else 0
        if n and math.isfinite(st.get("reward/mean", float("nan"))):
            self.reward_sum += st["reward/mean"] * n
            self.kl_sum += st["rollout/kl_ref"] * n
            self.len_sum += st["rollout/response_len_mean"] * n
            self.trunc_sum += st["rollout/truncated_frac"] * n
            self.rows += n

    def flush(self) -> dict:
        out = dict(self.sums)
        if self.rows:
            out["reward/mean"] = self.reward_sum / self.rows
            out["rollout/kl_ref"] = self.kl_sum / self.rows
            out["rollout/response_len_mean"] = self.len_sum / self.rows
            out["rollout/truncated_frac"] = self.trunc_sum / self.rows
        if self.lags:
            out["weights/version_lag_mean"] = sum(self.lags) / len(self.lags)
        if out.get("perf/generate_s"):
            out["perf/generate_tokens_per_s"] = out.get("rollout/tokens", 0) / out["perf/generate_s"]
        self.__init__()
        return out


class Trainer:
    """Runs one training job: the actors, the loop, the metrics and the final adapter."""

    def __init__(self, cfg: Config, run_dir: Path | None = None):
        from rlhf_ray.config import preflight
        from rlhf_ray.data.prompts import PromptCursor, load_prompts, split_prompts

        self.cfg = cfg
        preflight(cfg)
        train, _held_out = split_prompts(load_prompts(cfg.data), cfg.data.eval_fraction)
        self.cursor = PromptCursor(train, seed=cfg.data.seed)
        self.run_dir = run_dir or make_run_dir(cfg)  # only once the inputs are known good
        self._failing_batches = 0
        self._failures: dict[str, int] = {}  # role -> requests failed in a row
        self.system: System | None = None
        self.step = 0
        self.samples_scored = 0

    def _prompt_batch(self) -> PromptBatch:
        g = self.cfg.generator
        return PromptBatch(self.cursor.take(g.prompts_per_request), n_samples=g.n_samples)

    def run(self) -> dict:
        import ray
        from tqdm import tqdm

        from rlhf_ray.metrics import MetricsSink, plot_curves

        cfg, run_dir = self.cfg, self.run_dir
        setup_logging(run_dir)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        init_ray(cfg)
        check_resources(cfg)
        log.info("run directory: %s", run_dir)
        t0 = time.perf_counter()
        system = self.system = build_system(cfg, run_dir)
        log.info("actors ready in %.1fs", time.perf_counter() - t0)
        sink = MetricsSink(run_dir, tensorboard=cfg.run.tensorboard)
        bar = tqdm(total=cfg.run.steps, desc="train", disable=not cfg.run.progress, unit="step")
        self._t_loop = time.perf_counter()
        try:
            loop = self._sync_loop if cfg.run.sync else self._async_loop
            reward = float("nan")
            for step_metrics in loop(system):
                sink.write(self.step, step_metrics)
                # a step may see no newly scored batch; the bar keeps the last reward then
                reward = step_metrics.get("reward/mean", reward)
                bar.update(1)
                bar.set_postfix(reward=f"{reward:.3f}",
                                kl=f"{step_metrics.get('policy/kl_ref', 0.0):.3f}")
            ray.get(system.learner.save.remote(str(run_dir / "checkpoint")))
        finally:
            bar.close()
            sink.close()
            system.shutdown()
        self._finish(sink.history)
        return sink.history[-1] if sink.history else {}

    def _log_step(self, metrics: dict, window: dict, replay_stats: dict, step_s: float) -> dict:
        import ray  # noqa: F401

        samples = metrics.pop("learner/samples", [])
        merged = {**window, **metrics}
        merged.update({f"replay/{k}": v for k, v in replay_stats.items()
                       if f"replay/{k}" in _replay_keys()})
        elapsed = time.perf_counter() - self._t_loop
        merged["perf/step_s"] = step_s
        merged["perf/elapsed_s"] = elapsed
        merged["perf/samples_per_s"] = self.samples_scored / elapsed if elapsed > 0 else 0.0
        every = self.cfg.run.log_samples_every
        if every and (self.step == 1 or self.step % every == 0):
            for s in samples:
                log.info("step %d sample | %r -> %r | reward %.3f", self.step, s["prompt"],
                         s["response"], s["reward"])
        return merged

    def _async_loop(self, system: System):
        import ray

        cfg = self.cfg
        batch = cfg.learner.batch_size
        rows_per_request = cfg.generator.prompts_per_request * cfg.generator.n_samples
        # new rows one learner step consumes: the online share of a batch over the replay ratio
        online_batch = batch_split(cfg)[0]
        spi = cfg.replay.samples_per_insert or 1.0
        new_per_step = online_batch / spi
        if spi <= 1:
            ahead_limit = max(new_per_step * (1 + cfg.replay.max_staleness), batch)
        else:
            # with reuse, a row waits ahead/new_per_step steps, then needs ceil(spi) more
            # versions for its uses; more look-ahead would let rows go stale before them
            room = cfg.replay.max_staleness + 1 - math.ceil(spi)
            ahead_limit = new_per_step * max(1, room)
        pending: dict = {}  # ObjectRef -> (kind, index)
        in_flight_rows = 0
        buffered_rows = 0  # inserted but not yet consumed by the learner
        learner_version = 0
        window = _Window()
        next_scorer = 0
        last_step_t = time.perf_counter()

        def maybe_generate(i: int) -> None:
            nonlocal in_flight_rows
            if buffered_rows + in_flight_rows > ahead_limit:
                # over the look-ahead, except when nothing is in flight and the buffer cannot
                # serve the learner a batch (e.g. a rate limiter's per-shard minimum size not
                # reached): then the learner waits for this generator, so it must run
                if in_flight_rows or system.replay.num_servable(learner_version) >= online_batch:
                    return
            ref = system.generators[i].generate.remote(self._prompt_batch())
            pending[ref] = ("generate", i)
            in_flight_rows += rows_per_request

        for i in range(len(system.generators)):
            maybe_generate(i)
        pending[system.learner.step.remote()] = ("learn", 0)
        idle_generators = set()
        while self.step < cfg.run.steps:
            ready, _ = ray.wait(list(pending), num_returns=1)
            ref = ready[0]
            kind, idx = pending.pop(ref)
            if kind == "generate":
                scorer = system.scorers[next_scorer % len(system.scorers)]
                next_scorer += 1
                pending[scorer.score.remote(ref)] = ("score", (idx, ref))
                idle_generators.add(idx)
            elif kind == "score":
                in_flight_rows -= rows_per_request
                report = self._report_or_failure(ref, *idx, window)
                if report is not None:
                    buffered_rows += report.inserted
                    self.samples_scored += report.inserted
                    window.add_report(report, learner_version)
                    self._quarantine_log(report)
            else:
                metrics = ray.get(ref)
                self.step += 1
                learner_version = int(metrics["weights/version"])
                buffered_rows = max(0.0, buffered_rows - new_per_step)
                now = time.perf_counter()
                stats = system.replay.stats(learner_version)
                # rows that went stale unused leave the buffer without being counted above;
                # the buffer's own count corrects the estimate downwards (else the driver
                # could wait for a learner that waits for it)
                buffered_rows = min(buffered_rows, float(stats["eligible"]))
                yield self._log_step(metrics, window.flush(), stats, now - last_step_t)
                last_step_t = now
                if self.step < cfg.run.steps:
                    pending[system.learner.step.remote()] = ("learn", 0)
            # generators whose last request was handed on get a new one when the budget allows
            for i in sorted(idle_generators):
                before = len(pending)
                maybe_generate(i)
                if len(pending) > before:
                    idle_generators.discard(i)
        for ref in pending:  # requests still running are abandoned; their rows are not needed
            try:
                ray.cancel(ref)
            except Exception:  # a task that already finished cannot be cancelled
                pass

    def _sync_loop(self, system: System):
        import ray

        cfg = self.cfg
        online_batch = batch_split(cfg)[0]
        version = 0
        while self.step < cfg.run.steps:
            start = time.perf_counter()
            window = _Window()
            while system.replay.num_servable(version) < online_batch:
                refs = [g.generate.remote(self._prompt_batch()) for g in system.generators]
                scored = [system.scorers[i % len(system.scorers)].score.remote(r)
                          for i, r in enumerate(refs)]
                reports = [self._report_or_failure(sref, i, gref, window)
                           for i, (sref, gref) in enumerate(zip(scored, refs))]
                for report in reports:
                    if report is None:
                        continue
                    window.add_report(report, version)
                    self._quarantine_log(report)
                    self.samples_scored += report.inserted
            metrics = ray.get(system.learner.step.remote())
            self.step += 1
            version = int(metrics["weights/version"])
            stats = system.replay.stats(version)
            yield self._log_step(metrics, window.flush(), stats, time.perf_counter() - start)

    def _report_or_failure(self, score_ref, gen_index: int, gen_ref, window: _Window):
        """The scorer's report, or None when the request failed for good (Ray's restarts and
        retries exhausted, or the call raised). A failed request's prompts count as dropped;
        `run.max_failures` failures in a row stop the run with an error naming the role."""
        import ray
        from ray.exceptions import RayError

        try:
            report = ray.get(score_ref)
        except RayError as e:
            try:
                ray.get(gen_ref)
                role = "scorer"
            except RayError:
                role = f"generator {gen_index}"
            self._failures[role] = self._failures.get(role, 0) + 1
            prompts = self.cfg.generator.prompts_per_request
            window.sums["rollout/prompts_dropped"] += prompts
            window.sums["rollout/requests_failed"] += 1
            log.warning("%s failed a request (%d in a row); its %d prompts count as dropped: %s",
                        role, self._failures[role], prompts, str(e).splitlines()[0])
            if self._failures[role] >= self.cfg.run.max_failures:
                raise RuntimeError(
                    f"{role} failed {self._failures[role]} requests in a row "
                    f"(run.max_failures={self.cfg.run.max_failures}); last error: {e}"
                ) from e
            return None
        self._failures.clear()
        return report

    def _quarantine_log(self, report) -> None:
        """Logs a few quarantined samples per batch, and stops a run whose reward fails on every
        sample of several batches in a row (nothing could ever be trained on)."""
        for q in report.quarantine[:3]:
            log.warning("quarantined sample %s (prompt %s): %s", q["uid"], q["prompt_uid"],
                        q["reason"])
        if len(report.quarantine) > 3:
            log.warning("... and %d more quarantined samples in this batch",
                        len(report.quarantine) - 3)
        samples = report.stats.get("rollout/samples", 0)
        if samples and report.inserted == 0:
            self._failing_batches += 1
        else:
            self._failing_batches = 0
        if self._failing_batches >= 3:
            reason = report.quarantine[0]["reason"] if report.quarantine else (
                "every prompt was dropped or every group was left with < 2 samples")
            raise RuntimeError(
                f"3 batches in a row gave no training row (scorer.reward={self.cfg.scorer.reward!r}"
                f"): {reason}"
            )

    def _finish(self, history: list[dict]) -> None:
        import shutil

        from rlhf_ray.metrics import plot_curves

        adapter = self.run_dir / "checkpoint" / "adapter"
        if adapter.exists():
            shutil.copytree(adapter, self.run_dir / "adapter", dirs_exist_ok=True)
        if self.cfg.run.plots and history:
            plot_curves(history, self.run_dir / "curves.png")
        if history:
            (self.run_dir / "summary.yaml").write_text(
                yaml.safe_dump({k: v for k, v in history[-1].items()}, sort_keys=True)
            )
        log.info("done: %d steps in %.0fs; adapter in %s", self.step,
                 time.perf_counter() - self._t_loop, self.run_dir / "adapter")


def _replay_keys() -> set[str]:
    from rlhf_ray.metrics import GLOSSARY

    return {k for k in GLOSSARY if k.startswith("replay/")}


def train(cfg: Config, run_dir: Path | None = None) -> Path:
    trainer = Trainer(cfg, run_dir)
    trainer.run()
    return trainer.run_dir
