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
`run.max_failures` such failures of one role in a row stop the run with an error naming it. A
learner that dies is replaced: every actor is rebuilt from the last checkpoint
(`run.checkpoint_every`, see `rlhf_ray/checkpoint.py`), at most `run.max_learner_restarts`
times. `Trainer(..., resume=True)` (`rlhf-ray train --resume RUN_DIR`) does the same for a run
whose driver was killed. A watchdog reports roles with a call in flight for longer than
`run.watchdog_timeout_s` (log and `health/` metrics); it does not cancel them.

`--sync` (`run.sync=true`) instead alternates strictly: generate and score rounds until the
buffer can serve a full batch, then one learner step. With a replay ratio k (via
`replay.max_times_sampled` / `replay.samples_per_insert`) the buffer serves k batches per
generated batch, so generation runs on every k-th step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import yaml

from rlhf_ray.config import Config, batch_split
from rlhf_ray.types import PromptBatch

log = logging.getLogger("rlhf_ray")


class RunStopped(RuntimeError):
    """The run cannot start or go on, for a reason the message states (a resource the cluster
    lacks, a role that keeps failing); the CLI prints it without a traceback."""

# Step metrics that are sums over the generation/scoring work since the last learner step.
_SUMMED = ("rollout/prompts", "rollout/prompts_truncated", "rollout/prompts_dropped",
           "rollout/samples", "rollout/tokens", "reward/quarantined", "reward/groups_dropped",
           "perf/generate_s", "perf/score_s", "replay/insert_wait_s", "rollout/requests_failed",
           "reward/samples_group_dropped")


def make_run_dir(cfg: Config) -> Path:
    name = cfg.run.name or datetime.now().strftime("%Y%m%d-%H%M%S")
    # absolute: actors on other nodes (or in other working directories) get this path
    run_dir = Path(cfg.run.output_dir).absolute() / name
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
    # inside a submitted Ray job, the job's own env_vars win: Ray refuses a driver runtime env
    # that sets one of them again
    job_env = _job_env_vars()
    env = {k: v for k, v in env.items() if k not in job_env}
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
    else:
        # The local cluster advertises at least the CPUs the config asks for: each actor runs
        # torch_threads threads, so a 2-core machine runs 3 one-thread actors, oversubscribed.
        cpus = cfg.run.ray_num_cpus or max(os.cpu_count() or 1, math.ceil(required_cpus(cfg)))
        ray.init(num_cpus=cpus, include_dashboard=False, runtime_env={"env_vars": env},
                 log_to_driver=True)
    return ray


# Settings a resumed run must keep: its checkpoint (adapter shape, value head) and its buffer
# (shard layout, sampler, limits) were made with them.
_RESUME_FIXED = ("model", "replay.num_shards", "replay.capacity", "replay.sampler",
                 "replay.priority_alpha", "replay.min_priority", "replay.max_staleness",
                 "replay.max_times_sampled", "replay.samples_per_insert",
                 "replay.min_size_to_sample", "replay.error_buffer", "replay.durable",
                 "algorithm.advantage", "data.prompts", "data.seed", "data.eval_fraction",
                 "run.seed")


def check_resumable(cfg: Config, run_dir: Path) -> None:
    """A resume must keep the settings its checkpoint and buffer were made with; an error names
    the first that differs, before anything of the run is touched."""
    from rlhf_ray.config import ConfigError, config_from_dict

    saved = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text())).to_dict()
    given = cfg.to_dict()
    for key in _RESUME_FIXED:
        a, b = saved, given
        for part in key.split("."):
            a, b = a[part], b[part]
        if a != b:
            raise ConfigError(
                f"--resume {run_dir}: {key} differs from the run's config.yaml (stored {a!r}, "
                f"given {b!r}); a resumed run keeps its model, data and replay settings"
            )


