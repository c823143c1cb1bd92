"""LoRA-PPO on one batch of Experience rows (plain Python; the Learner actor wraps it).

One `train_on(table)` call:
1. collate the rows (unpadded token lists) into [B, T] tensors with masks from lengths;
2. a no-grad pass with the weights as drawn, when needed: proximal log-probs (for the decoupled
   ratio when the batch takes more than one optimizer step) and values (GAE);
3. advantages: group baselines from the scorer (grpo/rloo), or GAE over per-token rewards;
4. `ppo_epochs` x `num_minibatches` optimizer steps, each accumulated over micro-batches with
   token-mean weights (the minibatch's valid-token count divides every micro-batch's sum);
5. KL controller update with the KL that the reward shaping or the loss used.

Rows may carry an ``is_weight`` column (prioritized replay's importance weights); it multiplies
each row's per-token loss. After the update ``row_priorities`` holds a new priority per row for
the replay buffer: ``mean_t |A_t| * exp(-mean_t |log pi_t - log mu_t|)``, the row's advantage
magnitude discounted by how far the policy has already moved from the policy mu that sampled it
(measured in the last pass over the row), so rows that still carry signal and are still near
the policy are drawn again first.

Ratio anchor (`algorithm.ratio_anchor`):
- proximal: ratio = pi / pi_proximal, where pi_proximal is the policy when the batch was drawn,
  times the truncated importance weight min(pi_proximal / pi_behavior, is_cap) per token. With a
  single optimizer step per batch pi_proximal is the same weights as the gradient pass, so it is
  taken from that pass (detached) instead of an extra forward.
- behavior: ratio = pi / pi_behavior (plain PPO; right when the data is on-policy).
With fresh on-policy data both reduce to ordinary PPO.

KL (`algorithm.kl_mode`):
- reward: per-token penalty -kl_coef * KL(behavior || ref) estimate. For GAE it is part of the
  token rewards; for group baselines the KL-to-go (sum over t' >= t) is subtracted from each
  token's group advantage.
- loss: kl_coef * estimator(logprobs, ref_logprobs) per token, with gradient.

Dropout is never active: the policy stays in eval mode, so log-prob passes are deterministic.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import pyarrow as pa
import torch

from rlhf_ray.algorithms import advantages as adv_fns
from rlhf_ray.algorithms.kl import kl_terms, make_kl_controller
from rlhf_ray.algorithms.ppo import (
    aggregate_token_mean,
    entropy_from_logits,
    ppo_policy_loss,
    truncated_is_weights,
    value_loss,
)
from rlhf_ray.config import Config
from rlhf_ray.models.forward import PackedBatch, chunks, pack, response_logprobs
from rlhf_ray.models.loading import Policy


def _pad(rows: list[list[float]], width: int) -> torch.Tensor:
    out = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.tensor(r, dtype=torch.float32)
    return out


@dataclass
class Batch:
    """A collated batch of B rows; response-aligned tensors are [B, T]."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    mask: torch.Tensor  # [B, T] from response lengths
    behavior_logprobs: torch.Tensor  # [B, T]
    ref_logprobs: torch.Tensor  # [B, T]
    rewards: torch.Tensor  # [B]
    group_advantage: torch.Tensor  # [B]
    truncated: torch.Tensor  # [B] bool, finish_reason == "length"
    policy_version: torch.Tensor  # [B]
    is_weights: torch.Tensor  # [B] prioritized-replay weights (1 for uniform sampling)

    @classmethod
    def from_table(cls, table: pa.Table) -> "Batch":
        col = {name: table.column(name).to_pylist() for name in table.column_names}
        responses = col["response_ids"]
        width = max([len(r) for r in responses] + [0])
        lengths = torch.tensor([len(r) for r in responses])
        mask = (torch.arange(width)[None, :] < lengths[:, None]).float()
        weights = col.get("is_weight") or [1.0] * len(responses)
        return cls(
            prompt_ids=col["prompt_ids"],
            response_ids=responses,
            mask=mask,
            behavior_logprobs=_pad(col["behavior_logprobs"], width),
            ref_logprobs=_pad(col["ref_logprobs"], width),
            rewards=torch.tensor(col["reward"], dtype=torch.float32),
            group_advantage=torch.tensor(col["group_advantage"], dtype=torch.float32),
            truncated=torch.tensor([f == "length" for f in col["finish_reason"]]),
            policy_version=torch.tensor(col["policy_version"], dtype=torch.long),
            is_weights=torch.tensor(weights, dtype=torch.float32),
        )

    def __len__(self) -> int:
        return len(self.response_ids)


