"""The RewardScorer: scores rollouts, adds reference log-probs, inserts rows into the buffer.

Per batch:
1. reward of every response (reward function on decoded text, or a reward model);
2. quarantine: a reward that raises, is not a finite number, or takes longer than
   `scorer.reward_timeout_s` never becomes a training row; the sample is counted
   (`reward/quarantined`) and reported with its prompt uid and the reason. Reward functions run
   one call at a time on a helper thread so that the scorer can stop waiting for a call that
   hangs; Python cannot stop the call itself, so it runs on in the background and the calls
   after it move to a fresh thread. More than `scorer.max_hung_rewards` such calls still
   running at once raise an error naming the reward (the reward function is broken, not one
   sample). Reward models (`model:PATH`) are batched torch code and run without a timeout;
3. group rule (grpo/rloo): the group-relative advantage is computed over the group's surviving
   samples; a group left with fewer than 2 survivors is dropped whole (`reward/groups_dropped`);
4. `ref_logprobs` from the frozen reference (the starting policy, no gradients), at the
   generator's sampling temperature so they compare with `behavior_logprobs`;
5. insert into the replay shards; only statistics go back to the driver.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import defaultdict
from concurrent.futures import Future
from concurrent.futures import TimeoutError as WaitTimeout

import torch

from rlhf_ray.config import Config
from rlhf_ray.scoring.rewards import RewardFn
from rlhf_ray.types import RolloutBatch, ScoreReport, experience_table, rollout_to_row


def _finite_number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        else:
            return None
    value = float(value)
    return value if math.isfinite(value) else None


class _RewardRunner:
    """Runs reward-function calls one at a time, in order, on a daemon thread, so that the caller
    can stop waiting for a call that hangs.

    A call abandoned after its timeout keeps its thread until it returns (Python cannot stop a
    thread); that thread then exits, and a fresh one takes over the queued calls, so at most one
    call runs besides the abandoned ones. `hung` counts abandoned calls still running; more than
    `max_hung` raise. Daemon threads: a hung call never keeps the process from exiting.
    """

    def __init__(self, fn: RewardFn, timeout: float, max_hung: int, name: str):
        self.fn, self.timeout, self.max_hung, self.name = fn, timeout, max_hung, name
        self.hung = 0
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._worker: threading.Thread | None = None  # the thread taking queued calls
        self._threads = 0

    def _start_worker(self) -> None:
        self._threads += 1
        self._worker = threading.Thread(target=self._work, name=f"reward-{self._threads}",
                                        daemon=True)
        self._worker.start()

    def _work(self) -> None:
        while True:
            call = self._queue.get()
            future = call["future"]
            if not future.set_running_or_notify_cancel():
                continue  # its batch failed before it started
            call["started"] = time.monotonic()
            try:
                result, error = self.fn(*call["args"]), None
            except BaseException as e:  # re-raised in the waiting caller
                result, error = None, e
            with self._lock:
                if error is None:
                    future.set_result(result)
                else:
                    future.set_exception(error)
                if call["abandoned"]:  # a fresh thread has taken over the queue
                    self.hung -= 1
                    return

    def _check(self) -> None:
        if self.hung > self.max_hung:
            raise RuntimeError(
                f"scorer.reward={self.name!r}: {self.hung} reward calls are still running after "
                f"scorer.reward_timeout_s={self.timeout:g}s (more than "
                f"scorer.max_hung_rewards={self.max_hung}); the reward function hangs"
            )

    def map(self, args: list[tuple[str, str]]) -> list[tuple[object, Exception | None] | None]:
        """``(result, exception)`` of each call, or None for a call that timed out."""
        self._check()
        calls = [{"future": Future(), "args": a, "started": None, "abandoned": False}
                 for a in args]
        if self._worker is None:
            self._start_worker()
        for call in calls:
            self._queue.put(call)
        try:
            return [self._wait(call) for call in calls]
        finally:
            for call in calls:
                call["future"].cancel()  # calls not started when the batch failed never run

    def _wait(self, call: dict) -> tuple[object, Exception | None] | None:
        future = call["future"]
        while True:
            started = call["started"]  # None while the call before it finishes
            left = self.timeout if started is None else started + self.timeout - time.monotonic()
            try:
                return future.result(timeout=max(left, 0.0)), None
            except WaitTimeout:
                if started is None:
                    continue  # it had not started: its deadline counts from its own start
                with self._lock:
                    if not future.done():
                        call["abandoned"] = True
                        self.hung += 1
                if not call["abandoned"]:
                    continue  # it returned just now
                self._worker = None  # that thread exits when the hung call returns
                self._check()
                self._start_worker()
                return None
            except Exception as e:  # a user reward function may raise anything
                return None, e


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
        sc = cfg.scorer  # reward functions get a per-call timeout; a reward model does not
        self._runner = (
            _RewardRunner(self.reward, sc.reward_timeout_s, sc.max_hung_rewards, sc.reward)
            if self.reward_kind == "fn" and sc.reward_timeout_s > 0 else None
        )

    def _rewards(self, batch: RolloutBatch) -> tuple[list[float | None], list[str]]:
        prompts = [r.prompt_text for r in batch.rollouts]
        responses = [r.response_text for r in batch.rollouts]
        if self.reward_kind == "model":
            raw = self.reward.score_texts(prompts, responses)
            return [_finite_number(v) for v in raw], ["not finite"] * len(raw)
        if self._runner is not None:
            outcomes = self._runner.map(list(zip(prompts, responses)))
        else:
            outcomes = [self._call(p, r) for p, r in zip(prompts, responses)]
        values, reasons = [], []
        for outcome in outcomes:
            if outcome is None:
                values.append(None)
                reasons.append(f"timed out after {self._runner.timeout:g}s "
                               "(scorer.reward_timeout_s)")
                continue
            v, error = outcome
            if error is not None:
                values.append(None)
                reasons.append(f"raised {type(error).__name__}: {error}"[:200])
                continue
            checked = _finite_number(v)
            values.append(checked)
            reasons.append("" if checked is not None else f"returned {v!r}"[:200])
        return values, reasons

    def _call(self, prompt: str, response: str) -> tuple[object, Exception | None]:
        try:
            return self.reward(prompt, response), None
        except Exception as e:  # a user reward function may raise anything
            return None, e

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
            # valid samples left without an advantage: members of the dropped groups
            "reward/samples_group_dropped": float(
                sum(1 for i, r in enumerate(rewards) if r is not None and i not in advantages)),
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