def lock_run_dir(run_dir: Path) -> int:
    """Holds RUN_DIR/.driver.lock (flock, released when the process ends): one driver per run."""
    import fcntl

    fd = os.open(run_dir / ".driver.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FileExistsError(f"{run_dir} is in use by another rlhf-ray driver (its "
                              ".driver.lock is held)") from None
    return fd


def _job_env_vars() -> dict:
    """The env_vars of the runtime env of the Ray job this driver runs as (empty outside one)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return {}
    try:
        return dict(json.loads(raw).get("runtime_env", {}).get("env_vars", {}) or {})
    except (ValueError, AttributeError, TypeError):
        return {}


def check_resources(cfg: Config) -> None:
    """A request the cluster cannot satisfy is an error before any actor starts."""
    import ray

    total = ray.cluster_resources()
    roles = [("generator", cfg.generator), ("scorer", cfg.scorer), ("learner", cfg.learner)]

    def amount(role, resource: str) -> float:
        if resource == "CPU":
            return role.num_cpus
        if resource == "GPU":
            return role.num_gpus
        return role.resources.get(resource, 0.0)

    custom = sorted({name for _, role in roles for name in role.resources})
    for resource in ("CPU", "GPU", *custom):
        have = total.get(resource, 0.0)
        need = sum(role.num * amount(role, resource) for _, role in roles)
        for name, role in roles:
            each = amount(role, resource)
            if each > have:
                key = {"CPU": "num_cpus", "GPU": "num_gpus"}.get(resource,
                                                                 f"resources.{resource}")
                raise RunStopped(
                    f"{name}.{key}={each} but the cluster has {have:g} {resource}"
                )
        if need > have:
            parts = ", ".join(f"{n}: {r.num} x {amount(r, resource):g}" for n, r in roles)
            raise RunStopped(
                f"the config asks for {need:g} {resource} ({parts}) but the cluster has {have:g}"
            )
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    for name, role in roles:
        wanted = dict(role.label_selector)
        # plain values only: selectors with operators (!, in(...)) are left to Ray
        plain = {k: v for k, v in wanted.items() if not re.match(r"^(!|in\(|!in\()", str(v))}
        if plain and not any(all(n.get("Labels", {}).get(k) == v for k, v in plain.items())
                             for n in nodes):
            raise RunStopped(
                f"{name}.label_selector={wanted}: no node of the cluster has these labels"
            )


@dataclass
class System:
    generators: list
    scorers: list
    shards: list
    learners: list  # rank 0 first
    weight_store: object
    replay: object  # ReplayClient of the online table
    offline_shards: list = field(default_factory=list)
    placement_group: object = None  # of the learners, when there are several

    @property
    def learner(self):
        """Rank 0: it publishes, checkpoints and reports the step's metrics."""
        return self.learners[0]

    def shutdown(self) -> None:
        """Kills this run's actors (a driver that lives on, e.g. a test session, gets its CPUs
        and memory back)."""
        import ray

        for actor in [*self.generators, *self.scorers, *self.shards, *self.offline_shards,
                      *self.learners, self.weight_store]:
            ray.kill(actor)
        if self.placement_group is not None:
            ray.util.remove_placement_group(self.placement_group)


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
    from rlhf_ray.learner.learner import make_replay_client
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
        ray.remote(Generator).options(num_cpus=g.num_cpus, num_gpus=g.num_gpus,
                                      **_placement(g), **restart)
        .remote(cfg, i, store) for i in range(g.num)
    ]
    scorers = [
        ray.remote(RewardScorer).options(num_cpus=s.num_cpus, num_gpus=s.num_gpus,
                                         **_placement(s), **restart)
        .remote(cfg, i, replay) for i in range(s.num)
    ]
    learners, group = _start_learners(cfg, shards, store, offline_shards)
    # surface construction errors (bad reward spec, missing model) before the loop starts
    ray.get([a.version.remote() for a in generators]
            + [learner.get_version.remote() for learner in learners])
    ray.get([sc.__ray_ready__.remote() for sc in scorers])
    if len(learners) > 1:
        address, port = ray.get(learners[0].rendezvous.remote())
        ray.get([learner.join.remote(address, port) for learner in learners])
    if offline_shards:
        from rlhf_ray.replay.offline import load_offline_rows

        # JSONL rows are tokenized and given reference log-probs by a scorer actor
        table = load_offline_rows(cfg, scorers[0])
        loaded = make_replay_client(cfg, offline_shards, 1).insert(table)
        log.info("offline table: %d rows from %s", loaded, ", ".join(cfg.replay.offline_files))
    return System(generators, scorers, shards, learners, store, replay, offline_shards, group)


