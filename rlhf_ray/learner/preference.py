"""Offline preference learning (DPO, IPO) on the LoRA policy, from stored pairs.

The reference is the base model with the adapter disabled, so it costs no second copy of the
weights; its sequence log-probs are computed once per pair (no gradient) and cached. A step
takes ``learner.batch_size`` pairs in a seeded order (each pair once per pass), computes the
policy's chosen and rejected log-probs together in micro-batches of
``learner.micro_batch_size`` pairs, averages the per-pair loss over the whole batch, clips the
gradient and steps AdamW. DPO uses summed response log-probs, IPO per-token means.

Log-probs are of softmax(logits) at temperature 1 (the model's own distribution), over at most
``offline.max_response_tokens`` response tokens; prompts are cut to their last
``data.max_prompt_tokens`` tokens, as the generators cut them.

Held-out evaluation (``evaluate``): the implicit reward's preference accuracy (``margin > 0``;
the reference's implicit reward is 0 for every response, so it ranks no pair), and the
log-likelihood accuracy (``log p(chosen) > log p(rejected)``) of the policy and of the
reference, which is the comparison the reference can take part in.
"""

from __future__ import annotations

import time

import torch

from rlhf_ray.algorithms.preference import dpo_loss, ipo_loss, sequence_logprobs
from rlhf_ray.config import Config
from rlhf_ray.data.preferences import PreferencePair
from rlhf_ray.learner.offline_base import OfflineLearnerBase
from rlhf_ray.models.forward import chunks, pack, response_logprobs


def tokenize_pairs(tokenizer, cfg: Config, pairs: list[PreferencePair]):
    """``(key, prompt_ids, chosen_ids, rejected_ids)`` per pair (the key is the pair's position
    in the result, unique even where the data's uids repeat), and how many pairs were dropped
    for an empty prompt or response after tokenization."""
    limit, cut = cfg.data.max_prompt_tokens, cfg.offline.max_response_tokens
    out, dropped = [], 0
    for p in pairs:
        prompt = tokenizer(p.prompt, add_special_tokens=True)["input_ids"][-limit:]
        chosen = tokenizer(p.chosen, add_special_tokens=False)["input_ids"][:cut]
        rejected = tokenizer(p.rejected, add_special_tokens=False)["input_ids"][:cut]
        if not prompt or not chosen or not rejected:
            dropped += 1
            continue
        out.append((len(out), prompt, chosen, rejected))
    return out, dropped


class PreferenceTrainer(OfflineLearnerBase):
    def __init__(self, cfg: Config, train: list[PreferencePair], held_out: list[PreferencePair]):
        super().__init__(cfg)
        self.train, self.dropped = tokenize_pairs(self.tokenizer, cfg, train)
        self.held_out, dropped_eval = tokenize_pairs(self.tokenizer, cfg,
                                                     held_out[: cfg.offline.eval_pairs])
        self.dropped += dropped_eval
        if not self.train:
            raise ValueError("no training pair is left after tokenization (every prompt or "
                             "response tokenized to nothing)")
        self._make_optimizer()
        self._ref_cache: dict[tuple[str, int], tuple[float, float]] = {}  # (table, key)
        self.average = cfg.offline.algo == "ipo"

    # -- passes --------------------------------------------------------------------------------
    def _logprobs(self, items, *, reference: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``[m]`` chosen and ``[m]`` rejected sequence log-probs of the items, one forward."""
        from rlhf_ray.models.loading import reference_mode

        prompts = [it[1] for it in items] * 2
        responses = [it[2] for it in items] + [it[3] for it in items]
        packed = pack(prompts, responses, self.pad_id)
        model = self.policy.model
        if reference:
            with torch.no_grad(), reference_mode(model):
                out = response_logprobs(model, packed)
        else:
            out = response_logprobs(model, packed)
        seq = sequence_logprobs(out.logprobs, packed.response_mask, self.average)
        m = len(items)
        return seq[:m], seq[m:]

    def _reference(self, items, table: str) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [it for it in items if (table, it[0]) not in self._ref_cache]
        if missing:
            chosen, rejected = self._logprobs(missing, reference=True)
            for it, c, r in zip(missing, chosen.tolist(), rejected.tolist()):
                self._ref_cache[(table, it[0])] = (c, r)
        values = [self._ref_cache[(table, it[0])] for it in items]
        return (torch.tensor([v[0] for v in values]), torch.tensor([v[1] for v in values]))

    def _loss(self, pc, pr, rc, rr):
        off = self.cfg.offline
        if off.algo == "ipo":
            return ipo_loss(pc, pr, rc, rr, off.ipo_tau)
        return dpo_loss(pc, pr, rc, rr, off.beta, off.label_smoothing)

    # -- one step ------------------------------------------------------------------------------
    def step(self) -> dict[str, float]:
        start = time.perf_counter()
        lrn = self.cfg.learner
        batch = [self.train[i] for i in self._next_indices(lrn.batch_size, len(self.train))]
        sums: dict[str, float] = {}
        total_loss = 0.0
        for s in chunks(len(batch), lrn.micro_batch_size):
            items = batch[s]
            rc, rr = self._reference(items, "train")
            pc, pr = self._logprobs(items)
            loss, stats = self._loss(pc, pr, rc, rr)
            (loss.sum() / len(batch)).backward()
            total_loss += float(loss.detach().sum())
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + float(v.sum())
        grad_norm = self._apply_update(total_loss, self.adapter_parameters())
        n = len(batch)
        metrics = {f"offline/{k}": v / n for k, v in sums.items()}
        metrics.update({
            "offline/loss": total_loss / n,
            "learner/grad_norm": grad_norm,
            "learner/lr": self.scheduler.get_last_lr()[0],
            "learner/skipped_updates": float(self.skipped_updates),
            "learner/rows": float(n),
            "weights/version": float(self.version),
            "perf/train_s": time.perf_counter() - start,
        })
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out preference accuracies and margin (see the module docstring)."""
        if not self.held_out:
            return {}
        sums = {"accuracy": 0.0, "reward_margin": 0.0, "loss": 0.0, "policy_ll_accuracy": 0.0,
                "reference_ll_accuracy": 0.0}
        for s in chunks(len(self.held_out), self.cfg.learner.micro_batch_size):
            items = self.held_out[s]
            rc, rr = self._reference(items, "eval")
            pc, pr = self._logprobs(items)
            loss, stats = self._loss(pc, pr, rc, rr)
            sums["loss"] += float(loss.sum())
            sums["accuracy"] += float(stats["accuracy"].sum())
            sums["reward_margin"] += float(stats["reward_margin"].sum())
            sums["policy_ll_accuracy"] += float((pc > pr).float().sum())
            sums["reference_ll_accuracy"] += float((rc > rr).float().sum())
        n = len(self.held_out)
        return {f"eval/{k}": v / n for k, v in sums.items()}

    def info(self) -> dict:
        return {"train_pairs": len(self.train), "held_out_pairs": len(self.held_out),
                "dropped_pairs": self.dropped}