class PPOTrainer:
    def __init__(self, cfg: Config, policy: Policy | None = None, pad_id: int | None = None):
        from rlhf_ray.models.loading import load_policy, load_tokenizer

        self.cfg = cfg
        torch.manual_seed(cfg.run.seed)
        self.use_values = cfg.algorithm.advantage == "gae"
        if policy is None:
            policy = load_policy(cfg.model, with_value_head=self.use_values)
        if pad_id is None:
            pad_id = load_tokenizer(cfg.model).pad_token_id
        self.policy, self.pad_id = policy, pad_id
        lrn = cfg.learner
        groups = [{"params": [p for p in policy.model.parameters() if p.requires_grad]}]
        if policy.value_head is not None:
            groups.append({"params": list(policy.value_head.parameters()),
                           "lr": lrn.value_lr or lrn.lr})
        self.optimizer = torch.optim.AdamW(
            groups, lr=lrn.lr, betas=(lrn.adam_beta1, lrn.adam_beta2),
            weight_decay=lrn.weight_decay,
        )
        total = cfg.run.steps * lrn.ppo_epochs * lrn.num_minibatches
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: _lr_factor(lrn.lr_schedule, step, lrn.warmup_steps, total)
        )
        a = cfg.algorithm
        if a.kl_controller == "fixed":
            self.kl_ctl = make_kl_controller("fixed", coef=a.kl_coef)
        else:
            self.kl_ctl = make_kl_controller(
                "adaptive", init_coef=a.kl_coef, target=a.kl_target, horizon=a.kl_horizon,
                min_coef=a.kl_min, max_coef=a.kl_max,
            )
        self.version = 0  # completed updates
        self.skipped_updates = 0
        self._shuffle = torch.Generator().manual_seed(cfg.run.seed)

    # -- passes ------------------------------------------------------------------------------
    def _pack(self, batch: Batch, rows: slice | list[int]) -> PackedBatch:
        idx = range(len(batch))[rows] if isinstance(rows, slice) else rows
        return pack([batch.prompt_ids[i] for i in idx], [batch.response_ids[i] for i in idx],
                    self.pad_id)

    @torch.no_grad()
    def _draw_pass(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs (and values) of the weights as drawn: [B, T] (and [B, T + 1])."""
        t = batch.mask.shape[1]
        logprobs = torch.zeros_like(batch.mask)
        values = torch.zeros((len(batch), t + 1)) if self.use_values else None
        for s in chunks(len(batch), self.cfg.learner.micro_batch_size):
            out = response_logprobs(
                self.policy.model, self._pack(batch, s),
                temperature=self.cfg.generator.temperature, value_head=self.policy.value_head,
            )
            width = out.logprobs.shape[1]
            logprobs[s, :width] = out.logprobs
            if values is not None:
                values[s, : width + 1] = out.values
        return logprobs, values

    @torch.no_grad()
    def logprobs_of(self, table: pa.Table, *, reference: bool = False) -> torch.Tensor:
        """[B, T] log-probs of the rows under the current policy, or under the reference."""
        from rlhf_ray.models.loading import reference_mode

        batch = Batch.from_table(table)
        if not reference:
            return self._draw_pass(batch)[0]
        with reference_mode(self.policy.model):
            return self._draw_pass(batch)[0]

    def _advantages(self, batch: Batch, values: torch.Tensor | None):
        a, mask = self.cfg.algorithm, batch.mask
        shaping = a.kl_mode == "reward"
        kl = kl_terms(batch.behavior_logprobs, batch.ref_logprobs, a.kl_estimator) * mask
        coef = self.kl_ctl.coef if shaping else 0.0
        if a.advantage == "gae":
            rewards = adv_fns.token_rewards(batch.rewards, kl, mask, coef)
            lengths = mask.sum(-1).long()
            boot = values.gather(1, lengths[:, None]).squeeze(1) * batch.truncated.float()
            advantages, returns = adv_fns.gae(rewards, values[:, :-1], mask, boot, a.gamma, a.lam)
        else:
            # the KL still to come from each token on: reversed cumulative sum
            kl_to_go = torch.flip(torch.cumsum(torch.flip(kl, [1]), 1), [1])
            advantages = (batch.group_advantage[:, None] - coef * kl_to_go) * mask
            returns = None
        if a.whiten_advantages:
            advantages = adv_fns.masked_whiten(advantages, mask)
        return advantages, returns, kl

    # -- one batch ---------------------------------------------------------------------------
    def train_on(self, table: pa.Table) -> dict[str, float]:
        start = time.perf_counter()
        cfg, a, lrn = self.cfg, self.cfg.algorithm, self.cfg.learner
        batch = Batch.from_table(table)
        single_step = lrn.ppo_epochs == 1 and lrn.num_minibatches == 1
        need_draw = self.use_values or (a.ratio_anchor == "proximal" and not single_step)
        proximal, values = self._draw_pass(batch) if need_draw else (None, None)
        advantages, returns, kl = self._advantages(batch, values)
        self._row_drift = torch.zeros(len(batch))

        sums: dict[str, float] = {}
        minibatch_size = len(batch) // lrn.num_minibatches
        for _epoch in range(lrn.ppo_epochs):
            order = torch.randperm(len(batch), generator=self._shuffle).tolist()
            for m in range(lrn.num_minibatches):
                rows = order[m * minibatch_size : (m + 1) * minibatch_size]
                self._optimizer_step(batch, rows, advantages, returns, values, proximal, sums)
        if a.kl_mode == "loss":
            used_kl = sums.get("kl_loss_term", 0.0) / max(sums.get("tokens", 1.0), 1.0)
        else:
            used_kl = float((kl.sum(-1)).mean())  # per sequence, as it entered the rewards
        self.kl_ctl.update(used_kl, len(batch))
        row_tokens = batch.mask.sum(-1).clamp(min=1.0)
        abs_adv = (advantages.abs() * batch.mask).sum(-1) / row_tokens
        self.row_priorities = (abs_adv * torch.exp(-self._row_drift)).tolist()
        self.version += 1
        tokens = sums.pop("tokens", 0.0)
        n_steps = lrn.ppo_epochs * lrn.num_minibatches
        elapsed = time.perf_counter() - start
        metrics = {f"policy/{k}": v / max(tokens, 1.0) for k, v in sums.items()
                   if k not in ("grad_norm", "skipped", "loss")}
        metrics.update({
            "policy/loss": sums.get("loss", 0.0) / n_steps,
            "policy/kl_ref": used_kl,
            "policy/kl_coef": self.kl_ctl.coef,
            "policy/advantage_mean": float(adv_fns.masked_mean(advantages, batch.mask)),
            "learner/grad_norm": sums.get("grad_norm", 0.0) / n_steps,
            "learner/skipped_updates": float(self.skipped_updates),
            "learner/lr": self.scheduler.get_last_lr()[0],
            "learner/tokens": tokens / lrn.ppo_epochs,
            "learner/rows": float(len(batch)),
            "learner/batch_reward_mean": float(batch.rewards.mean()),
            "perf/train_s": elapsed,
            "perf/train_tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
        })
        return metrics

    def _optimizer_step(self, batch, rows, advantages, returns, values, proximal, sums) -> None:
        cfg, a = self.cfg, self.cfg.algorithm
        total_tokens = float(batch.mask[rows].sum())
        step_loss = 0.0
        for s in chunks(len(rows), cfg.learner.micro_batch_size):
            idx = rows[s]
            packed = self._pack(batch, idx)
            width = packed.response_mask.shape[1]
            mask = batch.mask[idx, :width]
            out = response_logprobs(
                self.policy.model, packed, temperature=cfg.generator.temperature,
                value_head=self.policy.value_head, with_entropy=a.entropy_coef > 0,
            )
            logprobs = out.logprobs
            behavior = batch.behavior_logprobs[idx, :width]
            prox = proximal[idx, :width] if proximal is not None else logprobs.detach()
            if a.ratio_anchor == "proximal":
                anchor = prox
                is_w = truncated_is_weights(prox, behavior, a.is_cap)
            else:
                anchor, is_w = behavior, None
            drift = ((logprobs.detach() - behavior).abs() * mask).sum(-1)
            self._row_drift[idx] = drift / mask.sum(-1).clamp(min=1.0)
            row_w = batch.is_weights[idx]
            if not torch.all(row_w == 1):
                is_w = (is_w if is_w is not None else torch.ones_like(mask)) * row_w[:, None]
            adv = advantages[idx, :width]
            per_token, stats = ppo_policy_loss(
                logprobs, anchor, adv, mask, clip_eps=a.clip_eps, clip_eps_high=a.clip_eps_high,
                is_weights=is_w,
            )
            if a.kl_mode == "loss":
                kl_tok = kl_terms(logprobs, batch.ref_logprobs[idx, :width], a.kl_estimator)
                per_token = per_token + self.kl_ctl.coef * kl_tok
                _acc(sums, "kl_loss_term", float((kl_tok.detach() * mask).sum()))
            if a.entropy_coef > 0:
                per_token = per_token - a.entropy_coef * out.entropy
                _acc(sums, "entropy", float((out.entropy.detach() * mask).sum()))
            if self.use_values:
                v_loss = value_loss(
                    out.values[:, :-1], values[idx, :width], returns[idx, :width], mask,
                    clip=a.value_clip,
                )
                per_token = per_token + a.vf_coef * v_loss
                _acc(sums, "value_loss", float((v_loss.detach() * mask).sum()))
            loss = aggregate_token_mean(per_token, mask, total_tokens)
            loss.backward()
            step_loss += float(loss.detach())
            n_tok = float(mask.sum())
            for key in ("clipfrac", "ratio_mean", "approx_kl", "is_weight_mean"):
                if key in stats:
                    _acc(sums, key, float(stats[key]) * n_tok)
            _acc(sums, "tokens", n_tok)
        params = self.policy.trainable_parameters()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.learner.max_grad_norm or 1e9)
        if not math.isfinite(step_loss) or not torch.isfinite(grad_norm):
            # a NaN/inf update is skipped and reported; the weights stay as they were
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_updates += 1
            return
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        _acc(sums, "loss", step_loss)
        _acc(sums, "grad_norm", float(grad_norm))

    # -- state ---------------------------------------------------------------------------------
    def adapter_state(self) -> dict[str, torch.Tensor]:
        from rlhf_ray.models.loading import lora_state_dict

        return lora_state_dict(self.policy.model)

    def save(self, path: str) -> None:
        """Adapter (`save_pretrained`, loads with PeftModel.from_pretrained), value head and
        training state (optimizer, scheduler, KL controller, version)."""
        from pathlib import Path

        from safetensors.torch import save_file

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        self.policy.model.save_pretrained(out / "adapter", safe_serialization=True)
        if self.policy.value_head is not None:
            save_file(self.policy.value_head.state_dict(), str(out / "value_head.safetensors"))
        torch.save(
            {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "kl_controller": self.kl_ctl.state_dict(),
                "version": self.version,
            },
            out / "trainer_state.pt",
        )


def _acc(sums: dict[str, float], key: str, value: float) -> None:
    sums[key] = sums.get(key, 0.0) + value


def _lr_factor(schedule: str, step: int, warmup: int, total: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))