def _start_learners(cfg: Config, shards: list, store, offline_shards: list):
    """The learner actors; several share a placement group (``learner.placement``), so a
    cluster that cannot hold them all is an error here rather than a silent wait."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from rlhf_ray.learner.learner import Learner

    lr = cfg.learner
    need = {"CPU": lr.num_cpus, "GPU": lr.num_gpus, **lr.resources}
    need = {k: v for k, v in need.items() if v > 0}
    group = None
    if lr.num > 1:
        labels = [dict(lr.label_selector) for _ in range(lr.num)] if lr.label_selector else None
        group = ray.util.placement_group([dict(need) for _ in range(lr.num)],
                                         strategy=lr.placement, bundle_label_selector=labels)
        try:
            ray.get(group.ready(), timeout=_PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            ray.util.remove_placement_group(group)
            raise RunStopped(
                f"learner: the cluster cannot place {lr.num} learners with {need} each "
                f"(learner.placement={lr.placement}) within {_PLACEMENT_TIMEOUT_S:.0f}s"
            ) from None
    learners = []
    for rank in range(lr.num):
        options = {"num_cpus": lr.num_cpus, "num_gpus": lr.num_gpus, **_placement(lr)}
        if group is not None:
            options.pop("label_selector", None)  # the bundles carry it
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                group, placement_group_bundle_index=rank)
        learners.append(ray.remote(Learner).options(**options).remote(
            cfg, shards, store, offline_shards, rank, lr.num))
    return learners, group


_PLACEMENT_TIMEOUT_S = 60.0


def _placement(role) -> dict:
    """The custom resources and node labels of a role's actors, as Ray actor options."""
    out: dict = {"resources": dict(role.resources)}
    if role.label_selector:
        out["label_selector"] = dict(role.label_selector)
    return out


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


class LearnerDied(RuntimeError):
    """The learner actor died; the run continues from its last checkpoint."""


# roles are named like this in errors, logs and the watchdog
def _role(kind: str, idx) -> str:
    if kind == "generate":
        return f"generator {idx}"
    if kind == "score":
        return f"scorer {idx[2]}"
    return "learner"


