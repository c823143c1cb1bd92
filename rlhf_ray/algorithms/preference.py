"""Offline preference losses: DPO (with conservative label smoothing) and IPO.

Words: a preference pair is one prompt with a ``chosen`` and a ``rejected`` response. Each loss
takes four ``[B]`` sequence log-probs, one per pair: the policy's (they carry the gradient) and
the frozen reference's (treated as constants) of the chosen and of the rejected response. Build
them from per-token log-probs with ``sequence_logprobs``.

With ``r_c = policy_chosen - ref_chosen`` and ``r_r = policy_rejected - ref_rejected`` (the
log-ratios of the two responses), ``h = r_c - r_r`` is the quantity both losses act on:

* DPO (Rafailov et al. 2023, "Direct Preference Optimization"): ``-log sigmoid(beta * h)``.
  ``beta`` plays the role of the KL coefficient; ``beta * r`` is the implicit reward of a
  response. With ``label_smoothing = eps`` (cDPO, Mitchell 2023) each label is taken to be wrong
  with probability ``eps``: ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``, whose
  minimum sits at a finite margin instead of pushing ``h`` to infinity.
* IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
  Preferences"): ``(h - 1 / (2 tau))**2``, a regression of ``h`` onto a fixed target, so the
  margin cannot grow without bound even on pairs the policy already ranks right. The paper uses
  per-token mean log-probs (``sequence_logprobs(..., average=True)``), which makes the loss
  independent of response length; with summed log-probs the target is per sequence instead.

Losses are returned per pair, ``[B]``; average them over the pairs of the whole minibatch (a
micro-batch divides its sum by the minibatch's pair count, as ``aggregate_token_mean`` does for
tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rlhf_ray.algorithms.advantages import as_bool_mask


def sequence_logprobs(token_logprobs: Tensor, mask: Tensor, average: bool) -> Tensor:
    """Log-prob of each response from its tokens' log-probs: the masked sum, or the mean.

    Whatever sits at masked positions (NaN or garbage from padding) never reaches the result or
    its gradient. A response with no valid token gets 0 either way.

    Args:
        token_logprobs: ``[B, T]`` log-probs of the response tokens (with gradient for the policy).
        mask: ``[B, T]`` float or bool, non-zero on valid response tokens.
        average: divide by the number of valid tokens (per-token mean, IPO's length
            normalisation) instead of summing.

    Returns:
        ``[B]`` sequence log-probs.
    """
    if token_logprobs.shape != mask.shape or token_logprobs.dim() != 2:
        raise ValueError(
            f"token_logprobs {tuple(token_logprobs.shape)} and mask {tuple(mask.shape)} must be "
            "the same [B, T] shape"
        )
    valid = as_bool_mask(mask)
    total = torch.where(valid, token_logprobs, 0.0).sum(dim=-1)
    if not average:
        return total
    return total / valid.sum(dim=-1).clamp_min(1).to(total.dtype)


def _log_ratio_difference(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``(r_c, r_r, h)``: the chosen and rejected log-ratios and their difference, refs detached."""
    shape = policy_chosen.shape
    named = (("policy_rejected", policy_rejected), ("ref_chosen", ref_chosen),
             ("ref_rejected", ref_rejected))
    if policy_chosen.dim() != 1:
        raise ValueError(f"policy_chosen has shape {tuple(shape)}, expected [B]")
    for name, x in named:
        if x.shape != shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)}")
    chosen = policy_chosen - ref_chosen.detach()
    rejected = policy_rejected - ref_rejected.detach()
    return chosen, rejected, chosen - rejected


def _pair_stats(chosen: Tensor, rejected: Tensor, scale: float) -> dict[str, Tensor]:
    with torch.no_grad():
        rewards_chosen = scale * chosen
        rewards_rejected = scale * rejected
        margin = rewards_chosen - rewards_rejected
        return {
            "rewards_chosen": rewards_chosen.detach(),
            "rewards_rejected": rewards_rejected.detach(),
            "reward_margin": margin.detach(),
            "accuracy": (margin > 0).to(chosen.dtype),
        }


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DPO loss per pair, ``-log sigmoid(beta * ((pc - rc) - (pr - rr)))``, optionally smoothed.

    Args:
        policy_chosen: ``[B]`` policy sequence log-probs of the chosen responses (with gradient).
        policy_rejected: ``[B]`` the same for the rejected responses.
        ref_chosen: ``[B]`` reference sequence log-probs of the chosen responses (detached here).
        ref_rejected: ``[B]`` the same for the rejected responses.
        beta: strength of the implicit KL penalty, > 0; applied once, to the log-ratio difference.
        label_smoothing: cDPO's probability ``eps`` that a label is flipped, in ``[0, 0.5)``;
            0 is plain DPO.

    Returns:
        ``(loss [B], stats)``. ``stats`` holds detached ``[B]`` tensors, to be averaged like the
        loss: ``rewards_chosen`` and ``rewards_rejected`` (implicit rewards ``beta * (logp -
        ref)``), ``reward_margin`` (their difference) and ``accuracy`` (1 where the margin is
        > 0, so 0 while the policy equals the reference).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen, rejected, h = _log_ratio_difference(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected
    )
    logits = beta * h
    loss = -F.logsigmoid(logits)
    if label_smoothing > 0:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-logits)
    return loss, _pair_stats(chosen, rejected, beta)


def ipo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    tau: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """IPO loss per pair, ``(h - 1 / (2 tau))**2`` with ``h = (pc - rc) - (pr - rr)``.

    Pass per-token mean sequence log-probs (``sequence_logprobs(..., average=True)``) for the
    paper's length-normalised loss; the function itself does not know how they were reduced.

    Args:
        policy_chosen: ``[B]`` policy sequence log-probs of the chosen responses (with gradient).
        policy_rejected: ``[B]`` the same for the rejected responses.
        ref_chosen: ``[B]`` reference sequence log-probs of the chosen responses (detached here).
        ref_rejected: ``[B]`` the same for the rejected responses.
        tau: regularisation strength, > 0; the target log-ratio difference is ``1 / (2 tau)``,
            so a smaller ``tau`` lets the policy move further from the reference.

    Returns:
        ``(loss [B], stats)`` with the same detached ``[B]`` stats as ``dpo_loss``, the implicit
        rewards scaled by ``tau`` (so a pair at the target has ``reward_margin`` 0.5).
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    chosen, rejected, h = _log_ratio_difference(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected
    )
    loss = (h - 1.0 / (2.0 * tau)).square()
    return loss, _pair_stats(chosen, rejected, tau)
