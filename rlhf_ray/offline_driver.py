"""`rlhf-ray offline`: DPO or IPO from stored preference pairs, or token-level IQL or CQL from
scored samples, in a learner actor.

The same run directory as `rlhf-ray train` (config.yaml, metrics.jsonl, tb/, train.log,
checkpoints/, adapter/, summary.yaml), so `rlhf-ray eval RUN_DIR` samples the held-out prompts
with the trained adapter against the reference exactly as for an online run. The data is read
and checked in the driver before Ray starts: a malformed row beyond `offline.max_bad_rows`
stops the run with the file, line and field. Held-out metrics (preference accuracy for pairs;
losses and reward correlations for scored samples) are measured every `offline.eval_every`
steps and at the end (`eval/` metrics).

One learner actor only (`learner.num` must be 1); no rollouts, so no generators, scorers or
replay shards are started. A run cannot be resumed (it is short: minutes here).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import yaml

from rlhf_ray.config import PAIR_ALGOS, Config, ConfigError, offline_data

log = logging.getLogger("rlhf_ray")


def load_data(cfg: Config):
    """``(train, held_out, report)`` of the algorithm's kind: preference pairs for dpo/ipo,
    scored samples for iql/cql; the builtin set of that kind, or a file split by prompt."""
    from rlhf_ray.data import preferences, scored

    off, data = cfg.offline, offline_data(cfg)
    pairs = off.algo in PAIR_ALGOS
    if data == (preferences.MOVIE_REVIEW_PREFERENCES if pairs else scored.MOVIE_REVIEW_SAMPLES):
        words, fraction = cfg.data.opening_words, cfg.data.eval_fraction
        if pairs:
            train, held_out = preferences.movie_review_preferences(
                words, fraction, rejected_per_prompt=off.rejected_per_prompt,
                negative_prompts=off.negative_prompts)
        else:
            train, held_out = scored.movie_review_samples(
                words, fraction, samples_per_prompt=off.samples_per_prompt,
                reward=cfg.scorer.reward)
        return train, held_out, {"skipped": {}, "bad_rows": []}
    if data in preferences.BUILTIN_PREFERENCE_SETS + scored.BUILTIN_SAMPLE_SETS:
        wanted = "preference pairs" if pairs else "scored samples"
        raise ConfigError(f"offline.data={data!r}: offline.algo={off.algo} learns from "
                          f"{wanted}; the builtin set of that kind is the default "
                          "(leave offline.data empty)")
    if pairs:
        loaded = preferences.load_preference_pairs(data, max_bad_rows=off.max_bad_rows)
        train, held_out = preferences.split_pairs(loaded.pairs, off.eval_fraction)
    else:
        loaded = scored.load_scored_samples(data, max_bad_rows=off.max_bad_rows)
        train, held_out = scored.split_samples(loaded.samples, off.eval_fraction)
    return train, held_out, {"skipped": dict(loaded.skipped), "bad_rows": loaded.bad_rows}


def train_offline(cfg: Config) -> Path:
    """`rlhf-ray offline`: a new run directory, its log, Ray, then ``run_offline``."""
    from rlhf_ray.driver import init_ray, make_run_dir, setup_logging

    if cfg.learner.num != 1:
        raise ConfigError(f"learner.num={cfg.learner.num}: rlhf-ray offline runs one learner")
    data = load_data(cfg)  # before Ray and before the run directory: bad data stops here
    check_tokenizes(cfg, data[0])
    run_dir = make_run_dir(cfg)
    setup_logging(run_dir)
    init_ray(cfg)
    run_offline(cfg, run_dir, data)
    return run_dir


def check_tokenizes(cfg: Config, train: list) -> None:
    """DataError (naming the data) when no training item keeps a prompt and a response after
    tokenization with the run's tokenizer, e.g. responses that are only special tokens."""
    from rlhf_ray.data.prompts import DataError
    from rlhf_ray.models.loading import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    if cfg.offline.algo in PAIR_ALGOS:
        from rlhf_ray.learner.preference import tokenize_pairs as tokenize
    else:
        from rlhf_ray.learner.token_q import tokenize_samples as tokenize
    kept, dropped = tokenize(tokenizer, cfg, train)
    if not kept:
        raise DataError(f"offline.data={offline_data(cfg)!r}: all {dropped} training items have "
                        "an empty prompt or response once tokenized (special tokens only?)")


