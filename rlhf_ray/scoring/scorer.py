"""The RewardScorer: scores rollouts, adds reference log-probs, inserts rows into the buffer.

Per batch:
1. reward of every response (reward function on decoded text, or a reward model);
2. quarantine: a reward that raises or is not a finite number never becomes a training row; the
   sample is counted (`reward/quarantined`) and reported with its prompt uid;
3. group rule (grpo/rloo): the group-relative advantage is computed over the group's surviving
   samples; a group left with fewer than 2 survivors is dropped whole (`reward/groups_dropped`);
4. `ref_logprobs` from the frozen reference (the starting policy, no gradients), at the
   generator's sampling temperature so they compare with `behavior_logprobs`;
5. insert into the replay shards; only statistics go back to the driver.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict

import torch

from rlhf_ray.config import Config
from rlhf_ray.types import RolloutBatch, ScoreReport, experience_table, rollout_to_row


def _finite_number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        else:
            return None
    value = float(value)
    return value if math.isfinite(value) else None


class RewardScorer:
    def __init__(self, cfg: Config, scorer_id: int = 0, replay=None):
        torch.set_num_threads(cfg.scorer.torch_threads)
        from rlhf_ray.models.loading import load_reference, load_tokenizer
        from rlhf_ray.scoring.rewards import make_reward

        self.cfg = cfg
        self.scorer_id = scorer_id
        self.replay = replay  # a ReplayClient, or None to return the table instead
        self.tokenizer = load_tokenizer(cfg.model)
        self.reference = load_reference(cfg.model)
        self.reward_kind, self.reward = make_reward(
            cfg.scorer.reward, trust_remote_code=cfg.model.trust_remote_code
        )

    def _rewards(self, batch: RolloutBatch) -> tuple[list[float | None], list[str]]:
        prompts = [r.prompt_text for r in batch.rollouts]
        responses = [r.response_text for r in batch.rollouts]
        if self.reward_kind == "model":
            raw = self.reward.score_texts(prompts, responses)
            return [_finite_number(v) for v in raw], ["not finite"] * len(raw)
        values, reasons = [], []
        for p, r in zip(prompts, responses):
            try:
                v = self.reward(p, r)
            except Exception as e:  # a user reward function may raise anything
                values.append(None)
                reasons.append(f"raised {type(e).__name__}: {e}"[:200])
                continue
            checked = _finite_number(v)
            values.append(checked)
            reasons.append("" if checked is not None else f"returned {v!r}"[:200])
        return values, reasons

    def _group_advantages(self, rollouts, rewards) -> tuple[dict[int, float], int]:
        from rlhf_ray.algorithms.advantages import group_advantages

        method = self.cfg.algorithm.advantage
        if method == "gae":
            return {i: 0.0 for i, r in enumerate(rewards) if r is not None}, 0
        groups: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(rewards):
            if r is not None:
                groups[rollouts[i].group_id].append(i)
        result, dropped = {}, 0
        for members in groups.values():
            if len(members) < 2:
                dropped += 1
                continue
            adv = group_advantages(
                torch.tensor([rewards[i] for i in members]),
                [rollouts[i].group_id for i in members],
                method,
                normalize_std=self.cfg.algorithm.normalize_std,
            )
            result.update({i: float(a) for i, a in zip(members, adv.tolist())})
        return result, dropped

    def score(self, batch: RolloutBatch, return_table: bool = False):
        from rlhf_ray.models.forward import batched_logprobs

        start = time.perf_counter()
        rollouts = batch.rollouts
        rewards, reasons = self._rewards(batch)
        quarantine = [
            {"prompt_uid": r.prompt_uid, "uid": r.uid, "reason": reasons[i]}
            for i, r in enumerate(rollouts)
            if rewards[i] is None
        ]
        advantages, groups_dropped = self._group_advantages(rollouts, rewards)
        keep = sorted(advantages)
        ref = batched_logprobs(
            self.reference,
            [rollouts[i].prompt_ids for i in keep],
            [rollouts[i].response_ids for i in keep],
            pad_id=self.tokenizer.pad_token_id,
            temperature=self.cfg.generator.temperature,
            batch_size=self.cfg.scorer.reward_batch_size,
        ) if keep else []
        rows = [
            # the first priority is the group-relative advantage's size (prioritized replay)
            rollout_to_row(rollouts[i], reward=rewards[i], ref_logprobs=lp,
                           group_advantage=advantages[i], priority=abs(advantages[i]))
            for i, lp in zip(keep, ref)
        ]
        table = experience_table(rows)
        score_s = time.perf_counter() - start  # the insert's rate-limit wait is reported apart
        inserted = self.replay.insert(table) if (self.replay is not None and rows) else 0
        kl = [sum(b - r for b, r in zip(row["behavior_logprobs"], row["ref_logprobs"]))
              for row in rows]
        kept_rewards = [row["reward"] for row in rows]
        stats = {
            **batch.stats,  # the generator's counters travel on with the batch
            "reward/mean": sum(kept_rewards) / len(kept_rewards) if rows else float("nan"),
            "reward/quarantined": float(len(quarantine)),
            "reward/groups_dropped": float(groups_dropped),
            "rollout/kl_ref": sum(kl) / len(kl) if kl else 0.0,
            "rollout/response_len_mean": (
                sum(len(row["response_ids"]) for row in rows) / len(rows) if rows else 0.0
            ),
            "rollout/truncated_frac": (
                sum(row["finish_reason"] == "length" for row in rows) / len(rows) if rows else 0.0
            ),
            "rollout/policy_version_mean": (
                sum(row["policy_version"] for row in rows) / len(rows) if rows else 0.0
            ),
            "perf/score_s": score_s,
            "replay/insert_wait_s": getattr(self.replay, "insert_wait_s", 0.0) if rows else 0.0,
        }
        report = ScoreReport(inserted=inserted, quarantined=len(quarantine), stats=stats,
                             quarantine=quarantine)
        return (report, table) if return_table else report
