"""PPO losses: clipped policy surrogate, decoupled importance weights, value loss, entropy, and
the token-mean aggregation that keeps micro-batching and data parallelism exact.

Words: ``logprobs`` are the current policy's (they carry the gradient), ``behavior_logprobs``
the generator's that sampled the tokens, ``proximal_logprobs`` the policy the learner held when the
batch was drawn. The PPO ratio is taken against an ``anchor_logprobs`` that the caller chooses
by configuration:

* plain PPO: anchor = ``behavior_logprobs`` (the data's own sampler).
* decoupled PPO (Hilton et al. 2022, "Batch size-invariance for policy optimization"):
  anchor = ``proximal_logprobs`` and each token is weighted by the truncated importance weight
  ``min(exp(proximal - behavior), cap)`` from ``truncated_is_weights``; the clip then bounds the
  step from the proximal policy while the weight corrects for the stale sampler.

The anchor is never the current policy itself: that ratio is identically 1 and would silently
disable the clip.

Losses are returned per token, ``[B, T]``, exactly 0 at masked positions; reduce them with
``aggregate_token_mean``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rlhf_ray.algorithms.advantages import as_bool_mask, masked_mean
from rlhf_ray.algorithms.kl import kl_terms


def _per_token(name: str, x: Tensor, valid: Tensor) -> Tensor:
    """Broadcasts a per-row ``[B]`` tensor to ``[B, T]``; checks a per-token one."""
    if x.shape == valid.shape[:1]:
        x = x.unsqueeze(-1).expand_as(valid)
    if x.shape != valid.shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected [B] or {tuple(valid.shape)}")
    return x


def _check_token_shape(name: str, x: Tensor, valid: Tensor) -> None:
    if x.shape != valid.shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(valid.shape)}")


def _masked_max(x: Tensor, valid: Tensor) -> Tensor:
    """Largest valid entry, 0 when nothing is valid."""
    if not bool(valid.any()):
        return torch.zeros((), dtype=x.dtype, device=x.device)
    return x[valid].max()


def ppo_policy_loss(
    logprobs: Tensor,
    anchor_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_eps: float,
    clip_eps_high: float | None = None,
    is_weights: Tensor | None = None,
    dual_clip: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped PPO surrogate per token: ``-min(ratio * A, clip(ratio, 1 - lo, 1 + hi) * A)``.

    ``ratio = exp(logprobs - anchor_logprobs)``. The anchor, advantages and IS weights are
    treated as constants (detached). With ``dual_clip = c > 1`` (Ye et al. 2020) the objective of
    a negative-advantage token is also bounded below by ``c * A``, so a huge ratio on a bad token
    cannot dominate the batch.

    Args:
        logprobs: ``[B, T]`` current policy log-probs of the sampled tokens (with gradient).
        anchor_logprobs: ``[B, T]`` log-probs the ratio is taken against (see module docstring).
        advantages: ``[B, T]`` per token, or ``[B]`` per sequence (broadcast over tokens).
        mask: ``[B, T]`` float or bool, non-zero on valid response tokens.
        clip_eps: lower clip range, the ratio is kept above ``1 - clip_eps``.
        clip_eps_high: upper clip range, the ratio is kept below ``1 + clip_eps_high``;
            ``clip_eps`` when None.
        is_weights: ``[B, T]`` or ``[B]`` importance weights multiplying each token's loss
            (decoupled PPO); 1 when None.
        dual_clip: the dual-clip constant ``c > 1``; off when None.

    Returns:
        ``(per_token_loss [B, T], stats)``. ``per_token_loss`` is exactly 0 at masked positions.
        ``stats`` holds detached 0-d tensors averaged over valid tokens: ``clipfrac`` (share of
        tokens where the clipped objective was the smaller, active one), ``dual_clipfrac``,
        ``ratio_mean``, ``ratio_max``, ``approx_kl`` (k3 estimate of KL(anchor || current)) and
        ``is_weight_mean``.
    """
    clip_eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    if clip_eps <= 0 or clip_eps_high <= 0:
        raise ValueError(f"clip ranges must be > 0, got {clip_eps}, {clip_eps_high}")
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    valid = as_bool_mask(mask)
    _check_token_shape("logprobs", logprobs, valid)
    _check_token_shape("anchor_logprobs", anchor_logprobs, valid)

    # Pads are replaced before any arithmetic so their contents cannot reach a gradient.
    log_ratio = torch.where(valid, logprobs - anchor_logprobs.detach(), 0.0)
    adv = torch.where(valid, _per_token("advantages", advantages, valid).detach(), 0.0)
    ratio = log_ratio.exp()
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps_high) * adv
    objective = torch.minimum(unclipped, clipped)
    if dual_clip is not None:
        dual_active = (adv < 0) & (objective < dual_clip * adv)
        objective = torch.where(dual_active, dual_clip * adv, objective)
    else:
        dual_active = torch.zeros_like(valid)

    loss = -objective
    if is_weights is not None:
        weights = torch.where(valid, _per_token("is_weights", is_weights, valid).detach(), 1.0)
        loss = loss * weights
    else:
        weights = torch.ones_like(ratio)
    loss = torch.where(valid, loss, 0.0)

    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped < unclipped).to(ratio.dtype), valid),
            "dual_clipfrac": masked_mean(dual_active.to(ratio.dtype), valid),
            "ratio_mean": masked_mean(ratio, valid),
            "ratio_max": _masked_max(ratio, valid),
            # k3 with the anchor as the sampling policy: ratio - 1 - log(ratio).
            "approx_kl": masked_mean(kl_terms(torch.zeros_like(log_ratio), log_ratio, "k3"), valid),
            "is_weight_mean": masked_mean(weights, valid),
        }
    return loss, {k: v.detach() for k, v in stats.items()}


