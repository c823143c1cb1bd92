"""Tests for rlhf_ray.algorithms.advantages: whitening edge cases (C6), group baselines (C6) and
GAE with pads, KL shaping and truncation (C7)."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.algorithms.advantages import (
    bootstrap_values_from_finish,
    gae,
    group_advantages,
    last_valid_index,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    token_rewards,
)

from tests.conftest import assert_close as _close


# --- masked statistics (C6) -------------------------------------------------------------------


def test_masked_statistics_ignore_pads_even_when_they_are_nan():
    x = torch.tensor([[1.0, 2.0, float("nan")], [3.0, float("inf"), 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    _close(masked_sum(x, mask), 6.0)
    _close(masked_mean(x, mask), 2.0)
    _close(masked_mean(x, mask, dim=1), [1.5, 3.0])
    _close(masked_var(x, mask), 2.0 / 3.0)


def test_masked_mean_of_an_empty_row_is_zero():
    x = torch.tensor([[1.0, 2.0], [5.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    assert torch.equal(masked_mean(x, mask, dim=1), torch.tensor([1.5, 0.0]))


def test_whitening_gives_zero_mean_and_unit_variance_on_valid_tokens():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, -50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    white = masked_whiten(x, mask)
    _close(masked_mean(white, mask), 0.0)
    _close(masked_var(white, mask), 1.0, atol=1e-5)
    assert torch.equal(white[mask == 0], torch.zeros(3))


def test_whitening_without_mean_shift_only_rescales():
    x = torch.tensor([[1.0, 3.0]])
    mask = torch.ones(1, 2)
    _close(masked_whiten(x, mask, shift_mean=False), [[2.0 - 1.0, 2.0 + 1.0]], atol=1e-5)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whitening_one_valid_token_is_finite(shift_mean):
    x = torch.tensor([[0.7, 5.0, 5.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 0.0, 0.0]])
    white = masked_whiten(x, mask, shift_mean=shift_mean)
    assert torch.isfinite(white).all()
    _close(white, [[0.0 if shift_mean else 0.7, 0.0, 0.0]])
    white.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_whitening_an_empty_mask_is_finite_zeros():
    x = torch.tensor([[0.7, float("nan")], [1.0, float("inf")]], requires_grad=True)
    mask = torch.zeros(2, 2)
    white = masked_whiten(x, mask)
    assert torch.equal(white, torch.zeros(2, 2))
    assert torch.equal(masked_mean(x, mask), torch.tensor(0.0))
    assert torch.equal(masked_var(x, mask), torch.tensor(0.0))
    white.sum().backward()
    assert torch.isfinite(x.grad).all()


# --- group baselines (C6) ---------------------------------------------------------------------


def test_group_normalisation_leaves_nan_reward_out_and_gives_it_zero():
    rewards = torch.tensor([1.0, float("nan"), 3.0])
    adv = group_advantages(rewards, ["g", "g", "g"], "grpo")
    _close(adv, [-1.0, 0.0, 1.0])


def test_singleton_group_gives_zero():
    adv = group_advantages(torch.tensor([0.37]), ["only"], "grpo")
    assert torch.equal(adv, torch.tensor([0.0]))
    assert torch.equal(group_advantages(torch.tensor([0.37]), ["only"], "rloo"), torch.zeros(1))


@pytest.mark.parametrize("method", ["grpo", "rloo"])
@pytest.mark.parametrize("normalize_std", [True, False])
def test_equal_rewards_give_exact_zeros(method, normalize_std):
    rewards = torch.tensor([0.1] * 7 + [0.3] * 3)
    groups = ["a"] * 7 + ["b"] * 3
    adv = group_advantages(rewards, groups, method, normalize_std=normalize_std)
    assert torch.equal(adv, torch.zeros(10))


def test_all_nan_group_gives_zeros():
    rewards = torch.tensor([float("nan"), float("nan"), 1.0, 2.0])
    adv = group_advantages(rewards, ["a", "a", "b", "b"], "grpo")
    _close(adv, [0.0, 0.0, -1.0, 1.0])


def test_grpo_without_std_is_reward_minus_group_mean():
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.0, 4.0])
    adv = group_advantages(rewards, ["a", "a", "a", "b", "b"], "grpo", normalize_std=False)
    _close(adv, [-2.0, -1.0, 3.0, -2.0, 2.0])


def test_rloo_subtracts_the_mean_of_the_other_members():
    # Group a = [1, 2, 6]: others' means 4, 3.5, 1.5. Group b = [0, 4]: others 4, 0.
    rewards = torch.tensor([1.0, 0.0, 2.0, 6.0, 4.0])
    groups = ["a", "b", "a", "a", "b"]
    adv = group_advantages(rewards, groups, "rloo", normalize_std=False)
    _close(adv, [-3.0, -4.0, -1.5, 4.5, 4.0])


def test_rloo_with_std_divides_by_the_group_population_std():
    # Group [1, 2, 6]: mean 3, population std sqrt(14 / 3) = 2.1602469.
    adv = group_advantages(torch.tensor([1.0, 2.0, 6.0]), ["a"] * 3, "rloo", normalize_std=True)
    _close(adv, [-1.3887301, -0.6943651, 2.0830952])


def test_rloo_leaves_nan_reward_out():
    adv = group_advantages(torch.tensor([1.0, float("nan"), 3.0]), ["g"] * 3, "rloo", False)
    _close(adv, [-2.0, 0.0, 2.0])


def test_group_ids_may_be_a_long_tensor():
    rewards = torch.tensor([1.0, 0.0, 2.0, 6.0, 4.0])
    as_strings = group_advantages(rewards, ["a", "b", "a", "a", "b"], "grpo")
    as_tensor = group_advantages(rewards, torch.tensor([7, 3, 7, 7, 3]), "grpo")
    assert torch.equal(as_strings, as_tensor)


def test_group_advantages_reject_unknown_method_and_bad_lengths():
    with pytest.raises(ValueError, match="ppo"):
        group_advantages(torch.zeros(2), ["a", "a"], "ppo")
    with pytest.raises(ValueError, match="entries"):
        group_advantages(torch.zeros(2), ["a"], "grpo")


# --- token rewards and GAE (C7) ---------------------------------------------------------------

# Response [t0, t1, EOS, PAD, PAD]; pad values are deliberately huge.
C7_VALUES = torch.tensor([[0.5, 0.2, 0.1, 9.0, 9.0]])
C7_MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0]])
C7_SCORE = torch.tensor([1.0])


def test_score_goes_on_the_last_valid_token_found_from_the_mask():
    kl = torch.zeros(3, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    rewards = token_rewards(torch.tensor([1.0, 2.0, float("nan")]), kl, mask, kl_coef=0.1)
    expected = torch.zeros(3, 5)
    expected[0, 2] = 1.0
    expected[1, 4] = 2.0
    assert torch.equal(rewards, expected)
    index, has_valid = last_valid_index(mask)
    assert index.tolist() == [2, 4, 0]
    assert has_valid.tolist() == [True, True, False]


def test_non_finite_score_on_a_real_row_is_rejected():
    with pytest.raises(ValueError, match="non-finite"):
        token_rewards(torch.tensor([float("nan")]), torch.zeros(1, 5), C7_MASK, kl_coef=0.1)


def test_c7_gae_ignores_pads_and_matches_hand_values():
    rewards = token_rewards(C7_SCORE, torch.zeros(1, 5), C7_MASK, kl_coef=0.05)
    assert torch.equal(rewards, torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0]]))
    bootstrap = bootstrap_values_from_finish(["stop"], torch.tensor([0.7]))
    advantages, returns = gae(rewards, C7_VALUES, C7_MASK, bootstrap, gamma=1.0, lam=0.95)
    _close(advantages, [[0.41725, 0.755, 0.9, 0.0, 0.0]])
    _close(returns, [[0.91725, 0.955, 1.0, 0.0, 0.0]])
    assert int((advantages != 0).sum()) == 3
    assert torch.equal(advantages[:, 3:], torch.zeros(1, 2))
    assert torch.equal(returns[:, 3:], torch.zeros(1, 2))


def test_c7_gae_with_per_token_kl_shaping():
    k1 = torch.tensor([[0.2, -0.1, 0.4, 5.0, 5.0]])  # pad KL is junk and must be ignored
    rewards = token_rewards(C7_SCORE, k1, C7_MASK, kl_coef=0.05)
    _close(rewards, [[-0.01, 0.005, 0.98, 0.0, 0.0]])
    advantages, _ = gae(rewards, C7_VALUES, C7_MASK, torch.zeros(1), gamma=1.0, lam=0.95)
    _close(advantages, [[0.39395, 0.741, 0.88, 0.0, 0.0]])


def test_truncated_response_bootstraps_from_the_value_after_its_last_token():
    # finish_reason "length", V(after last token) = 0.5:
    # A2 = 1 + 0.5 - 0.1 = 1.4; A1 = -0.1 + 0.95 * 1.4 = 1.23; A0 = -0.3 + 0.95 * 1.23 = 0.8685.
    rewards = token_rewards(C7_SCORE, torch.zeros(1, 5), C7_MASK, kl_coef=0.0)
    bootstrap = bootstrap_values_from_finish(["length"], torch.tensor([0.5]))
    _close(bootstrap, [0.5])
    advantages, returns = gae(rewards, C7_VALUES, C7_MASK, bootstrap, gamma=1.0, lam=0.95)
    _close(advantages, [[0.8685, 1.23, 1.4, 0.0, 0.0]])
    _close(returns, [[1.3685, 1.43, 1.5, 0.0, 0.0]])

    terminal, _ = gae(rewards, C7_VALUES, C7_MASK, torch.zeros(1), gamma=1.0, lam=0.95)
    assert not torch.allclose(advantages, terminal)


def test_unknown_finish_reason_is_rejected():
    with pytest.raises(ValueError, match="abort"):
        bootstrap_values_from_finish(["stop", "abort"], torch.zeros(2))


def test_gae_is_the_same_for_left_padded_rows_and_with_nan_pads():
    # The same response as C7, left-padded, with NaN and inf where the pads are.
    values = torch.tensor([[float("nan"), float("inf"), 0.5, 0.2, 0.1]])
    mask = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0]])
    rewards = torch.tensor([[float("nan"), 3.0, 0.0, 0.0, 1.0]])
    advantages, returns = gae(rewards, values, mask, torch.zeros(1), gamma=1.0, lam=0.95)
    _close(advantages, [[0.0, 0.0, 0.41725, 0.755, 0.9]])
    _close(returns, [[0.0, 0.0, 0.91725, 0.955, 1.0]])


def test_gae_batch_mixes_terminal_truncated_and_empty_rows():
    values = C7_VALUES.repeat(3, 1)
    mask = torch.cat([C7_MASK, C7_MASK, torch.zeros(1, 5)])
    scores = torch.tensor([1.0, 1.0, float("nan")])
    rewards = token_rewards(scores, torch.zeros(3, 5), mask, kl_coef=0.0)
    bootstrap = bootstrap_values_from_finish(
        ["stop", "length", "stop"], torch.tensor([0.5, 0.5, 0.5])
    )
    advantages, returns = gae(rewards, values, mask, bootstrap, gamma=1.0, lam=0.95)
    _close(advantages[0], [0.41725, 0.755, 0.9, 0.0, 0.0])
    _close(advantages[1], [0.8685, 1.23, 1.4, 0.0, 0.0])
    assert torch.equal(advantages[2], torch.zeros(5))
    assert torch.equal(returns[2], torch.zeros(5))


def test_gae_discounts_with_gamma():
    # gamma 0.5, lambda 1: A1 = 1, A0 = 0 + 0.5 * 0 - 0 + 0.5 * 1 * 1 = 0.5.
    advantages, returns = gae(
        torch.tensor([[0.0, 1.0]]), torch.zeros(1, 2), torch.ones(1, 2), torch.zeros(1), 0.5, 1.0
    )
    _close(advantages, [[0.5, 1.0]])
    _close(returns, [[0.5, 1.0]])


def test_gae_carries_no_gradient():
    values = C7_VALUES.clone().requires_grad_(True)
    advantages, returns = gae(torch.zeros(1, 5), values, C7_MASK, torch.zeros(1), 1.0, 0.95)
    assert not advantages.requires_grad and not returns.requires_grad
