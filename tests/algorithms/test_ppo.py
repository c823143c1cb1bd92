"""Tests for rlhf_ray.algorithms.ppo: the clipped surrogate, decoupled IS weights (C16), empty
responses (C10), token-mean aggregation across micro-batches and learners (C12), value loss and
entropy."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rlhf_ray.algorithms.ppo import (
    aggregate_token_mean,
    entropy_from_logits,
    ppo_policy_loss,
    truncated_is_weights,
    value_loss,
)

from tests.conftest import assert_close as _close


def _mask_from_lengths(lengths: list[int], width: int) -> torch.Tensor:
    return (torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).float()


# --- clipped surrogate ------------------------------------------------------------------------


def test_ratio_one_gives_minus_mean_advantage_and_no_clipping():
    generator = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(3, 6, generator=generator)
    advantages = torch.randn(3, 6, generator=generator)
    mask = _mask_from_lengths([6, 2, 4], 6)
    loss, stats = ppo_policy_loss(logprobs, logprobs.clone(), advantages, mask, clip_eps=0.2)
    total = aggregate_token_mean(loss, mask, mask.sum())
    expected = -(advantages * mask).sum() / mask.sum()
    _close(total, expected)
    assert torch.equal(stats["clipfrac"], torch.tensor(0.0))
    _close(stats["ratio_mean"], 1.0)
    _close(stats["ratio_max"], 1.0)
    _close(stats["approx_kl"], 0.0)
    _close(stats["is_weight_mean"], 1.0)
    assert torch.equal(loss[mask == 0], torch.zeros(int((mask == 0).sum())))


def test_positive_advantage_pushes_logprob_up_and_negative_pushes_it_down():
    logprobs = torch.full((1, 2), -1.0, requires_grad=True)
    advantages = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2)
    loss, _ = ppo_policy_loss(logprobs, logprobs.detach(), advantages, mask, clip_eps=0.2)
    aggregate_token_mean(loss, mask, 2).backward()
    assert logprobs.grad[0, 0] < 0 < logprobs.grad[0, 1]  # descent raises token 0, lowers token 1
    _close(logprobs.grad, [[-0.5, 0.5]])


@pytest.mark.parametrize(
    ("log_ratio", "advantage", "clipped"),
    [
        (0.3, 1.0, True),  # ratio 1.35 > 1.2 with A > 0: the clip binds
        (0.3, -1.0, False),  # moving away from a bad token is never clipped
        (-0.3, -1.0, True),  # ratio 0.74 < 0.8 with A < 0: the clip binds
        (-0.3, 1.0, False),
        (0.1, 1.0, False),  # inside the trust region
    ],
)
def test_clipfrac_counts_tokens_where_the_clipped_term_is_active(log_ratio, advantage, clipped):
    anchor = torch.tensor([[-1.0]])
    loss, stats = ppo_policy_loss(
        anchor + log_ratio, anchor, torch.tensor([[advantage]]), torch.ones(1, 1), clip_eps=0.2
    )
    assert stats["clipfrac"].item() == (1.0 if clipped else 0.0)
    ratio = math.exp(log_ratio)
    expected = -min(ratio * advantage, min(max(ratio, 0.8), 1.2) * advantage)
    _close(loss, [[expected]])


def test_asymmetric_upper_clip_range():
    anchor = torch.zeros(1, 1)
    logprobs = anchor + math.log(1.25)
    mask = torch.ones(1, 1)
    _, symmetric = ppo_policy_loss(logprobs, anchor, torch.ones(1, 1), mask, clip_eps=0.2)
    loss, higher = ppo_policy_loss(
        logprobs, anchor, torch.ones(1, 1), mask, clip_eps=0.2, clip_eps_high=0.28
    )
    assert symmetric["clipfrac"].item() == 1.0
    assert higher["clipfrac"].item() == 0.0
    _close(loss, [[-1.25]])


def test_dual_clip_bounds_the_loss_of_a_negative_advantage_token():
    anchor = torch.zeros(1, 1)
    logprobs = anchor + 2.0  # ratio e^2 = 7.389
    mask = torch.ones(1, 1)
    plain, _ = ppo_policy_loss(logprobs, anchor, -torch.ones(1, 1), mask, clip_eps=0.2)
    _close(plain, [[math.exp(2.0)]], atol=1e-5)
    dual, stats = ppo_policy_loss(
        logprobs, anchor, -torch.ones(1, 1), mask, clip_eps=0.2, dual_clip=3.0
    )
    _close(dual, [[3.0]])
    assert stats["dual_clipfrac"].item() == 1.0


def test_per_row_advantages_and_is_weights_broadcast_over_tokens():
    logprobs = torch.zeros(2, 3)
    mask = _mask_from_lengths([3, 1], 3)
    loss, stats = ppo_policy_loss(
        logprobs,
        logprobs,
        torch.tensor([1.0, 2.0]),
        mask,
        clip_eps=0.2,
        is_weights=torch.tensor([0.5, 1.0]),
    )
    _close(loss, [[-0.5, -0.5, -0.5], [-2.0, 0.0, 0.0]])
    _close(stats["is_weight_mean"], (0.5 * 3 + 1.0) / 4)


def test_invalid_clip_settings_are_rejected():
    x = torch.zeros(1, 1)
    with pytest.raises(ValueError):
        ppo_policy_loss(x, x, x, torch.ones(1, 1), clip_eps=0.0)
    with pytest.raises(ValueError):
        ppo_policy_loss(x, x, x, torch.ones(1, 1), clip_eps=0.2, dual_clip=1.0)
    with pytest.raises(ValueError, match="advantages"):
        ppo_policy_loss(x, x, torch.zeros(3), torch.ones(1, 1), clip_eps=0.2)


# --- behavior correction (C16) ----------------------------------------------------------------


def _c16_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(16)
    logprobs = (-torch.rand(2, 5, generator=generator) - 0.5).requires_grad_(True)
    behavior = logprobs.detach() - 0.3
    advantages = torch.rand(2, 5, generator=generator) + 0.5  # positive
    mask = _mask_from_lengths([5, 3], 5)
    return logprobs, behavior, advantages, mask


def test_ratio_against_behavior_logprobs_clips_every_token():
    logprobs, behavior, advantages, mask = _c16_batch()
    loss, stats = ppo_policy_loss(logprobs, behavior, advantages, mask, clip_eps=0.2)
    assert torch.equal(stats["clipfrac"], torch.tensor(1.0))
    _close(stats["ratio_mean"], math.exp(0.3))
    # Every token is clipped, so nothing pushes the policy further away.
    aggregate_token_mean(loss, mask, mask.sum()).backward()
    assert torch.equal(logprobs.grad, torch.zeros_like(logprobs))


@pytest.mark.parametrize(("cap", "weight"), [(2.0, 1.349859), (1.2, 1.2)])
def test_ratio_against_proximal_logprobs_does_not_clip_and_reweights(cap, weight):
    logprobs, behavior, advantages, mask = _c16_batch()
    proximal = logprobs.detach()
    is_weights = truncated_is_weights(proximal, behavior, cap)
    _close(is_weights, torch.full((2, 5), weight))
    assert not is_weights.requires_grad
    loss, stats = ppo_policy_loss(
        logprobs, proximal, advantages, mask, clip_eps=0.2, is_weights=is_weights
    )
    assert torch.equal(stats["clipfrac"], torch.tensor(0.0))
    _close(stats["is_weight_mean"], weight)
    _close(loss, -advantages * weight * mask)


def test_truncated_is_weights_never_form_inf_and_reject_bad_cap():
    weights = truncated_is_weights(torch.tensor([[500.0, -500.0]]), torch.zeros(1, 2), cap=2.0)
    _close(weights, [[2.0, 0.0]])
    with pytest.raises(ValueError):
        truncated_is_weights(torch.zeros(1, 1), torch.zeros(1, 1), cap=0.0)


# --- empty responses (C10) --------------------------------------------------------------------


def test_all_empty_micro_batch_contributes_exactly_zero_with_zero_gradient():
    per_token = torch.randn(3, 4).requires_grad_(True)
    mask = torch.zeros(3, 4)
    total = aggregate_token_mean(per_token, mask, total_tokens=0)
    assert torch.equal(total, torch.tensor(0.0))
    total.backward()
    assert torch.equal(per_token.grad, torch.zeros(3, 4))

    as_tensor = aggregate_token_mean(per_token, mask, total_tokens=mask.sum())
    assert torch.equal(as_tensor, torch.tensor(0.0))


def test_eos_only_and_zero_token_responses_give_finite_loss_and_gradients():
    # Row 0 is EOS only (one valid token), row 1 has no token; pads hold -inf and NaN.
    raw = torch.tensor([[-0.7, float("-inf"), float("nan")], [float("nan")] * 3])
    logprobs = raw.clone().requires_grad_(True)
    anchor = torch.tensor([[-0.9, float("-inf"), 0.0], [0.0, float("nan"), 0.0]])
    mask = _mask_from_lengths([1, 0], 3)
    behavior = torch.tensor([[-1.0, float("nan"), float("nan")], [float("nan")] * 3])
    weights = truncated_is_weights(anchor, behavior, cap=2.0)
    loss, stats = ppo_policy_loss(
        logprobs, anchor, torch.ones(2, 3), mask, clip_eps=0.2, is_weights=weights
    )
    total = aggregate_token_mean(loss, mask, mask.sum())
    assert torch.isfinite(total)
    total.backward()
    assert torch.isfinite(logprobs.grad).all()
    assert all(torch.isfinite(v) for v in stats.values())

    empty_loss, empty_stats = ppo_policy_loss(
        logprobs[1:], anchor[1:], torch.ones(1, 3), mask[1:], clip_eps=0.2
    )
    assert torch.equal(aggregate_token_mean(empty_loss, mask[1:], 0), torch.tensor(0.0))
    assert all(torch.equal(v, torch.tensor(0.0)) for v in empty_stats.values())


def test_value_loss_of_an_empty_row_is_zero_with_finite_gradient():
    values = torch.tensor([[0.3, float("nan")], [float("inf"), 1.0]], requires_grad=True)
    mask = _mask_from_lengths([1, 0], 2)
    loss = value_loss(values, torch.zeros(2, 2), torch.ones(2, 2), mask, clip=0.2)
    # Unclipped (0.3 - 1)^2 = 0.49, clipped (0.2 - 1)^2 = 0.64: the larger counts.
    _close(loss, [[0.32, 0.0], [0.0, 0.0]])
    aggregate_token_mean(loss, mask, 1).backward()
    assert torch.isfinite(values.grad).all()


# --- token mean across micro-batches and learners (C12) ---------------------------------------

C12_LENGTHS = [1, 3, 7, 20]
C12_WIDTH = 20
C12_TOKENS = 31


def test_token_mean_weights_every_token_equally_not_every_sequence():
    mask = _mask_from_lengths(C12_LENGTHS, C12_WIDTH)
    per_token = torch.tensor([1.0, 2.0, 3.0, 4.0]).unsqueeze(1).expand(4, C12_WIDTH)
    total = aggregate_token_mean(per_token, mask, C12_TOKENS)
    _close(total, 108.0 / 31.0)
    _close(total, 3.483871)
    mean_of_means = (per_token * mask).sum(1).div(mask.sum(1)).mean()
    _close(mean_of_means, 2.5)
    assert abs(total.item() - 2.5) > 0.9


def _c12_model_and_batch() -> tuple[torch.nn.Linear, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(12)
    model = torch.nn.Linear(8, 1)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, 8, generator=generator) * 0.3)
        model.bias.copy_(torch.randn(1, generator=generator) * 0.3)
    batch = {
        "features": torch.randn(4, C12_WIDTH, 8, generator=generator),
        "anchor_noise": 0.1 * torch.randn(4, C12_WIDTH, generator=generator),
        "advantages": torch.randn(4, C12_WIDTH, generator=generator),
        "mask": _mask_from_lengths(C12_LENGTHS, C12_WIDTH),
    }
    return model, batch


def _micro_batch_loss(model: torch.nn.Linear, batch: dict, rows: slice, total: float):
    logprobs = F.logsigmoid(model(batch["features"][rows]).squeeze(-1))
    anchor = logprobs.detach() + batch["anchor_noise"][rows]
    mask = batch["mask"][rows]
    loss, _ = ppo_policy_loss(logprobs, anchor, batch["advantages"][rows], mask, clip_eps=0.05)
    return aggregate_token_mean(loss, mask, total)


def _accumulated_gradient(model: torch.nn.Linear, batch: dict, split: int, total: float):
    model.zero_grad()
    for start in range(0, 4, split):
        _micro_batch_loss(model, batch, slice(start, start + split), total).backward()
    return torch.cat([model.weight.grad.flatten(), model.bias.grad.flatten()]).clone()


def test_gradient_is_the_same_for_every_micro_batch_split():
    model, batch = _c12_model_and_batch()
    assert int(batch["mask"].sum()) == C12_TOKENS
    one_by_four = _accumulated_gradient(model, batch, split=4, total=C12_TOKENS)
    two_by_two = _accumulated_gradient(model, batch, split=2, total=C12_TOKENS)
    four_by_one = _accumulated_gradient(model, batch, split=1, total=C12_TOKENS)
    assert one_by_four.abs().sum() > 0
    _close(two_by_two, one_by_four)
    _close(four_by_one, one_by_four)


def test_two_data_parallel_learners_with_the_global_count_match_one_learner():
    model, batch = _c12_model_and_batch()
    single = _accumulated_gradient(model, batch, split=4, total=C12_TOKENS)

    # Each learner holds its own copy and half the rows; an all-reduce SUMs the gradients.
    learner_grads = []
    for rows in (slice(0, 2), slice(2, 4)):
        replica, _ = _c12_model_and_batch()
        _micro_batch_loss(replica, batch, rows, C12_TOKENS).backward()
        learner_grads.append(torch.cat([replica.weight.grad.flatten(), replica.bias.grad]))
    _close(learner_grads[0] + learner_grads[1], single)

    # An averaging all-reduce (as in DDP) needs global_count / world_size.
    averaged = []
    for rows in (slice(0, 2), slice(2, 4)):
        replica, _ = _c12_model_and_batch()
        _micro_batch_loss(replica, batch, rows, C12_TOKENS / 2).backward()
        averaged.append(torch.cat([replica.weight.grad.flatten(), replica.bias.grad]))
    _close((averaged[0] + averaged[1]) / 2, single)


# --- value loss and entropy -------------------------------------------------------------------


def test_value_loss_takes_the_larger_of_clipped_and_unclipped_error():
    values = torch.tensor([[1.0, 0.6]])
    old_values = torch.tensor([[0.5, 1.0]])
    returns = torch.zeros(1, 2)
    mask = torch.ones(1, 2)
    # Token 0: unclipped 1.0, clipped (0.7)^2 = 0.49. Token 1: 0.36 vs (0.8)^2 = 0.64.
    _close(value_loss(values, old_values, returns, mask, clip=0.2), [[0.5, 0.32]])
    _close(value_loss(values, old_values, returns, mask, clip=None), [[0.5, 0.18]])


def test_entropy_of_uniform_and_one_hot_distributions():
    uniform = torch.zeros(1, 1, 4)
    _close(entropy_from_logits(uniform), [[math.log(4.0)]])
    one_hot = torch.tensor([[[0.0, float("-inf"), float("-inf")]]], requires_grad=True)
    entropy = entropy_from_logits(one_hot)
    _close(entropy, [[0.0]])
    entropy.sum().backward()
    assert torch.isfinite(one_hot.grad).all()


def test_entropy_matches_torch_distributions():
    logits = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(3))
    expected = torch.distributions.Categorical(logits=logits).entropy()
    _close(entropy_from_logits(logits), expected)
