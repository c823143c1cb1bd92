"""Metric names (area/name, units in the name) and the one sink the driver writes them to.

Actors return plain dicts of these keys; only the driver writes: one JSON object per learner step
to `metrics.jsonl`, the same scalars to TensorBoard (`tb/`), and PNG plots at the end.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

# Every key a run writes, with its meaning. tests/test_metrics.py checks runs against this.
GLOSSARY: dict[str, str] = {
    "step": "learner steps completed (x-axis)",
    "rollout/prompts": "prompts sampled in the generation requests finished since the last step",
    "rollout/prompts_truncated": "prompts cut to data.max_prompt_tokens (kept the last tokens)",
    "rollout/prompts_dropped": "prompts skipped: empty, or too long with prompt_overflow=drop",
    "rollout/samples": "responses sampled",
    "health/stall_events": "times the watchdog found a role with a call in flight for longer than run.watchdog_timeout_s (total)",
    "health/stalled_roles": "roles the watchdog reports as stalled now",
    "health/learner_restarts": "times the learner died and the run went back to its last checkpoint (total)",
    "reward/samples_group_dropped": "valid samples of the groups dropped for having fewer than 2 (sum)",
    "offline/loss": "rlhf-ray offline: DPO/IPO loss of the step's pairs (mean)",
    "offline/accuracy": "share of the step's pairs whose implicit reward margin is > 0",
    "offline/reward_margin": "mean implicit reward margin, chosen minus rejected (beta * log-ratio difference)",
    "offline/rewards_chosen": "mean implicit reward of the chosen responses",
    "offline/rewards_rejected": "mean implicit reward of the rejected responses",
    "eval/accuracy": "held-out pairs whose implicit reward margin is > 0 (share)",
    "eval/reward_margin": "held-out mean implicit reward margin",
    "eval/loss": "held-out DPO/IPO loss",
    "eval/policy_ll_accuracy": "held-out pairs the policy gives the chosen response a higher log-likelihood (share)",
    "eval/reference_ll_accuracy": "the same for the reference (base with the adapter disabled)",
    "rollout/requests_failed": "generate/score requests that failed for good (restarts and retries exhausted); their prompts count as dropped",
    "rollout/tokens": "response tokens sampled",
    "rollout/kl_ref": "mean per-sequence sum of (behavior - ref) log-probs of new samples",
    "rollout/response_len_mean": "mean response length in tokens",
    "rollout/truncated_frac": "share of responses that hit max_new_tokens",
    "reward/mean": "mean reward of newly scored samples",
    "reward/quarantined": "samples whose reward raised or was not finite (never trained on)",
    "reward/groups_dropped": "groups left with < 2 scored samples (group baselines)",
    "policy/loss": "total loss per optimizer step (policy + KL + value - entropy)",
    "policy/clipfrac": "share of tokens where the clipped surrogate was active",
    "policy/ratio_mean": "mean ratio pi / pi_anchor over tokens",
    "policy/approx_kl": "k3 estimate of KL(anchor || current) over tokens",
    "policy/is_weight_mean": "mean token weight: truncated IS weight min(pi_prox/pi_behavior, cap) times the row's prioritized-replay weight",
    "policy/entropy": "mean per-token entropy (when entropy_coef > 0)",
    "policy/kl_ref": "the KL to the reference that the reward shaping or the loss used",
    "policy/kl_coef": "KL coefficient (after the controller update)",
    "policy/kl_loss_term": "mean per-token KL estimator in the loss (kl_mode=loss)",
    "policy/value_loss": "mean per-token value loss (gae)",
    "policy/advantage_mean": "mean advantage over valid tokens",
    "learner/grad_norm": "gradient norm before clipping, mean over optimizer steps",
    "learner/skipped_updates": "optimizer steps skipped for a non-finite loss or gradient",
    "learner/lr": "learning rate",
    "learner/tokens": "response tokens per epoch of the batch",
    "learner/rows": "rows in the batch",
    "learner/staleness_mean": "learner version - row policy_version, mean over the batch",
    "learner/batch_reward_mean": "mean reward of the rows in the batch",
    "replay/sample_wait_s": "seconds the learner waited for enough servable rows (eligible and admitted by the rate limiter)",
    "replay/insert_wait_s": "seconds scorers' inserts waited for the rate limiter, summed since the last step",
    "replay/effective_sample_size": "Kish effective sample size of the batch's importance weights, as a fraction of the batch",
    "replay/is_weight_mean": "mean prioritized-replay importance weight of the online rows in the batch",
    "replay/priority_beta": "importance-weight exponent beta this step (annealed to 1)",
    "replay/batch_times_sampled_mean": "mean times_sampled of the batch's online rows, this draw included",
    "replay/offline_rows": "rows of the batch drawn from the offline table",
    "replay/limiter_ratio": "the rate limiter's samples / inserts: rows evicted before their samples count as sampled",
    "replay/reuse_ratio": "rows returned by samples / rows inserted: the actual reuse of each row",
    "replay/size": "rows stored over all shards",
    "replay/eligible": "rows that may be sampled now",
    "replay/evicted_fifo": "rows evicted at capacity (total)",
    "replay/evicted_stale": "rows evicted as staler than max_staleness (total)",
    "replay/inserted": "rows inserted (total)",
    "replay/duplicates": "inserts ignored as duplicate uids (total)",
    "replay/staleness_mean": "mean staleness of stored rows",
    "replay/times_sampled_mean": "mean times_sampled of stored rows",
    "weights/version": "published policy version",
    "weights/broadcast_s": "seconds to publish one adapter version",
    "weights/bytes": "bytes of one published adapter",
    "weights/publish_failures": "publishes that failed (version not bumped)",
    "weights/version_lag_mean": "mean (learner version - row policy_version) when rows are scored",
    "perf/generate_s": "seconds in generate, summed over requests since the last step",
    "perf/generate_tokens_per_s": "generator throughput, tokens per second",
    "perf/score_s": "seconds scoring, summed over batches since the last step",
    "perf/train_s": "seconds in the learner's train_on",
    "perf/train_tokens_per_s": "learner throughput, tokens per second",
    "perf/step_s": "wall seconds between learner steps, seen by the driver",
    "perf/elapsed_s": "wall seconds since the loop started",
    "perf/samples_per_s": "samples scored per wall second since the loop started",
}


class MetricsSink:
    """JSONL + TensorBoard writer; `history` keeps every written record for the plots."""

    def __init__(self, run_dir: Path, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = (self.run_dir / "metrics.jsonl").open("a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tb"))
        self.history: list[dict] = []

    def write(self, step: int, metrics: dict) -> None:
        record = {"step": step}
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                record[k] = float(v)
        self._jsonl.write(json.dumps(record, allow_nan=True) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
        self.history.append(record)

    def truncate(self, step: int) -> None:
        """Forgets the rows after ``step`` (a run that went back to a checkpoint redoes them);
        TensorBoard keeps its copies."""
        from rlhf_ray.checkpoint import truncate_metrics

        self._jsonl.close()
        truncate_metrics(self.run_dir, step)
        self._jsonl = (self.run_dir / "metrics.jsonl").open("a")
        self.history = [r for r in self.history if r["step"] <= step]

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(history: list[dict], out: Path,
                keys: tuple[str, ...] = ("reward/mean", "policy/kl_ref")) -> Path:
    """One PNG with a panel per key against the learner step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5))
    for ax, key in zip(list(axes) if len(keys) > 1 else [axes], keys):
        points = [(r["step"], r[key]) for r in history if key in r and math.isfinite(r[key])]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker=".", linewidth=1)
        ax.set_title(key)
        ax.set_xlabel("learner step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
