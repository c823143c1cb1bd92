"""Advantage estimation: masked statistics, KL-shaped token rewards, GAE and group baselines.

All tensors are fp32. A mask is a ``[B, T]`` float or bool tensor built from lengths by the
caller, non-zero (1) on valid response tokens. Whatever sits at masked positions (values of 9.0,
NaN logprobs, garbage from padding) never reaches a result: inputs are selected with
``torch.where`` before any arithmetic, and outputs are exactly 0 there.

Terminal versus truncated responses (GAE bootstrap rule):
    The value after a response's last valid token is ``bootstrap_values[b]``.

    * ``finish_reason == "stop"``: the response ended with EOS, the episode is over, so the
      caller passes 0.
    * ``finish_reason == "length"``: the response was cut at the token budget, the episode would
      have gone on, so the caller passes V(state after the last token), the critic's estimate of
      what would have followed.

    ``bootstrap_values_from_finish`` applies this rule; any other finish reason is an error
    rather than a silent guess.

Group baselines (``group_advantages``) need no critic: ``"grpo"`` centres (and by default
scales) each reward by its group's statistics, ``"rloo"`` subtracts the mean of the other members.
A NaN reward (a failed score) gets advantage 0 and is left out of its group's statistics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
GROUP_METHODS = ("grpo", "rloo")


def as_bool_mask(mask: Tensor) -> Tensor:
    """A float or bool mask as bool (non-zero = valid)."""
    return mask if mask.dtype == torch.bool else mask != 0


def _check_shape(name: str, x: Tensor, shape: torch.Size | tuple[int, ...]) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)}")


# --- masked statistics ------------------------------------------------------------------------


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` over valid positions; whatever ``x`` holds at masked positions is ignored.

    Args:
        x: values, same shape as ``mask``.
        mask: float or bool, non-zero where valid.
        dim: reduce over this dimension only; all dimensions when None.

    Returns:
        The sum (0 where nothing is valid).
    """
    picked = torch.where(as_bool_mask(mask), x, 0.0)
    return picked.sum() if dim is None else picked.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over valid positions; 0 (not NaN) where nothing is valid.

    Args:
        x: values, same shape as ``mask``.
        mask: float or bool, non-zero where valid.
        dim: reduce over this dimension only; all dimensions when None.
    """
    count = masked_sum(torch.ones_like(x), mask, dim)
    return masked_sum(x, mask, dim) / count.clamp_min(1.0)


def masked_var(x: Tensor, mask: Tensor) -> Tensor:
    """Population variance (divide by the count) of ``x`` over all valid positions.

    Population rather than unbiased variance keeps one valid token finite (variance 0) instead of
    dividing by zero. An empty mask gives 0.
    """
    x = torch.where(as_bool_mask(mask), x, 0.0)  # pads must not reach the square (NaN gradients)
    centred = x - masked_mean(x, mask)
    return masked_mean(centred.square(), mask)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise ``x`` to unit variance (and zero mean) over its valid positions.

    Never NaN and never raises: one valid token has variance 0 and comes back as 0 (or as itself
    when ``shift_mean`` is False); an empty mask gives all zeros.

    Args:
        x: values, same shape as ``mask``.
        mask: float or bool, non-zero where valid.
        shift_mean: when False the mean is added back, so only the scale changes.
        eps: added to the variance before the square root.

    Returns:
        Whitened ``x``, exactly 0 at masked positions.
    """
    valid = as_bool_mask(mask)
    x = torch.where(valid, x, 0.0)
    mean = masked_mean(x, valid)
    whitened = (x - mean) * torch.rsqrt(masked_var(x, valid) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(valid, whitened, 0.0)


# --- token rewards and GAE --------------------------------------------------------------------


def last_valid_index(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Position of the last valid token in each row, found from the mask.

    Args:
        mask: ``[B, T]`` float or bool.

    Returns:
        ``(index [B] long, has_valid [B] bool)``; ``index`` is 0 for a row with no valid token,
        which ``has_valid`` marks False.
    """
    valid = as_bool_mask(mask)
    positions = torch.arange(valid.shape[-1], device=valid.device).expand_as(valid)
    last = torch.where(valid, positions, -1).amax(dim=-1)
    return last.clamp_min(0), last >= 0


def token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token rewards: a KL penalty on every valid token plus the score on the last one.

    Args:
        scores: ``[B]`` sequence scores from the reward scorer.
        kl: ``[B, T]`` per-token KL estimate (see ``kl.kl_terms``); pads are ignored.
        mask: ``[B, T]`` float or bool, non-zero on valid response tokens.
        kl_coef: the KL coefficient (beta).

    Returns:
        ``[B, T]``: ``-kl_coef * kl`` on valid tokens, ``+ scores[b]`` at the last valid token of
        row ``b``, 0 elsewhere. A row with no valid token gets nothing.

    Raises:
        ValueError: on mismatched shapes or a non-finite score on a row that has tokens (a NaN
            score would otherwise poison the whole loss).
    """
    _check_shape("kl", kl, mask.shape)
    _check_shape("scores", scores, mask.shape[:1])
    valid = as_bool_mask(mask)
    rewards = torch.where(valid, -kl_coef * kl, 0.0)

    last, has_valid = last_valid_index(valid)
    bad = has_valid & ~torch.isfinite(scores)
    if bool(bad.any()):
        raise ValueError(f"non-finite scores on rows {bad.nonzero().flatten().tolist()}")
    score_at_end = torch.where(has_valid, scores, 0.0).to(rewards.dtype)
    return rewards.scatter_add(1, last.unsqueeze(1), score_at_end.unsqueeze(1))


def bootstrap_values_from_finish(finish_reasons: Sequence[str], next_values: Tensor) -> Tensor:
    """Applies the terminal/truncated rule: 0 after EOS, the critic's estimate after a cut.

    Args:
        finish_reasons: ``[B]`` of ``"stop"`` or ``"length"``.
        next_values: ``[B]`` V(state after the last valid token) from the critic.

    Returns:
        ``[B]`` bootstrap values for ``gae``.

    Raises:
        ValueError: on a finish reason other than ``"stop"`` or ``"length"``.
    """
    _check_shape("next_values", next_values, (len(finish_reasons),))
    unknown = sorted({r for r in finish_reasons if r not in (FINISH_STOP, FINISH_LENGTH)})
    if unknown:
        raise ValueError(f"unknown finish_reason {unknown}; expected 'stop' or 'length'")
    truncated = torch.tensor(
        [r == FINISH_LENGTH for r in finish_reasons], dtype=torch.bool, device=next_values.device
    )
    return torch.where(truncated, next_values, 0.0)


def gae(
    token_rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    bootstrap_values: Tensor,
    gamma: float,
    lam: float,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over the valid tokens only.

    Walking backwards over each row, with ``V_next`` the value of the next VALID token (or
    ``bootstrap_values[b]`` after the last one):
    ``delta_t = r_t + gamma * V_next - V_t`` and ``A_t = delta_t + gamma * lam * A_next``.
    Masked positions are skipped: their rewards and values are never read, and the recursion
    passes over them unchanged. See the module docstring for what to pass as the bootstrap.

    The results are targets, computed without gradient.

    Args:
        token_rewards: ``[B, T]`` per-token rewards (see ``token_rewards``).
        values: ``[B, T]`` critic values V(s_t) at each response token.
        mask: ``[B, T]`` float or bool, non-zero on valid response tokens.
        bootstrap_values: ``[B]`` value after the last valid token (0 for a terminal response).
        gamma: discount, in [0, 1].
        lam: GAE lambda, in [0, 1].

    Returns:
        ``(advantages [B, T], returns [B, T])``, ``returns = advantages + values``; both exactly
        0 at masked positions.
    """
    _check_shape("values", values, token_rewards.shape)
    _check_shape("mask", mask, token_rewards.shape)
    _check_shape("bootstrap_values", bootstrap_values, token_rewards.shape[:1])
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gamma and lam must be in [0, 1], got {gamma}, {lam}")

    with torch.no_grad():
        valid = as_bool_mask(mask)
        rewards = torch.where(valid, token_rewards, 0.0)
        values = torch.where(valid, values, 0.0)
        next_value = bootstrap_values.to(values.dtype)
        next_adv = torch.zeros_like(next_value)
        advantages = torch.zeros_like(values)
        for t in reversed(range(values.shape[1])):
            step = valid[:, t]
            delta = rewards[:, t] + gamma * next_value - values[:, t]
            adv = torch.where(step, delta + gamma * lam * next_adv, 0.0)
            advantages[:, t] = adv
            # A pad leaves the recursion's state as it was.
            next_value = torch.where(step, values[:, t], next_value)
            next_adv = torch.where(step, adv, next_adv)
        returns = torch.where(valid, advantages + values, 0.0)
    return advantages, returns


# --- group baselines --------------------------------------------------------------------------


def _group_index(group_ids: Sequence[str] | Tensor, n: int, device: torch.device) -> Tensor:
    """Maps arbitrary group ids to 0..G-1 (long tensor ``[n]``)."""
    if isinstance(group_ids, Tensor):
        _check_shape("group_ids", group_ids, (n,))
        return torch.unique(group_ids, return_inverse=True)[1].to(device)
    if len(group_ids) != n:
        raise ValueError(f"group_ids has {len(group_ids)} entries for {n} rewards")
    first_seen: dict[str, int] = {}
    index = [first_seen.setdefault(g, len(first_seen)) for g in group_ids]
    return torch.tensor(index, dtype=torch.long, device=device)


def _per_group(x: Tensor, index: Tensor, n_groups: int, reduce: str) -> Tensor:
    """Reduces ``x`` per group (``reduce`` as in ``scatter_reduce``) and gathers back to ``[N]``."""
    init = torch.zeros(n_groups, dtype=x.dtype, device=x.device)
    per_group = init.scatter_reduce(0, index, x, reduce=reduce, include_self=False)
    return per_group[index]


def group_advantages(
    rewards: Tensor,
    group_ids: Sequence[str] | Tensor,
    method: str,
    normalize_std: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """Critic-free advantages from a group baseline (the samples of one prompt share a group).

    * ``"grpo"``: ``r - mean(group)``.
    * ``"rloo"``: ``r - mean(other members of the group)`` (leave-one-out).

    With ``normalize_std`` either is divided by the group's population standard deviation; a
    std below ``eps`` divides by 1 instead, so near-constant groups are not blown up. A group
    whose valid rewards are all equal (including a singleton) carries no signal and gets exactly
    0. NaN rewards get 0 and are left out of the group's mean, std and count.

    Args:
        rewards: ``[N]`` sequence rewards, NaN for a failed score.
        group_ids: ``[N]`` group of each reward, as strings or a long tensor.
        method: ``"grpo"`` or ``"rloo"``.
        normalize_std: divide by the group's population std.
        eps: smallest std that is divided by.

    Returns:
        ``[N]`` advantages, all finite.

    Raises:
        ValueError: for an unknown method or mismatched lengths.
    """
    if method not in GROUP_METHODS:
        raise ValueError(f"unknown group advantage method {method!r}; expected {GROUP_METHODS}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [N], got shape {tuple(rewards.shape)}")
    index = _group_index(group_ids, rewards.shape[0], rewards.device)
    n_groups = int(index.max()) + 1 if index.numel() else 0

    # Statistics over the valid (non-NaN) rewards of each group.
    valid = ~torch.isnan(rewards)
    r = torch.where(valid, rewards, 0.0)
    count = _per_group(valid.to(r.dtype), index, n_groups, "sum")
    total = _per_group(r, index, n_groups, "sum")
    mean = total / count.clamp_min(1.0)
    centred = torch.where(valid, r - mean, 0.0)

    if method == "grpo":
        adv = centred
    else:
        others = (count - 1.0).clamp_min(1.0)
        adv = r - (total - r) / others
    if normalize_std:
        std = (_per_group(centred.square(), index, n_groups, "sum") / count.clamp_min(1.0)).sqrt()
        adv = adv / torch.where(std < eps, 1.0, std)

    # Equal rewards (and singletons) give exact zeros rather than rounding noise.
    big = torch.finfo(r.dtype).max
    high = _per_group(torch.where(valid, r, -big), index, n_groups, "amax")
    low = _per_group(torch.where(valid, r, big), index, n_groups, "amin")
    return torch.where(valid & (high > low), adv, 0.0)