def run_offline(cfg: Config, run_dir: Path, data=None) -> Path:
    """Trains ``run.steps`` offline steps in one learner actor into ``run_dir`` (config.yaml,
    metrics, checkpoints, adapter/, summary.yaml); Ray must be up. Returns the adapter's folder.
    ``data`` is what ``load_data`` returns (loaded here when None)."""
    import ray

    from rlhf_ray import checkpoint
    from rlhf_ray.metrics import MetricsSink, plot_curves

    pairs = cfg.offline.algo in PAIR_ALGOS
    if pairs:
        from rlhf_ray.learner.preference import PreferenceTrainer as trainer_class
    else:
        from rlhf_ray.learner.token_q import TokenQTrainer as trainer_class
    train, held_out, report = data if data is not None else load_data(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    for message in report["bad_rows"][:20]:
        log.warning("skipped malformed row: %s", message)
    log.info("run directory: %s; %s %s: %d training and %d held-out %s (%s)", run_dir,
             cfg.offline.algo, offline_data(cfg), len(train), len(held_out),
             "pairs" if pairs else "samples", report["skipped"] or "none skipped")
    t0 = time.perf_counter()
    lr = cfg.learner
    learner = ray.remote(trainer_class).options(
        num_cpus=lr.num_cpus, num_gpus=lr.num_gpus, resources=dict(lr.resources)
    ).remote(cfg, train, held_out)
    try:
        info = ray.get(learner.info.remote())
        log.info("learner ready in %.1fs: %s", time.perf_counter() - t0, info)
        sink = MetricsSink(run_dir, tensorboard=cfg.run.tensorboard)
        start = ray.get(learner.evaluate.remote())
        log.info("before training: %s", _fmt(start))
        try:
            for step in range(1, cfg.run.steps + 1):
                metrics = ray.get(learner.step.remote())
                if step % cfg.offline.eval_every == 0 or step == cfg.run.steps:
                    metrics.update(ray.get(learner.evaluate.remote()))
                    log.info("step %d: %s", step, _fmt(metrics))
                sink.write(step, metrics)
            tmp = checkpoint.begin(run_dir, cfg.run.steps)
            ray.get(learner.save.remote(str(tmp / "learner")))
            final = checkpoint.commit(run_dir, cfg.run.steps, tmp,
                                      {"step": cfg.run.steps, "offline": cfg.offline.algo,
                                       "before": start, "data": {**info, **report["skipped"]}},
                                      cfg.run.keep_checkpoints)
        finally:
            sink.close()
    finally:
        ray.kill(learner)
    shutil.copytree(final / "learner" / "adapter", run_dir / "adapter", dirs_exist_ok=True)
    last = sink.history[-1] if sink.history else {}
    summary = {**last, **{f"before/{k}": v for k, v in start.items()}}
    (run_dir / "summary.yaml").write_text(yaml.safe_dump(summary, sort_keys=True))
    if cfg.run.plots and sink.history:
        plot_curves(sink.history, run_dir / "curves.png",
                    keys=("offline/loss", "offline/reward_margin") if pairs else
                    ("offline/policy_loss", "offline/q_loss", "offline/v_loss"))
    log.info("done: %d offline steps in %.0fs; adapter in %s", cfg.run.steps,
             time.perf_counter() - t0, run_dir / "adapter")
    return run_dir / "adapter"


def _fmt(metrics: dict) -> str:
    keys = [k for k in metrics if k.startswith("eval/")] or list(metrics)[:4]
    return ", ".join(f"{k}={metrics[k]:.3f}" for k in keys)
