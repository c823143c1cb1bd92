"""Tests for rlhf_ray.algorithms.kl: the estimators' values (CASES C5) and the KL controllers."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_ray.algorithms.kl import (
    AdaptiveKLController,
    FixedKLController,
    exact_kl,
    kl_terms,
    make_kl_controller,
)

from tests.conftest import assert_close as _close

P = torch.tensor([0.7, 0.2, 0.1])
Q = torch.tensor([0.5, 0.3, 0.2])
EXACT_KL_PQ = 0.0851228


def _log_ratio(value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprobs, ref_logprobs) whose difference is ``value``."""
    ref = torch.tensor([[-1.0]])
    return ref + value, ref


# --- estimators -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("log_ratio", "k1", "k3"), [(-0.5, -0.5, 0.148721), (0.5, 0.5, 0.106531)]
)
def test_k1_and_k3_values_at_plus_and_minus_half(log_ratio, k1, k3):
    logprobs, ref = _log_ratio(log_ratio)
    _close(kl_terms(logprobs, ref, "k1"), [[k1]])
    _close(kl_terms(logprobs, ref, "k3"), [[k3]])


def test_k2_is_half_the_squared_log_ratio():
    logprobs = torch.tensor([[0.0, -1.0, -2.0]])
    ref = torch.tensor([[-0.5, -1.0, -1.0]])
    _close(kl_terms(logprobs, ref, "k2"), [[0.125, 0.0, 0.5]])


def test_k3_is_non_negative_on_a_dense_grid():
    log_ratio = torch.linspace(-20.0, 20.0, 400_001)
    ref = torch.zeros_like(log_ratio)
    k3 = kl_terms(log_ratio, ref, "k3")
    assert torch.isfinite(k3).all()
    assert (k3 >= 0).all()


def test_k3_is_finite_beyond_the_clamp():
    logprobs = torch.tensor([[-200.0, 0.0]])
    ref = torch.tensor([[0.0, -200.0]])
    k3 = kl_terms(logprobs, ref, "k3")
    # Clamped to log ratio -20 and +20.
    expected = torch.tensor([[math.exp(20.0) - 21.0, math.exp(-20.0) + 19.0]])
    torch.testing.assert_close(k3, expected, rtol=1e-6, atol=0)


def test_exact_kl_of_small_distributions():
    policy_logits = P.log().view(1, 1, 3)
    ref_logits = Q.log().view(1, 1, 3)
    kl = exact_kl(policy_logits, ref_logits, torch.ones(1, 1))
    _close(kl, [[EXACT_KL_PQ]])


def test_exact_kl_is_zero_at_masked_positions():
    policy_logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0))
    ref_logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    kl = exact_kl(policy_logits, ref_logits, mask)
    assert (kl[mask == 0] == 0).all()
    assert (kl[mask == 1] > 0).all()


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_sampled_estimators_are_unbiased_for_kl_of_policy_from_reference(estimator):
    generator = torch.Generator().manual_seed(1234)
    tokens = torch.multinomial(P, 200_000, replacement=True, generator=generator)
    logprobs = P.log()[tokens].unsqueeze(0)
    ref_logprobs = Q.log()[tokens].unsqueeze(0)
    estimate = kl_terms(logprobs, ref_logprobs, estimator).mean()
    assert abs(estimate.item() - EXACT_KL_PQ) < 3e-3


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_policy_equal_to_reference_gives_exactly_zero(estimator):
    logprobs = torch.log_softmax(torch.randn(3, 7), dim=-1)
    zeros = torch.zeros_like(logprobs)
    assert torch.equal(kl_terms(logprobs, logprobs.clone(), estimator), zeros)


def test_exact_kl_of_identical_logits_is_exactly_zero():
    logits = torch.randn(3, 7, 11)
    assert torch.equal(exact_kl(logits, logits.clone(), torch.ones(3, 7)), torch.zeros(3, 7))


def test_unknown_estimator_is_rejected_by_name():
    with pytest.raises(ValueError, match="k4"):
        kl_terms(torch.zeros(1, 1), torch.zeros(1, 1), "k4")


# --- controllers ------------------------------------------------------------------------------


def test_fixed_controller_never_moves():
    controller = FixedKLController(0.05)
    controller.update(current_kl=100.0, n_steps=1000)
    assert controller.coef == 0.05


def test_adaptive_controller_moves_up_above_target_and_down_below():
    up = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=10_000, min_coef=0.0, max_coef=1.0)
    up.update(current_kl=12.0, n_steps=256)  # error 1.0 clipped to 0.2
    assert up.coef == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000), abs=1e-12)

    down = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=10_000, max_coef=1.0)
    down.update(current_kl=5.4, n_steps=256)  # error -0.1, inside the clip
    assert down.coef == pytest.approx(0.1 * (1 - 0.1 * 256 / 10_000), abs=1e-12)

    on_target = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=10_000)
    on_target.update(current_kl=6.0, n_steps=256)
    assert on_target.coef == 0.1


def test_adaptive_controller_stays_within_bounds():
    controller = AdaptiveKLController(
        init_coef=0.1, target=1.0, horizon=100, min_coef=0.01, max_coef=0.2
    )
    for _ in range(200):
        controller.update(current_kl=50.0, n_steps=100)
        assert 0.01 <= controller.coef <= 0.2
    assert controller.coef == 0.2
    for _ in range(200):
        controller.update(current_kl=0.0, n_steps=100)
        assert 0.01 <= controller.coef <= 0.2
    assert controller.coef == 0.01


def test_adaptive_controller_rejects_non_finite_kl():
    controller = AdaptiveKLController(init_coef=0.1, target=1.0, horizon=100)
    with pytest.raises(ValueError, match="finite"):
        controller.update(current_kl=float("nan"), n_steps=1)
    assert controller.coef == 0.1


def test_controller_state_round_trips():
    controller = AdaptiveKLController(init_coef=0.1, target=1.0, horizon=100, max_coef=1.0)
    controller.update(current_kl=2.0, n_steps=10)
    restored = AdaptiveKLController(init_coef=0.1, target=1.0, horizon=100, max_coef=1.0)
    restored.load_state_dict(controller.state_dict())
    assert restored.coef == controller.coef != 0.1

    fixed = FixedKLController(0.3)
    other = FixedKLController(0.0)
    other.load_state_dict(fixed.state_dict())
    assert other.coef == 0.3


def test_factory_builds_each_kind_and_rejects_unknown():
    assert isinstance(make_kl_controller("fixed", coef=0.1), FixedKLController)
    adaptive = make_kl_controller("adaptive", init_coef=0.1, target=6.0, horizon=10_000)
    assert isinstance(adaptive, AdaptiveKLController)
    with pytest.raises(ValueError, match="pid"):
        make_kl_controller("pid", coef=0.1)