class Trainer:
    """Runs one training job: the actors, the loop, checkpoints, metrics and the final adapter.

    ``resume=True`` continues the run in ``run_dir`` from its newest checkpoint (see
    ``rlhf_ray/checkpoint.py``): a run killed before its first checkpoint starts again from the
    beginning, with what its buffer held set aside.
    """

    def __init__(self, cfg: Config, run_dir: Path | None = None, *, resume: bool = False):
        from rlhf_ray.config import preflight
        from rlhf_ray.data.prompts import PromptCursor, load_prompts, split_prompts

        self.cfg = cfg
        preflight(cfg)
        train, _held_out = split_prompts(load_prompts(cfg.data), cfg.data.eval_fraction)
        self.cursor = PromptCursor(train, seed=cfg.data.seed)
        self.resume = resume
        # offline pre-training data, read now: bad data stops the run before it starts
        self._pretrain = None
        if cfg.offline.pretrain_steps and resume and not cfg.model.adapter_path:
            raise RunStopped(f"cannot resume {run_dir}: its offline pre-training "
                             f"(offline.pretrain_steps={cfg.offline.pretrain_steps}) did not "
                             "finish, so there is no adapter to train online from; start a new "
                             "run")
        if cfg.offline.pretrain_steps and not resume:
            from rlhf_ray.config import pretrain_config
            from rlhf_ray.offline_driver import check_tokenizes, load_data

            pre = pretrain_config(cfg)
            self._pretrain = (pre, load_data(pre))
            check_tokenizes(pre, self._pretrain[1][0])
        if resume:
            if run_dir is None or not str(run_dir) or not (Path(run_dir) / "config.yaml").is_file():
                raise FileNotFoundError(f"cannot resume {str(run_dir)!r}: not a run directory "
                                        "(no config.yaml)")
            self.run_dir = Path(run_dir).absolute()
            check_resumable(cfg, self.run_dir)
        else:
            self.run_dir = run_dir or make_run_dir(cfg)  # only once the inputs are known good
        self.system: System | None = None
        self.step = 0
        self.samples_scored = 0
        self._failing_batches = 0
        self._failures: dict[str, int] = {}  # role -> requests failed in a row
        self._requests = [0] * cfg.generator.num  # requests issued per generator
        # where every prompt and sample went (see accounting())
        self.counts: dict[str, float] = defaultdict(float)
        self._elapsed_before = 0.0  # loop seconds of earlier processes of a resumed run
        self._fresh = self.driver_state()
        self.learner_restarts = 0
        self.set_aside: dict[str, int] = defaultdict(int)
        self.stall_events = 0
        self._stalled: dict[str, float] = {}  # role -> when it was reported stalled
        self._activity: dict[str, tuple[float, str]] = {}  # role -> (time, what it last did)

    # -- driver state (part of every checkpoint) ----------------------------------------------
    def driver_state(self) -> dict:
        return {
            "step": self.step,
            "cursor": self.cursor.state_dict(),
            "requests": list(self._requests),
            "samples_scored": self.samples_scored,
            "failing_batches": self._failing_batches,
            "failures": dict(self._failures),
            "counts": dict(self.counts),
            "elapsed_s": self._elapsed(),
        }

    def load_driver_state(self, state: dict) -> None:
        self.step = int(state["step"])
        self.cursor.load_state_dict(state["cursor"])
        requests = list(state["requests"])
        # a resumed run may have more generators than before; new ones start at 0
        self._requests = (requests + [0] * self.cfg.generator.num)[: self.cfg.generator.num]
        self.samples_scored = int(state["samples_scored"])
        self._failing_batches = int(state["failing_batches"])
        self._failures = dict(state["failures"])
        self.counts = defaultdict(float, state["counts"])
        self._elapsed_before = float(state["elapsed_s"])

    def _elapsed(self) -> float:
        t_loop = getattr(self, "_t_loop", None)
        return self._elapsed_before + (time.perf_counter() - t_loop if t_loop else 0.0)

    def _prompt_batch(self, generator: int) -> PromptBatch:
        g = self.cfg.generator
        prompts = self.cursor.take(g.prompts_per_request)
        self.counts["prompts_taken"] += len(prompts)
        batch = PromptBatch(prompts, n_samples=g.n_samples, request_idx=self._requests[generator])
        self._requests[generator] += 1
        return batch

    # -- checkpoints ----------------------------------------------------------------------------
    def _checkpoint_due(self) -> bool:
        every = self.cfg.run.checkpoint_every
        return bool(every) and self.step % every == 0 and self.step < self.cfg.run.steps

    def _checkpoint(self, system: System) -> Path:
        """Writes the checkpoint of the current step; nothing may be in flight."""
        import ray

        from rlhf_ray import checkpoint

        t0 = time.perf_counter()
        keep = self.cfg.run.keep_checkpoints
        tmp = checkpoint.begin(self.run_dir, self.step)
        tags = checkpoint.shard_tags_to_keep(self.run_dir, keep)
        saves = [s.checkpoint.remote(checkpoint.tag(self.step), tags)
                 for s in [*system.shards, *system.offline_shards] if self.cfg.replay.durable]
        self._learn_result(self._learn(system, "save", str(tmp / "learner")))
        ray.get(saves)
        final = checkpoint.commit(self.run_dir, self.step, tmp, self.driver_state(), keep)
        log.info("checkpoint %s in %.1fs", final.name, time.perf_counter() - t0)
        return final

    def _restore(self) -> System:
        """Builds the actors from the newest checkpoint (or from the start without one)."""
        import ray

        from rlhf_ray import checkpoint

        found = checkpoint.latest(self.run_dir)
        step = found[0] if found else None
        started = [p.name for p in checkpoint.root(self.run_dir).glob("step-*")]
        if found is None and started:
            raise FileNotFoundError(
                f"{checkpoint.root(self.run_dir)} holds {sorted(started)} but none is complete "
                "(no driver.json); refusing to start the run over"
            )
        if found is not None:
            self.load_driver_state(checkpoint.read_driver_state(found[1]))
        else:
            self.load_driver_state(self._fresh)
        for table, rows in checkpoint.restore_replay(self.run_dir, step).items():
            self.set_aside[table] += rows
            if rows:
                log.warning("replay table %s: %d rows inserted after the checkpoint are set "
                            "aside (RUN_DIR/replay/%s/shard-*/set-aside/)", table, rows, table)
        dropped = checkpoint.truncate_metrics(self.run_dir, self.step)
        system = build_system(self.cfg, self.run_dir)
        if found is not None:
            self._learn_result(self._learn(system, "load", str(found[1] / "learner")))
        log.info("continuing from %s (%d metric rows after it are redone)",
                 found[1].name if found else "the start (no checkpoint yet)", dropped)
        return system

    # -- the run --------------------------------------------------------------------------------
    def run(self) -> dict:
        import ray
        from tqdm import tqdm

        from rlhf_ray.metrics import MetricsSink

        cfg, run_dir = self.cfg, self.run_dir
        self._lock = lock_run_dir(run_dir)
        try:
            setup_logging(run_dir)
            if not self.resume:  # a resume writes it once restored: a failed one changes nothing
                self._write_config()
            init_ray(cfg)
            check_resources(cfg)
            log.info("run directory: %s", run_dir)
            if self._pretrain is not None:
                self._run_pretraining()
            t0 = time.perf_counter()
            system = self.system = self._restore() if self.resume else build_system(cfg, run_dir)
            if self.resume:
                self._write_config()
        except BaseException:
            os.close(self._lock)
            raise
        log.info("actors ready in %.1fs", time.perf_counter() - t0)
        sink = MetricsSink(run_dir, tensorboard=cfg.run.tensorboard)
        bar = tqdm(total=cfg.run.steps, initial=self.step, desc="train", unit="step",
                   disable=not cfg.run.progress)
        self._t_loop = time.perf_counter()
        try:
            while True:
                loop = self._sync_loop if cfg.run.sync else self._async_loop
                reward = float("nan")
                try:
                    for step_metrics in loop(system):
                        sink.write(self.step, step_metrics)
                        # a step may see no newly scored batch; the bar keeps the last reward
                        reward = step_metrics.get("reward/mean", reward)
                        bar.update(1)
                        bar.set_postfix(reward=f"{reward:.3f}",
                                        kl=f"{step_metrics.get('policy/kl_ref', 0.0):.3f}")
                    break
                except LearnerDied as e:
                    system = self.system = self._replace_learner(system, e, sink)
                    bar.n = self.step
                    bar.refresh()
            self._checkpoint(system)
            version = int(ray.get(system.learner.get_version.remote()))
            accounting = self.accounting(system.replay.stats(version))
            (run_dir / "accounting.json").write_text(json.dumps(accounting, indent=2) + "\n")
            if accounting["samples"]["unaccounted"] or accounting["prompts"]["unaccounted"]:
                log.warning("accounting does not balance: %s", accounting)
        finally:
            bar.close()
            sink.close()
            system.shutdown()
            os.close(self._lock)  # releases the run directory
        self._finish(sink.history)
        return sink.history[-1] if sink.history else {}

    def _run_pretraining(self) -> None:
        """`offline.pretrain_steps` offline steps into RUN_DIR/pretrain; online training then
        starts from that adapter (it becomes `model.adapter_path`, so also the reference, and a
        resume never pre-trains again)."""
        from rlhf_ray.offline_driver import run_offline

        pre, data = self._pretrain
        log.info("offline pre-training: %d %s steps", pre.run.steps, pre.offline.algo)
        adapter = run_offline(pre, self.run_dir / "pretrain", data)
        self.cfg.model.adapter_path = str(adapter)
        self._write_config()

    def _write_config(self) -> None:
        text = yaml.safe_dump(self.cfg.to_dict(), sort_keys=False)
        (self.run_dir / "config.yaml").write_text(text)

    def _replace_learner(self, system: System, error: Exception, sink) -> System:
        self.learner_restarts += 1
        limit = self.cfg.run.max_learner_restarts
        if self.learner_restarts > limit:
            raise RunStopped(f"the learner died {self.learner_restarts} times "
                               f"(run.max_learner_restarts={limit}); last: {error}") from error
        log.warning("the learner died at step %d (%s); restarting every actor from the last "
                    "checkpoint (%d of %d restarts)", self.step + 1,
                    str(error).splitlines()[0], self.learner_restarts, limit)
        system.shutdown()
        system = self._restore()
        sink.truncate(self.step)
        return system

    def _log_step(self, metrics: dict, window: dict, replay_stats: dict, step_s: float) -> dict:
        samples = metrics.pop("learner/samples", [])
        merged = {**window, **metrics}
        merged.update({f"replay/{k}": v for k, v in replay_stats.items()
                       if f"replay/{k}" in _replay_keys()})
        elapsed = self._elapsed()
        merged["perf/step_s"] = step_s
        merged["perf/elapsed_s"] = elapsed
        merged["perf/samples_per_s"] = self.samples_scored / elapsed if elapsed > 0 else 0.0
        merged["health/stall_events"] = float(self.stall_events)
        merged["health/stalled_roles"] = float(len(self._stalled))
        merged["health/learner_restarts"] = float(self.learner_restarts)
        every = self.cfg.run.log_samples_every
        if every and (self.step == 1 or self.step % every == 0):
            for s in samples:
                log.info("step %d sample | %r -> %r | reward %.3f", self.step, s["prompt"],
                         s["response"], s["reward"])
        return merged

    # -- waiting, with a watchdog ---------------------------------------------------------------
    def _wait(self, pending: dict, *, only=None):
        """The next finished ref among ``pending`` (ref -> (kind, idx, started)), or among those
        ``only`` accepts; reports roles with work in flight for longer than the watchdog's
        timeout."""
        import ray

        timeout = self.cfg.run.watchdog_timeout_s
        tick = min(max(timeout / 4, 0.05), 30.0) if timeout else None
        while True:
            refs = [r for r, v in pending.items() if only is None or only(v)]
            ready, _ = ray.wait(refs, num_returns=1, timeout=tick)
            if ready:
                kind, idx, _started = pending[ready[0]]
                role = _role(kind, idx)
                if self._stalled.pop(role, None) is not None:
                    log.warning("watchdog: %s made progress again", role)
                return ready[0]
            self._watch(pending.values(), timeout)

    def _watch(self, in_flight, timeout: float) -> None:
        now = time.perf_counter()
        for kind, idx, started in in_flight:
            role = _role(kind, idx)
            if now - started < timeout or role in self._stalled:
                continue
            self._stalled[role] = now
            self.stall_events += 1
            when, what = self._activity.get(role, (None, "nothing yet"))
            last = f"{what}, {now - when:.0f}s ago" if when is not None else what
            log.warning("watchdog: %s has had a %s call in flight for %.0fs with no result "
                        "(run.watchdog_timeout_s=%g); its last activity: %s", role, kind,
                        now - started, timeout, last)

    def _done(self, kind: str, idx, what: str) -> None:
        self._activity[_role(kind, idx)] = (time.perf_counter(), what)

    def _learn(self, system: System, method: str = "step", *args):
        """Calls ``method`` on every learner; returns rank 0's ref (the others' are kept for
        ``_learn_result``)."""
        refs = [getattr(learner, method).remote(*args) for learner in system.learners]
        self._follower_refs = refs[1:]
        return refs[0]

    def _learn_result(self, ref):
        """Rank 0's result once every learner has finished; a dead learner (of any rank: the
        others then fail in their collectives) is ``LearnerDied``."""
        import ray
        from ray.exceptions import RayActorError, RayError

        followers, self._follower_refs = getattr(self, "_follower_refs", []), []
        try:
            result = ray.get(ref)
            ray.get(followers)
            return result
        except RayActorError as e:
            raise LearnerDied(str(e)) from e
        except RayError:
            for other in followers:
                try:
                    ray.get(other, timeout=self.cfg.learner.dist_timeout_s)
                except RayActorError as e:
                    raise LearnerDied(str(e)) from e
                except RayError:
                    pass
            raise

    # -- the loops -------------------------------------------------------------------------------
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
        pending: dict = {}  # ObjectRef -> (kind, index, started)
        state = {"in_flight": 0, "buffered": 0.0, "version": 0, "scorer": 0}
        window = _Window()
        last_step_t = time.perf_counter()
        idle_generators = set()

        def maybe_generate(i: int) -> bool:
            if state["buffered"] + state["in_flight"] > ahead_limit:
                # over the look-ahead, except when nothing is in flight and the buffer cannot
                # serve the learner a batch (e.g. a rate limiter's per-shard minimum size not
                # reached): then the learner waits for this generator, so it must run
                if (state["in_flight"]
                        or system.replay.num_servable(state["version"]) >= online_batch):
                    return False
            ref = system.generators[i].generate.remote(self._prompt_batch(i))
            pending[ref] = ("generate", i, time.perf_counter())
            state["in_flight"] += rows_per_request
            return True

        def handle(ref) -> dict | None:
            """Processes one finished generate or score call; a learn call's metrics."""
            kind, idx, _started = pending.pop(ref)
            if kind == "generate":
                j = state["scorer"] % len(system.scorers)
                state["scorer"] += 1
                pending[system.scorers[j].score.remote(ref)] = (
                    "score", (idx, ref, j), time.perf_counter())
                idle_generators.add(idx)
                self._done(kind, idx, "returned a request")
            elif kind == "score":
                gen_index, gen_ref, j = idx
                state["in_flight"] -= rows_per_request
                report = self._report_or_failure(ref, gen_index, gen_ref, window)
                self._done(kind, idx, "scored a request")
                if report is not None:
                    state["buffered"] += report.inserted
                    self.samples_scored += report.inserted
                    window.add_report(report, state["version"])
                    self._count(report)
                    self._quarantine_log(report)
            else:
                return self._learn_result(ref)
            return None

        def drain() -> None:
            while any(v[0] != "learn" for v in pending.values()):
                handle(self._wait(pending, only=lambda v: v[0] != "learn"))

        for i in range(len(system.generators)):
            maybe_generate(i)
        pending[self._learn(system)] = ("learn", 0, time.perf_counter())
        while self.step < cfg.run.steps:
            ref = self._wait(pending)
            metrics = handle(ref)
            if metrics is not None:
                self.step += 1
                self._done("learn", 0, f"finished step {self.step}")
                state["version"] = int(metrics["weights/version"])
                state["buffered"] = max(0.0, state["buffered"] - new_per_step)
                now = time.perf_counter()
                stats = system.replay.stats(state["version"])
                # rows that went stale unused leave the buffer without being counted above;
                # the buffer's own count corrects the estimate downwards (else the driver
                # could wait for a learner that waits for it)
                state["buffered"] = min(state["buffered"], float(stats["eligible"]))
                yield self._log_step(metrics, window.flush(), stats, now - last_step_t)
                last_step_t = now
                if self._checkpoint_due():
                    drain()  # the checkpoint needs buffer, cursor and counters to agree
                    self._checkpoint(system)
                    idle_generators.update(range(len(system.generators)))
                if self.step < cfg.run.steps:
                    pending[self._learn(system)] = ("learn", 0, time.perf_counter())
            # generators whose last request was handed on get a new one when the budget allows
            for i in sorted(idle_generators):
                busy = any(v[0] == "generate" and v[1] == i for v in pending.values())
                if busy or maybe_generate(i):
                    idle_generators.discard(i)
        drain()  # the requests in flight finish, so the final checkpoint accounts for them

    def _sync_loop(self, system: System):
        import ray

        cfg = self.cfg
        online_batch = batch_split(cfg)[0]
        version = 0
        if self.step:
            version = int(ray.get(system.learner.get_version.remote()))
        while self.step < cfg.run.steps:
            start = time.perf_counter()
            window = _Window()
            while system.replay.num_servable(version) < online_batch:
                refs = [g.generate.remote(self._prompt_batch(i))
                        for i, g in enumerate(system.generators)]
                scored = [system.scorers[i % len(system.scorers)].score.remote(r)
                          for i, r in enumerate(refs)]
                for i, (sref, gref) in enumerate(zip(scored, refs)):
                    idx = (i, gref, i % len(system.scorers))
                    self._wait({sref: ("score", idx, time.perf_counter())})
                    report = self._report_or_failure(sref, i, gref, window)
                    self._done("score", idx, "scored a request")
                    if report is None:
                        continue
                    window.add_report(report, version)
                    self._count(report)
                    self._quarantine_log(report)
                    self.samples_scored += report.inserted
            ref = self._learn(system)
            self._wait({ref: ("learn", 0, time.perf_counter())})
            metrics = self._learn_result(ref)
            self.step += 1
            self._done("learn", 0, f"finished step {self.step}")
            version = int(metrics["weights/version"])
            stats = system.replay.stats(version)
            yield self._log_step(metrics, window.flush(), stats, time.perf_counter() - start)
            if self._checkpoint_due():
                self._checkpoint(system)

    # -- reports --------------------------------------------------------------------------------
    def _count(self, report) -> None:
        st = report.stats
        c = self.counts
        c["prompts_generated"] += st.get("rollout/prompts", 0.0)
        c["prompts_dropped"] += st.get("rollout/prompts_dropped", 0.0)
        c["samples_generated"] += st.get("rollout/samples", 0.0)
        c["samples_quarantined"] += report.quarantined
        c["samples_group_dropped"] += st.get("reward/samples_group_dropped", 0.0)
        c["rows_inserted"] += report.inserted

    def accounting(self, replay_stats: dict) -> dict:
        """Where every prompt and sample of the run went, from independent counts: the
        driver's cursor, the generators' and scorers' reports, the buffer's own counter.

        - prompts taken = prompts generated + dropped (empty or too long) + lost with failed
          requests;
        - samples generated = rows stored (the buffer's ``inserted`` counter) + quarantined +
          samples of groups dropped for having fewer than 2 valid samples.
        """
        c = self.counts
        stored = float(replay_stats.get("inserted", 0))
        prompts = {k: c.get(f"prompts_{k}", 0.0)
                   for k in ("taken", "generated", "dropped", "failed")}
        samples = {"generated": c.get("samples_generated", 0.0), "stored": stored,
                   "quarantined": c.get("samples_quarantined", 0.0),
                   "group_dropped": c.get("samples_group_dropped", 0.0)}
        prompts["unaccounted"] = (prompts["taken"] - prompts["generated"] - prompts["dropped"]
                                  - prompts["failed"])
        samples["unaccounted"] = (samples["generated"] - stored - samples["quarantined"]
                                  - samples["group_dropped"])
        return {"prompts": prompts, "samples": samples,
                "set_aside_rows": dict(self.set_aside),
                "learner_restarts": self.learner_restarts,
                "stall_events": self.stall_events}

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
            self.counts["prompts_failed"] += prompts
            log.warning("%s failed a request (%d in a row); its %d prompts count as dropped: %s",
                        role, self._failures[role], prompts, str(e).splitlines()[0])
            if self._failures[role] >= self.cfg.run.max_failures:
                raise RunStopped(
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
            raise RunStopped(
                f"3 batches in a row gave no training row (scorer.reward={self.cfg.scorer.reward!r}"
                f"): {reason}"
            )

    def _finish(self, history: list[dict]) -> None:
        import shutil

        from rlhf_ray import checkpoint
        from rlhf_ray.metrics import plot_curves

        found = checkpoint.latest(self.run_dir)
        if found is not None and found[0] == self.step:
            shutil.copytree(found[1] / "learner" / "adapter", self.run_dir / "adapter",
                            dirs_exist_ok=True)
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


def train(cfg: Config, run_dir: Path | None = None, *, resume: bool = False) -> Path:
    trainer = Trainer(cfg, run_dir, resume=resume)
    trainer.run()
    return trainer.run_dir