def truncated_is_weights(
    proximal_logprobs: Tensor, behavior_logprobs: Tensor, cap: float
) -> Tensor:
    """Truncated importance weights ``min(exp(proximal - behavior), cap)`` per token, detached.

    They correct for the generator (behavior) having sampled with older weights than the policy
    the learner held when it drew the batch (proximal). Pads are not masked here;
    ``ppo_policy_loss`` ignores the weight at masked positions.

    Args:
        proximal_logprobs: ``[B, T]``.
        behavior_logprobs: ``[B, T]``.
        cap: largest weight, > 0.
    """
    if cap <= 0:
        raise ValueError(f"IS weight cap must be > 0, got {cap}")
    if proximal_logprobs.shape != behavior_logprobs.shape:
        raise ValueError(
            f"proximal_logprobs {tuple(proximal_logprobs.shape)} and behavior_logprobs "
            f"{tuple(behavior_logprobs.shape)} differ"
        )
    log_w = (proximal_logprobs - behavior_logprobs).detach()
    # Clamping the exponent at log(cap) gives min(exp, cap) without ever forming inf.
    return log_w.clamp(max=math.log(cap)).exp().clamp(max=cap)


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *, clip: float | None
) -> Tensor:
    """Squared-error value loss per token, optionally clipped around the old values.

    Unclipped: ``0.5 * (V - R)**2``. With ``clip``: ``V_clip = V_old + clip(V - V_old, -clip,
    clip)`` and the loss is ``0.5 * max((V - R)**2, (V_clip - R)**2)``.

    Args:
        values: ``[B, T]`` current critic values (with gradient).
        old_values: ``[B, T]`` critic values when the batch was drawn.
        returns: ``[B, T]`` targets (see ``advantages.gae``).
        mask: ``[B, T]`` float or bool, non-zero on valid response tokens.
        clip: clip range for the value change; off when None.

    Returns:
        ``[B, T]`` loss, exactly 0 at masked positions.
    """
    if clip is not None and clip <= 0:
        raise ValueError(f"value clip must be > 0, got {clip}")
    valid = as_bool_mask(mask)
    for name, x in (("values", values), ("old_values", old_values), ("returns", returns)):
        _check_token_shape(name, x, valid)
    values = torch.where(valid, values, 0.0)
    old_values = torch.where(valid, old_values.detach(), 0.0)
    returns = torch.where(valid, returns.detach(), 0.0)

    error = (values - returns).square()
    if clip is not None:
        clipped_values = old_values + (values - old_values).clamp(-clip, clip)
        error = torch.maximum(error, (clipped_values - returns).square())
    return torch.where(valid, 0.5 * error, 0.0)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the softmax over the last dimension, ``[B, T, V] -> [B, T]``.

    Vocabulary entries with logit ``-inf`` (probability 0) contribute 0 and no NaN gradient.
    """
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    safe_logp = torch.where(p > 0, logp, 0.0)
    return -(p * safe_logp).sum(dim=-1)


def aggregate_token_mean(
    per_token_loss: Tensor, mask: Tensor, total_tokens: float | Tensor
) -> Tensor:
    """Sum of the valid per-token losses divided by ``max(total_tokens, 1)``.

    Pass the valid-token count of the WHOLE minibatch, not of this micro-batch. Then the
    micro-batch losses (and their gradients) add up to the token mean of the minibatch, whatever
    the split: 4 micro-batches of 1 give the same gradient as 1 of 4. Dividing each micro-batch by
    its own count would instead weight a short response's tokens more than a long one's.

    With several data-parallel learners pass the GLOBAL count (summed over learners) and SUM the
    gradients across learners. If the all-reduce averages (as DDP does), pass
    ``global_count / world_size`` so the average comes out the same.

    A micro-batch with no valid token contributes exactly 0 (not NaN) and a zero gradient.

    Args:
        per_token_loss: ``[B, T]``.
        mask: ``[B, T]`` float or bool, non-zero on valid response tokens.
        total_tokens: valid tokens in the whole minibatch (all micro-batches, all learners).

    Returns:
        0-d loss.
    """
    if per_token_loss.shape != mask.shape:
        raise ValueError(
            f"per_token_loss {tuple(per_token_loss.shape)} and mask {tuple(mask.shape)} differ"
        )
    if isinstance(total_tokens, Tensor):
        denominator = total_tokens.to(per_token_loss.dtype).clamp_min(1.0)
    else:
        if total_tokens < 0:
            raise ValueError(f"total_tokens must be >= 0, got {total_tokens}")
        denominator = max(float(total_tokens), 1.0)
    return torch.where(as_bool_mask(mask), per_token_loss, 0.0).sum() / denominator
