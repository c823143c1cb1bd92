"""Token-level offline RL on the LoRA policy from scored samples: IQL, and CQL as IQL plus the
conservative penalty (building blocks and their indexing in ``algorithms.iql``).

A step: one forward pass of the policy per micro-batch gives the last hidden states
``s_0 .. s_T`` of each (prompt, response) row; the policy takes one AWR update with advantages
from the heads as they are, then the heads take ``offline.q_updates_per_step`` updates on the
step's stored (detached) states, each followed by a Polyak step of the target Q. From the
states:

* the policy's log-probs of the response tokens (LM head on ``s_0 .. s_{T-1}``, temperature 1),
  trained by advantage-weighted regression: ``-w_t * log pi(a_t | s_t)`` with
  ``w_t = min(exp(A / awr_beta), awr_max_weight)``, divided by the sum of the weights (per
  micro-batch, then weighted by its token share), so the step size of the policy does not grow
  with the weights (a batch of weights at the cap would otherwise be behaviour cloning at 20
  times the learning rate); only this loss reaches the adapter;
* Q and V heads (``TokenQHeads``) on the states *detached* from the adapter, so the value
  losses shape the heads only, never the policy's features: Q regresses onto
  ``r_t + gamma * V(s_{t+1})`` (``td_targets``, or its lambda-returns with
  ``offline.td_lambda``; the reward sits on the last token, a truncated response bootstraps
  from ``V(s_T)``), V onto the ``tau_expectile`` expectile of the
  target head's ``Q(s_t, a_t)``, ``A = Q_target - V``. With ``algo=cql`` the penalty
  ``logsumexp_a Q(s_t, a) - Q(s_t, a_t)`` is added with weight ``cql_alpha`` (it needs the full
  ``[B, T, V]`` Q, a logits-sized tensor).

Q starts near 0 and V at 0, so every AWR weight starts near 1 (behaviour cloning) until the
heads have learnt; ``offline.q_warmup_steps`` fits only the heads for that many steps first.
Value losses are token means over the whole batch (``learner.batch_size`` samples); the heads
have their own AdamW at the constant ``offline.q_lr``, the adapter the learner's schedule.

Known limit, measured on the builtin set: AWR only ever reweights the data's own tokens, so
when the data is far from the model (human sentences, not the model's samples) the policy is
pulled towards the data's text whatever the weights say, and the KL to the base grows fast;
the heads also need many distinct responses to rank unseen ones (on 160 distinct sentences
they learn the training rewards but not the held-out ones). Data the model itself wrote (a
buffer export) is the case IQL is built for.

Terminal responses get the EOS token appended (as online episodes that stop end with it, and as
``replay.offline_files`` rows do), so the policy also learns where the data stops; a response
cut at ``offline.max_response_tokens`` (or marked ``finish_reason: length``) gets none and counts
as truncated.

Held-out evaluation (``evaluate``) on the held-out samples: the TD, expectile and AWR losses;
the correlation between the reward and the advantage summed over a response (do the heads rank
responses as the reward does?); and between the reward and the policy's per-token log-ratio to
the reference (adapter off; has the policy moved towards the rewarded responses?). Known limit:
one learner only, no resume.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from rlhf_ray.algorithms import iql
from rlhf_ray.config import Config
from rlhf_ray.data.scored import ScoredSample
from rlhf_ray.learner.offline_base import OfflineLearnerBase
from rlhf_ray.models.forward import _causal_lm, chunks, pack, response_logprobs


@dataclass
class _Rows:
    """One micro-batch after the policy forward."""

    states: torch.Tensor  # [m, T + 1, H], detached
    ids: torch.Tensor  # [m, T]
    mask: torch.Tensor  # [m, T]
    logprobs: torch.Tensor  # [m, T], with gradient while the policy update needs it
    rewards: torch.Tensor  # [m]
    truncated: torch.Tensor  # [m] bool


def _pearson(x: list[float], y: list[float]) -> float:
    if len(x) < 2:
        return 0.0
    t = torch.tensor([x, y], dtype=torch.float64)
    t = t - t.mean(dim=1, keepdim=True)
    denom = float(t.norm(dim=1).prod())
    return float((t[0] * t[1]).sum()) / denom if denom > 0 else 0.0


def tokenize_samples(tokenizer, cfg: Config, samples: list[ScoredSample]):
    """``(key, prompt_ids, response_ids, reward, truncated)`` per sample (the key is the
    sample's position in the result, unique even where the data's uids repeat), and how many
    samples were dropped for an empty prompt or response after tokenization. Terminal
    responses get EOS appended; one cut at ``offline.max_response_tokens`` is truncated."""
    limit, cut = cfg.data.max_prompt_tokens, cfg.offline.max_response_tokens
    out, dropped = [], 0
    for s in samples:
        prompt = tokenizer(s.prompt, add_special_tokens=True)["input_ids"][-limit:]
        response = tokenizer(s.response, add_special_tokens=False)["input_ids"]
        truncated = s.truncated or len(response) >= cut
        response = response[:cut] if truncated else response + [tokenizer.eos_token_id]
        if not prompt or not tokenizer.decode(response, skip_special_tokens=True).strip():
            dropped += 1
            continue
        out.append((len(out), prompt, response, float(s.reward), truncated))
    return out, dropped


class TokenQTrainer(OfflineLearnerBase):
    def __init__(self, cfg: Config, train: list[ScoredSample], held_out: list[ScoredSample]):
        super().__init__(cfg)
        off, lrn = cfg.offline, cfg.learner
        self.cql_alpha = off.cql_alpha if off.algo == "cql" else 0.0
        self.train, self.dropped = tokenize_samples(self.tokenizer, cfg, train)
        self.held_out, dropped_eval = tokenize_samples(self.tokenizer, cfg,
                                                       held_out[: off.eval_pairs])
        self.dropped += dropped_eval
        if not self.train:
            raise ValueError("no training sample is left after tokenization (every prompt or "
                             "response tokenized to nothing)")
        head = _causal_lm(self.policy.model).get_output_embeddings()
        vocab, hidden = head.weight.shape
        self.heads = iql.TokenQHeads(hidden, vocab, q_rank=off.q_rank or None)
        self._make_optimizer()
        # the heads have their own AdamW (constant rate): they update several times per step
        self.head_optimizer = torch.optim.AdamW(self.heads.trainable_parameters(), lr=off.q_lr,
                                                betas=(lrn.adam_beta1, lrn.adam_beta2))
        self._ref_cache: dict[int, float] = {}  # held-out key -> reference log-prob sum

    # -- passes --------------------------------------------------------------------------------
    def _forward(self, items, *, train_policy: bool) -> _Rows:
        """One policy forward over the items: log-probs (with gradient when training the
        policy) and the detached states the heads read."""
        packed = pack([it[1] for it in items], [it[2] for it in items], self.pad_id)
        mask, ids = packed.response_mask, packed.response_ids
        with torch.set_grad_enabled(train_policy and torch.is_grad_enabled()):
            out = response_logprobs(self.policy.model, packed, with_states=True)
        return _Rows(
            states=out.states.detach(), ids=ids, mask=mask, logprobs=out.logprobs,
            rewards=torch.tensor([it[3] for it in items], dtype=torch.float32),
            truncated=torch.tensor([it[4] for it in items], dtype=torch.bool))

    def _advantages(self, rows: _Rows) -> torch.Tensor:
        with torch.no_grad():
            q_target = self.heads.q_taken(rows.states[:, :-1], rows.ids, target=True)
            v = self.heads.values(rows.states[:, :-1])
        return iql.iql_advantages(q_target, v, rows.mask)

    def _value_losses(self, rows: _Rows) -> dict[str, torch.Tensor]:
        """Per-token TD, expectile (and CQL) losses ``[m, T]`` of the heads on ``rows``."""
        off, states = self.cfg.offline, rows.states
        q_taken = self.heads.q_taken(states[:, :-1], rows.ids)
        q_target = self.heads.q_taken(states[:, :-1], rows.ids, target=True)
        v = self.heads.values(states)  # [m, T + 1]
        targets = iql.td_targets(rows.rewards, v[:, 1:], rows.mask, off.gamma,
                                 truncated=rows.truncated, lam=off.td_lambda)
        losses = {
            "q_loss": iql.q_loss(q_taken, targets, rows.mask),
            "v_loss": iql.expectile_loss(q_target - v[:, :-1], rows.mask, off.tau_expectile),
        }
        if self.cql_alpha > 0:
            q_all = self.heads.q_values(states[:, :-1])
            losses["cql_penalty"] = iql.cql_penalty(q_all, q_taken, rows.mask)
        return losses

    def _fit_heads(self, stash: list[_Rows], tokens: int) -> dict[str, float]:
        """``offline.q_updates_per_step`` updates of the heads on the step's rows, each followed
        by a Polyak step of the target; returns the first update's losses (token sums)."""
        off = self.cfg.offline
        first: dict[str, float] = {}
        params = self.heads.trainable_parameters()
        for update in range(off.q_updates_per_step):
            for rows in stash:
                losses = self._value_losses(rows)
                total = (losses["q_loss"] + losses["v_loss"]).sum()
                if "cql_penalty" in losses:
                    total = total + self.cql_alpha * losses["cql_penalty"].sum()
                (total / tokens).backward()
                if update == 0:
                    for k, v in losses.items():
                        first[k] = first.get(k, 0.0) + float(v.detach().sum())
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.learner.max_grad_norm or 1e9)
            if torch.isfinite(norm):
                self.head_optimizer.step()
            self.head_optimizer.zero_grad(set_to_none=True)
            self.heads.update_target(off.polyak_tau)
        return first

    # -- one step ------------------------------------------------------------------------------
    def step(self) -> dict[str, float]:
        """One policy update by AWR (advantages from the heads as they are), then the heads'
        updates on the same rows."""
        start = time.perf_counter()
        off, lrn = self.cfg.offline, self.cfg.learner
        train_policy = self.version >= off.q_warmup_steps
        batch = [self.train[i] for i in self._next_indices(lrn.batch_size, len(self.train))]
        tokens = sum(len(it[2]) for it in batch)
        sums: dict[str, float] = {}
        policy_loss, stash = 0.0, []
        for s in chunks(len(batch), lrn.micro_batch_size):
            rows = self._forward(batch[s], train_policy=train_policy)
            stash.append(rows)
            m = float(rows.mask.sum())
            advantages = self._advantages(rows)
            loss, stats = iql.awr_policy_loss(rows.logprobs, advantages, rows.mask,
                                              beta=off.awr_beta, max_weight=off.awr_max_weight)
            weight_sum = float(stats["weight_mean"]) * m
            if train_policy and weight_sum > 0:
                # this micro-batch's weighted mean NLL, times its token share
                share = (loss.sum() / weight_sum) * (m / tokens)
                share.backward()
                policy_loss += float(share.detach())
            sums["nll"] = sums.get("nll", 0.0) - float(rows.logprobs.detach().sum())
            for k in ("weight_mean", "weight_capped_frac", "advantage_mean"):
                sums[k] = sums.get(k, 0.0) + float(stats[k]) * m
            sums["weight_max"] = max(sums.get("weight_max", 0.0), float(stats["weight_max"]))
            rows.logprobs = rows.logprobs.detach()
        grad_norm = (self._apply_update(policy_loss, self.adapter_parameters()) if train_policy
                     else self._count_step())
        sums.update(self._fit_heads(stash, tokens))
        metrics = {f"offline/{k}": (v if k == "weight_max" else v / tokens)
                   for k, v in sums.items()}
        metrics.update({
            "offline/policy_loss": policy_loss,
            "offline/policy_trained": float(train_policy),
            "learner/grad_norm": grad_norm,
            "learner/lr": self.scheduler.get_last_lr()[0],
            "learner/skipped_updates": float(self.skipped_updates),
            "learner/rows": float(len(batch)),
            "learner/tokens": float(tokens),
            "weights/version": float(self.version),
            "perf/train_s": time.perf_counter() - start,
        })
        return metrics

    def _count_step(self) -> float:
        """A warm-up step: the heads train, the adapter does not (its schedule still moves)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.version += 1
        return 0.0

    @torch.no_grad()
    def _reference_logratio(self, items, logprobs: torch.Tensor, mask: torch.Tensor):
        """Per-response mean log-ratio policy/reference; reference log-probs cached by the
        held-out item's key."""
        from rlhf_ray.models.loading import reference_mode

        missing = [i for i, it in enumerate(items) if it[0] not in self._ref_cache]
        if missing:
            sub = [items[i] for i in missing]
            packed = pack([it[1] for it in sub], [it[2] for it in sub], self.pad_id)
            with reference_mode(self.policy.model):
                ref = response_logprobs(self.policy.model, packed).logprobs
            for it, row in zip(sub, ref.sum(-1).tolist()):
                self._ref_cache[it[0]] = row
        n = mask.sum(-1).clamp_min(1)
        ref_sum = torch.tensor([self._ref_cache[it[0]] for it in items])
        return ((logprobs.sum(-1) - ref_sum) / n).tolist()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out losses and correlations (see the module docstring)."""
        if not self.held_out:
            return {}
        off = self.cfg.offline
        sums: dict[str, float] = {}
        tokens = 0.0
        rewards, adv_sums, logratios = [], [], []
        for s in chunks(len(self.held_out), self.cfg.learner.micro_batch_size):
            items = self.held_out[s]
            rows = self._forward(items, train_policy=False)
            losses = self._value_losses(rows)
            advantages = self._advantages(rows)
            policy_loss, stats = iql.awr_policy_loss(
                rows.logprobs, advantages, rows.mask, beta=off.awr_beta,
                max_weight=off.awr_max_weight)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.sum())
            m = float(rows.mask.sum())
            weight_sum = float(stats["weight_mean"]) * m
            if weight_sum > 0:  # as in training: weighted mean NLL, times the token share
                sums["policy_loss"] = sums.get("policy_loss", 0.0) + float(
                    policy_loss.sum()) / weight_sum * m
            tokens += m
            rewards += [it[3] for it in items]
            adv_sums += advantages.sum(-1).tolist()
            logratios += self._reference_logratio(items, rows.logprobs, rows.mask)
        out = {f"eval/{k}": v / tokens for k, v in sums.items()}
        out["eval/advantage_reward_corr"] = _pearson(adv_sums, rewards)
        out["eval/logratio_reward_corr"] = _pearson(logratios, rewards)
        out["eval/logratio_mean"] = sum(logratios) / len(logratios)
        return out

    def _extra_modules(self) -> dict[str, torch.nn.Module]:
        return {"q_heads": self.heads}

    def _extra_state(self) -> dict:
        return {"head_optimizer": self.head_optimizer.state_dict()}

    def info(self) -> dict:
        rewards = [it[3] for it in self.train]
        return {"train_samples": len(self.train), "held_out_samples": len(self.held_out),
                "dropped_samples": self.dropped,
                "train_reward_mean": sum(rewards) / len(rewards),
                "truncated_samples": sum(it[4] for it in self.train)}
