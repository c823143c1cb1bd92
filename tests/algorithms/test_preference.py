"""Tests for rlhf_ray.algorithms.preference: DPO known values, gradients and beta (C13), label
smoothing, IPO known values and length normalisation, sequence log-probs."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_ray.algorithms.preference import dpo_loss, ipo_loss, sequence_logprobs

from tests.conftest import assert_close as _close


def _t(*values: float, grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, requires_grad=grad)


# --- C13: DPO ----------------------------------------------------------------------------------


def test_c13_dpo_known_value():
    loss, stats = dpo_loss(_t(-1.0), _t(-3.0), _t(-2.0), _t(-2.0), beta=0.1)
    _close(loss, [0.598139])
    _close(loss, [-math.log(1.0 / (1.0 + math.exp(-0.2)))])
    _close(stats["rewards_chosen"], [0.1])
    _close(stats["rewards_rejected"], [-0.1])
    _close(stats["reward_margin"], [0.2])
    _close(stats["accuracy"], [1.0])


def test_c13_dpo_swapped_pair():
    loss, stats = dpo_loss(_t(-3.0), _t(-1.0), _t(-2.0), _t(-2.0), beta=0.1)
    _close(loss, [0.798139])
    _close(stats["reward_margin"], [-0.2])
    _close(stats["accuracy"], [0.0])


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0, 7.5])
def test_c13_dpo_policy_equal_to_reference_gives_ln2_for_any_beta(beta):
    logp = _t(-4.0, -0.5, -12.0)
    other = _t(-1.0, -9.0, -3.0)
    loss, stats = dpo_loss(logp, other, logp.clone(), other.clone(), beta=beta)
    _close(loss, [0.693147] * 3)
    _close(loss, [math.log(2.0)] * 3)
    _close(stats["accuracy"], [0.0] * 3)


def test_c13_dpo_gradients():
    chosen, rejected = _t(-1.0, grad=True), _t(-3.0, grad=True)
    ref_chosen, ref_rejected = _t(-2.0, grad=True), _t(-2.0, grad=True)
    loss, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1)
    loss.sum().backward()
    _close(chosen.grad, [-0.0450166])
    _close(rejected.grad, [0.0450166])
    # The reference is a constant: no gradient reaches it.
    assert ref_chosen.grad is None and ref_rejected.grad is None


def test_c13_beta_is_applied_once():
    # Margin (log-ratio difference) 1 at beta 0.2 against margin 2 at beta 0.1.
    wide, _ = dpo_loss(_t(-1.0), _t(-2.0), _t(-1.0), _t(-1.0), beta=0.2)
    narrow, _ = dpo_loss(_t(-1.0), _t(-3.0), _t(-1.0), _t(-1.0), beta=0.1)
    _close(wide, narrow)
    _close(wide, [-math.log(1.0 / (1.0 + math.exp(-0.2)))])


def test_dpo_label_smoothing_mixes_both_directions():
    loss, _ = dpo_loss(_t(-1.0), _t(-3.0), _t(-2.0), _t(-2.0), beta=0.1, label_smoothing=0.1)
    _close(loss, [0.9 * 0.5981388693 + 0.1 * 0.7981388693])
    # Smoothing keeps ln 2 at the reference: both labels are equally likely there.
    at_ref, _ = dpo_loss(_t(-1.0), _t(-3.0), _t(-1.0), _t(-3.0), beta=0.1, label_smoothing=0.3)
    _close(at_ref, [math.log(2.0)])


def test_dpo_rejects_bad_arguments():
    one = _t(-1.0)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(one, one, one, one, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(one, one, one, one, beta=0.1, label_smoothing=0.5)
    with pytest.raises(ValueError, match="policy_rejected has shape"):
        dpo_loss(one, _t(-1.0, -2.0), one, one, beta=0.1)


def test_dpo_is_finite_for_huge_margins():
    loss, _ = dpo_loss(_t(0.0, -1e4), _t(-1e4, 0.0), _t(0.0, 0.0), _t(0.0, 0.0), beta=1.0)
    assert torch.isfinite(loss).all()
    _close(loss, [0.0, 1e4])


# --- IPO ---------------------------------------------------------------------------------------


def test_ipo_known_value_and_gradient():
    # h = (-1 - -2) - (-3 - -2) = 2, target 1 / (2 * 0.1) = 5: loss (2 - 5)^2 = 9,
    # d loss / d logp_chosen = 2 (h - 5) = -6 and d loss / d logp_rejected = +6.
    chosen, rejected = _t(-1.0, grad=True), _t(-3.0, grad=True)
    loss, stats = ipo_loss(chosen, rejected, _t(-2.0), _t(-2.0), tau=0.1)
    _close(loss, [9.0])
    loss.sum().backward()
    _close(chosen.grad, [-6.0])
    _close(rejected.grad, [6.0])
    _close(stats["reward_margin"], [0.2])
    # At the target the loss and its gradient vanish: h = 5 with tau 0.1.
    at_target, _ = ipo_loss(_t(-1.0), _t(-4.0), _t(-2.0), _t(-0.0), tau=0.1)
    _close(at_target, [0.0])


def test_ipo_with_mean_logprobs_ignores_duplicated_responses():
    tokens_chosen = [-0.3, -1.2, -0.7]
    tokens_rejected = [-2.0, -0.4]
    ref_chosen = [-0.5, -1.0, -0.9]
    ref_rejected = [-1.5, -0.6]

    def loss_for(copies: int) -> torch.Tensor:
        width = 3 * copies
        rows = [tokens_chosen * copies, tokens_rejected * copies, ref_chosen * copies,
                ref_rejected * copies]
        padded = torch.full((4, width), float("nan"))
        mask = torch.zeros(4, width)
        for i, row in enumerate(rows):
            padded[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1.0
        seq = sequence_logprobs(padded, mask, average=True)
        loss, _ = ipo_loss(seq[0:1], seq[1:2], seq[2:3], seq[3:4], tau=0.5)
        return loss

    single, double = loss_for(1), loss_for(2)
    _close(double, single)
    h = (sum(tokens_chosen) - sum(ref_chosen)) / 3 - (sum(tokens_rejected) - sum(ref_rejected)) / 2
    _close(single, [(h - 1.0) ** 2])


def test_ipo_rejects_bad_tau():
    one = _t(-1.0)
    with pytest.raises(ValueError, match="tau"):
        ipo_loss(one, one, one, one, tau=0.0)


# --- sequence log-probs ------------------------------------------------------------------------


def test_sequence_logprobs_sum_and_mean_ignore_padding():
    logprobs = torch.tensor([[-1.0, -2.0, float("nan")], [-4.0, 9.0, 9.0], [5.0, 5.0, 5.0]],
                            requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    _close(sequence_logprobs(logprobs, mask, average=False), [-3.0, -4.0, 0.0])
    mean = sequence_logprobs(logprobs, mask, average=True)
    _close(mean, [-1.5, -4.0, 0.0])
    mean.sum().backward()
    _close(logprobs.grad, [[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="same"):
        sequence_logprobs(logprobs, mask[:, :2], average=False)
