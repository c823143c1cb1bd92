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

    def pid(self) -> int:
        """The actor's process id (for operations and fault tests)."""
        import os

        return os.getpid()

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

    def score_records(self, records: list[dict]):
        """Experience rows (a ``pa.Table``) for offline ``(prompt, response[, reward])`` records.

        The records are those of ONE file (``rlhf_ray.replay.offline.read_scored_jsonl``): each
        a dict with ``uid``, ``prompt``, ``response``, optional ``reward`` (None: scored with
        ``scorer.reward``), optional ``where`` (``file:line``, for errors) and ``dataset``
        (the file, which keys the prompt groups). Per record:

        * the prompt is tokenized as the generator does (special tokens added; longer than
          ``data.max_prompt_tokens``: its last tokens are kept, or with ``prompt_overflow=drop``
          the record is skipped); the response is tokenized without special tokens and cut to
          ``generator.max_new_tokens``. A response that fits gets the EOS token appended and
          ``finish_reason="stop"`` (it ended, like an online response that stopped); a cut one
          gets ``"length"``. ``prompt_text``/``response_text`` are the decoded tokens;
        * assumption: offline responses count as drawn from the reference policy, so
          ``behavior_logprobs = ref_logprobs`` (the reference at the generator's temperature);
          ``policy_version`` is 0 and ``source`` is ``"offline"``;
        * the records of one prompt text form a group (``group_id`` = ``prompt_uid``, a hash of
          dataset and prompt); the two records of one preference pair (``pair`` set) form a
          group of their own. With grpo/rloo a group of >= 2 gets the same group-relative
          advantage as ``score()``; a single-response prompt gets its reward minus the mean
          reward of all single-response records given here (0 if it is the only one); gae gives
          0. ``priority = |group_advantage|``.

        Unlike ``score()`` nothing is quarantined: a reward function that raises or returns a
        non-finite value on a record without a reward raises ``DataError`` naming the record,
        so a bad offline file stops the run at start instead of silently shrinking.
        """
        import hashlib
        import logging

        from rlhf_ray.data.prompts import DataError
        from rlhf_ray.models.forward import batched_logprobs
        from rlhf_ray.types import Rollout

        cfg = self.cfg
        limit, rule = cfg.data.max_prompt_tokens, cfg.data.prompt_overflow
        max_new = cfg.generator.max_new_tokens
        eos = self.tokenizer.eos_token_id
        rollouts, given, wheres, dropped = [], [], [], 0
        for rec in records:
            where = rec.get("where") or rec["uid"]
            ids = self.tokenizer(rec["prompt"], add_special_tokens=True)["input_ids"]
            if not ids or not rec["prompt"].strip():
                raise DataError(f"{where}: field 'prompt' is empty")
            if len(ids) > limit:
                if rule == "drop":
                    dropped += 1
                    continue
                ids = ids[-limit:]
            resp = self.tokenizer(rec["response"], add_special_tokens=False)["input_ids"]
            if not resp:
                raise DataError(f"{where}: field 'response' gives no tokens")
            if len(resp) < max_new or (eos is None and len(resp) == max_new):
                finish = "stop"
                resp = resp + [eos] if eos is not None else resp
            else:
                resp, finish = resp[:max_new], "length"
            # one group per prompt text; the two rows of a preference pair are a group of their own
            key = f"{rec.get('dataset', '')}\0{rec['prompt']}\0{rec.get('pair', '')}".encode()
            group = "offline-" + hashlib.blake2b(key, digest_size=10).hexdigest()
            rollouts.append(Rollout(
                uid=rec["uid"], prompt_uid=group, group_id=group,
                prompt_text=self.tokenizer.decode(ids, skip_special_tokens=True),
                response_text=self.tokenizer.decode(resp, skip_special_tokens=True),
                prompt_ids=list(ids), response_ids=list(resp), behavior_logprobs=[],
                finish_reason=finish, policy_version=0, source="offline",
            ))
            given.append(rec.get("reward"))
            wheres.append(where)
        if dropped:
            logging.getLogger("rlhf_ray").warning(
                "offline records: %d prompt(s) longer than data.max_prompt_tokens=%d dropped",
                dropped, limit)
        rewards = list(given)
        todo = [i for i, r in enumerate(given) if r is None]
        if todo:
            values, reasons = self._rewards(RolloutBatch([rollouts[i] for i in todo]))
            for i, v, why in zip(todo, values, reasons):
                if v is None:
                    raise DataError(
                        f"{wheres[i]}: field 'reward' is absent and scorer.reward="
                        f"{cfg.scorer.reward!r} {why or 'failed'}"
                    )
                rewards[i] = v
        rewards = [float(r) for r in rewards]
        advantages, _ = self._group_advantages(rollouts, rewards)
        singles = [i for i in range(len(rollouts)) if i not in advantages]
        if singles:  # grpo/rloo prompts with one response: baseline = mean of those rewards
            baseline = sum(rewards[i] for i in singles) / len(singles)
            advantages.update({i: rewards[i] - baseline for i in singles})
        ref = batched_logprobs(
            self.reference,
            [r.prompt_ids for r in rollouts],
            [r.response_ids for r in rollouts],
            pad_id=self.tokenizer.pad_token_id,
            temperature=cfg.generator.temperature,
            batch_size=cfg.scorer.reward_batch_size,
        ) if rollouts else []
        rows = []
        for i, (r, lp) in enumerate(zip(rollouts, ref)):
            r.behavior_logprobs = list(lp)  # offline responses count as the reference's samples
            rows.append(rollout_to_row(r, reward=rewards[i], ref_logprobs=lp,
                                       group_advantage=advantages[i],
                                       priority=abs(advantages[i])))
        return experience_table(rows)
