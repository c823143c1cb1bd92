"""Tests for rlhf_ray.algorithms.iql: expectile values and fit (C14), AWR weights and the
behaviour-cloning validator (C14), TD target indexing with truncation, CQL penalty, Polyak
updates, the token Q/V heads, and a one-state bandit that the blocks together solve."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_ray.algorithms.iql import (
    TokenQHeads,
    awr_policy_loss,
    awr_weights,
    check_iql_settings,
    cql_penalty,
    expectile_loss,
    iql_advantages,
    polyak_update,
    q_head_parameter_count,
    q_loss,
    td_targets,
)
from rlhf_ray.models.forward import pack

from tests.conftest import assert_close as _close

NAN = float("nan")


# --- C14: expectile loss ----------------------------------------------------------------------


def test_c14_expectile_values_at_tau_0_7():
    diff = torch.tensor([[1.0, -1.0, 0.0, NAN], [2.0, -2.0, 0.5, -0.5]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    loss = expectile_loss(diff, mask, tau=0.7)
    _close(loss, [[0.7, 0.3, 0.0, 0.0], [2.8, 1.2, 0.175, 0.075]])


def test_c14_expectile_fit_of_zero_and_one_converges_to_tau():
    # Samples {0, 1} with equal weight: the 0.7-expectile is 0.7 (the mean would be 0.5).
    samples = torch.tensor([[0.0, 1.0]])
    mask = torch.ones_like(samples)
    v = torch.zeros((), requires_grad=True)
    opt = torch.optim.SGD([v], lr=0.5)
    for _ in range(200):
        opt.zero_grad()
        expectile_loss(samples - v, mask, tau=0.7).sum().div(2).backward()
        opt.step()
    assert abs(v.item() - 0.7) < 1e-3


def test_expectile_rejects_tau_outside_the_open_interval():
    x = torch.zeros(1, 1)
    for tau in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="tau"):
            expectile_loss(x, x, tau)


def test_expectile_gradient_does_not_see_pads():
    v = torch.tensor([[0.0, 0.0]], requires_grad=True)
    target = torch.tensor([[1.0, NAN]])
    expectile_loss(target - v, torch.tensor([[1.0, 0.0]]), 0.9).sum().backward()
    _close(v.grad, [[-1.8, 0.0]])


# --- C14: AWR weights and the validator -------------------------------------------------------


def test_c14_awr_weights_are_clipped_and_finite_for_large_advantages():
    adv = torch.tensor([[-50.0, 0.0, 1.0, 50.0]], requires_grad=True)
    w = awr_weights(adv, beta=1.0, max_weight=20.0)
    assert torch.isfinite(w).all() and not w.requires_grad
    _close(w, [[math.exp(-50.0), 1.0, math.e, 20.0]])
    # A small beta: exp(500) would overflow, exp(-500) underflows to 0; both stay finite.
    w = awr_weights(adv, beta=0.1, max_weight=100.0)
    assert torch.isfinite(w).all()
    _close(w, [[0.0, 1.0, 100.0, 100.0]])  # exp(10) is above the cap too


def test_awr_weights_are_zero_at_masked_positions():
    adv = torch.tensor([[0.0, NAN, 50.0]])
    w = awr_weights(adv, 1.0, 5.0, mask=torch.tensor([[1, 0, 0]]))
    assert torch.equal(w, torch.tensor([[1.0, 0.0, 0.0]]))


def test_c14_validator_rejects_settings_that_make_every_weight_one():
    adv = torch.linspace(-50.0, 50.0, 11)
    # Why beta = inf is rejected: it is behaviour cloning, every weight exactly 1.
    assert torch.equal(torch.exp(adv / math.inf), torch.ones(11))
    with pytest.raises(ValueError, match=r"beta=inf.*behaviour cloning"):
        check_iql_settings(beta=math.inf, max_weight=20.0, tau_expectile=0.7)
    # An advantage bound of 0 means every advantage, and so every weight, is 1.
    with pytest.raises(ValueError, match=r"advantage_bound=0.*behaviour cloning"):
        check_iql_settings(1.0, 20.0, 0.7, advantage_bound=0.0)
    # A beta so large against the advantage range that no weight moves off 1.
    with pytest.raises(ValueError, match=r"beta=1000000.0.*behaviour cloning"):
        check_iql_settings(1e6, 20.0, 0.7, advantage_bound=1.0)
    # The config key is named when a mapping is given.
    with pytest.raises(ValueError, match=r"^offline\.awr_beta=inf"):
        check_iql_settings(math.inf, 20.0, 0.7, names={"beta": "offline.awr_beta"})


def test_validator_accepts_working_settings():
    check_iql_settings(1.0, 20.0, 0.7)
    check_iql_settings(0.1, 100.0, 0.9, gamma=0.99, polyak_tau=1.0, cql_alpha=0.5,
                       advantage_bound=1.0)
    # A cap of exactly 1 still uses the advantage: worse-than-V tokens are down-weighted.
    check_iql_settings(1.0, 1.0, 0.7, advantage_bound=1.0)
    w = awr_weights(torch.tensor([-1.0, 0.0, 1.0]), beta=1.0, max_weight=1.0)
    _close(w, [math.exp(-1.0), 1.0, 1.0])


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"beta": 0.0}, "beta"),
        ({"beta": -1.0}, "beta"),
        ({"beta": NAN}, "beta"),
        ({"max_weight": 0.5}, "max_weight"),
        ({"max_weight": math.inf}, "max_weight"),
        ({"tau_expectile": 0.0}, "tau_expectile"),
        ({"tau_expectile": 1.0}, "tau_expectile"),
        ({"gamma": 1.5}, "gamma"),
        ({"polyak_tau": 0.0}, "polyak_tau"),
        ({"cql_alpha": -0.1}, "cql_alpha"),
    ],
)
def test_validator_names_the_bad_setting(kwargs, key):
    settings = {"beta": 1.0, "max_weight": 20.0, "tau_expectile": 0.7, **kwargs}
    with pytest.raises(ValueError, match=rf"^{key}="):
        check_iql_settings(**settings)


# --- TD targets -------------------------------------------------------------------------------


def _two_rows():
    """Row 0: 3 tokens, ended by EOS, reward 1. Row 1: 2 tokens, cut at the budget, reward 2.

    ``v`` holds V over the T + 1 = 4 states; row 1's column 2 is its state after its last token
    and column 3 lies beyond its end (garbage)."""
    v = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, NAN]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards = torch.tensor([1.0, 2.0])
    truncated = torch.tensor([False, True])
    return v, mask, rewards, truncated


def test_td_targets_indexing_terminal_and_truncated_rows():
    v, mask, rewards, truncated = _two_rows()
    v = v.requires_grad_()
    targets = td_targets(rewards, v[:, 1:], mask, 0.9, truncated=truncated)
    assert not targets.requires_grad
    _close(targets, [
        # r_t + 0.9 * V(s_{t+1}); the terminal last token gets its reward and no bootstrap.
        [0.9 * 0.2, 0.9 * 0.3, 1.0],
        # The truncated last token bootstraps from V(state after it) = 0.7; the pad gets 0.
        [0.9 * 0.6, 2.0 + 0.9 * 0.7, 0.0],
    ])
    # Without the truncation flag row 1 ends at its last token too.
    _close(td_targets(rewards, v[:, 1:], mask, 0.9)[1], [0.54, 2.0, 0.0])


def test_td_targets_with_per_token_rewards_and_gamma_one():
    v, mask, rewards, truncated = _two_rows()
    per_token = torch.tensor([[-0.1, -0.1, -0.1], [-0.2, -0.2, NAN]])
    targets = td_targets(rewards, v[:, 1:], mask, 1.0, truncated=truncated,
                         per_token_rewards=per_token)
    _close(targets, [[0.1, 0.2, 0.9], [0.4, 2.5, 0.0]])


def test_td_targets_lambda_returns():
    v, mask, rewards, truncated = _two_rows()
    one_step = td_targets(rewards, v[:, 1:], mask, 0.9, truncated=truncated)
    _close(td_targets(rewards, v[:, 1:], mask, 0.9, truncated=truncated, lam=0.0), one_step)
    # G_t = y_t + gamma * lam * (G_{t+1} - V(s_{t+1})), by hand with gamma 0.9, lam 0.5
    g1 = 0.27 + 0.45 * (1.0 - 0.3)
    _close(td_targets(rewards, v[:, 1:], mask, 0.9, truncated=truncated, lam=0.5), [
        [0.18 + 0.45 * (g1 - 0.2), g1, 1.0],
        [0.54 + 0.45 * (2.63 - 0.6), 2.63, 0.0],
    ])
    # lam 1, gamma 1: the Monte-Carlo return on every token, whatever V says before the end
    _close(td_targets(rewards, v[:, 1:], mask, 1.0, truncated=truncated, lam=1.0),
           [[1.0, 1.0, 1.0], [2.7, 2.7, 0.0]])
    with pytest.raises(ValueError, match="lambda"):
        td_targets(rewards, v[:, 1:], mask, 1.0, lam=1.5)


def test_td_targets_edge_cases():
    v_next = torch.zeros(2, 2)
    empty = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    _close(td_targets(torch.tensor([3.0, NAN]), v_next, empty, 1.0), [[3.0, 0.0], [0.0, 0.0]])
    with pytest.raises(ValueError, match="non-finite rewards on rows"):
        td_targets(torch.tensor([NAN, 0.0]), v_next, empty, 1.0)
    with pytest.raises(ValueError, match="gamma"):
        td_targets(torch.zeros(2), v_next, empty, 1.1)
    with pytest.raises(ValueError, match="v_next"):
        td_targets(torch.zeros(2), torch.zeros(2, 3), empty, 1.0)


def test_state_after_the_last_token_is_column_len_of_packed_states():
    # What td_targets' bootstrap relies on: state column len(r) is the row's last real token.
    batch = pack([[7, 8], [9]], [[1, 2, 3], [4]], pad_id=0)
    for b, n in enumerate(batch.response_lens.tolist()):
        last_real = int(batch.attention_mask[b].nonzero().max())
        assert int(batch.state_index[b, n]) == last_real


# --- Q loss, CQL, advantages ------------------------------------------------------------------


def test_q_loss_is_squared_error_on_valid_tokens_with_gradient_to_q_only():
    q = torch.tensor([[1.0, 2.0, NAN]], requires_grad=True)
    y = torch.tensor([[0.5, 3.0, 1.0]], requires_grad=True)
    loss = q_loss(q, y, torch.tensor([[1, 1, 0]]))
    _close(loss, [[0.25, 1.0, 0.0]])
    loss.sum().backward()
    _close(q.grad, [[1.0, -2.0, 0.0]])
    assert y.grad is None


def test_cql_penalty_known_values():
    vocab = 7
    equal = torch.full((1, 2, vocab), 3.0)
    _close(cql_penalty(equal, equal[..., 0], torch.ones(1, 2)), [[math.log(vocab)] * 2])
    q_all = torch.tensor([[[1.0, 2.0, 3.0]]])
    expected = math.log(math.exp(1) + math.exp(2) + math.exp(3))
    _close(cql_penalty(q_all, q_all[..., 0], torch.ones(1, 1)), [[expected - 1.0]], atol=1e-5)
    _close(cql_penalty(q_all, q_all[..., 2], torch.ones(1, 1)), [[expected - 3.0]], atol=1e-5)


def test_cql_penalty_keeps_pads_out_of_the_gradient():
    q_all = torch.tensor([[[0.0, 0.0], [NAN, math.inf]]], requires_grad=True)
    taken = q_all[..., 0]
    pen = cql_penalty(q_all, taken, torch.tensor([[1, 0]]))
    _close(pen, [[math.log(2.0), 0.0]])
    pen.sum().backward()
    assert torch.isfinite(q_all.grad).all()
    # softmax minus one-hot of the taken token at the valid position, 0 at the pad.
    _close(q_all.grad, [[[-0.5, 0.5], [0.0, 0.0]]])


def test_iql_advantages_and_awr_policy_loss():
    q_t = torch.tensor([[1.0, 0.0, 5.0]])
    v = torch.tensor([[0.5, 0.5, NAN]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0]])
    adv = iql_advantages(q_t, v, mask)
    assert not adv.requires_grad
    _close(adv, [[0.5, -0.5, 0.0]])
    logp = torch.tensor([[-1.0, -2.0, NAN]], requires_grad=True)
    loss, stats = awr_policy_loss(logp, adv, mask, beta=0.5, max_weight=2.0)
    _close(loss, [[2.0 * 1.0, math.exp(-1.0) * 2.0, 0.0]])
    loss.sum().backward()
    _close(logp.grad, [[-2.0, -math.exp(-1.0), 0.0]])
    _close(stats["weight_mean"], (2.0 + math.exp(-1.0)) / 2)
    _close(stats["weight_max"], 2.0)
    _close(stats["weight_capped_frac"], 0.5)
    _close(stats["advantage_mean"], 0.0)


# --- Polyak updates ---------------------------------------------------------------------------


def test_polyak_update_averages_in_place_without_grad():
    target, online = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        target.weight.fill_(1.0), target.bias.fill_(0.0)
        online.weight.fill_(3.0), online.bias.fill_(-4.0)
    polyak_update(target, online, 0.25)
    _close(target.weight, [[1.5, 1.5]])
    _close(target.bias, [-1.0])
    assert target.weight.grad_fn is None and online.weight.grad is None
    polyak_update(target, online, 0.0)
    _close(target.bias, [-1.0])
    polyak_update(target, online, 1.0)
    assert torch.equal(target.weight, online.weight) and torch.equal(target.bias, online.bias)
    with pytest.raises(ValueError, match="differ"):
        polyak_update(target, torch.nn.Linear(2, 1, bias=False), 0.1)
    with pytest.raises(ValueError, match="tau"):
        polyak_update(target, online, 1.5)


# --- TokenQHeads ------------------------------------------------------------------------------


@pytest.mark.parametrize("q_rank", [None, 4])
def test_token_q_heads_shapes_and_taken_values(q_rank):
    torch.manual_seed(0)
    b, t, h, vocab = 2, 3, 8, 11
    heads = TokenQHeads(h, vocab, q_rank=q_rank)
    states = torch.randn(b, t + 1, h)
    actions = torch.randint(vocab, (b, t))
    q_all, v = heads(states[:, :-1])
    assert q_all.shape == (b, t, vocab) and v.shape == (b, t)
    assert heads.values(states).shape == (b, t + 1)
    assert torch.equal(v, torch.zeros(b, t))  # V starts at exactly 0
    gathered = q_all.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    _close(heads.q_taken(states[:, :-1], actions), gathered, atol=1e-5)
    target_taken = heads.q_taken(states[:, :-1], actions, target=True)
    _close(target_taken, gathered, atol=1e-5)  # the target starts as a copy
    assert not target_taken.requires_grad
    params = sum(p.numel() for p in heads.q.parameters())
    assert params == q_head_parameter_count(h, vocab, q_rank)


def test_token_q_heads_from_the_lm_head():
    torch.manual_seed(1)
    h, vocab = 6, 10
    weight = torch.randn(vocab, h)
    states = torch.randn(2, 3, h)
    logits = states @ weight.T
    _close(TokenQHeads(h, vocab, q_rank=None, lm_head_weight=weight).q_values(states), logits,
           atol=1e-5)
    # The rank-5 SVD factorisation keeps all but the smallest singular value; rank 2 less.
    error = {}
    for rank in (5, 2):
        heads = TokenQHeads(h, vocab, q_rank=rank, lm_head_weight=weight)
        assert heads.q_rank == rank and heads.q.down.weight.shape == (rank, h)
        error[rank] = float((heads.q_values(states).detach() - logits).norm())
        u, sv, vh = torch.linalg.svd(weight, full_matrices=False)
        best = (u[:, :rank] * sv[:rank]) @ vh[:rank]  # Eckart-Young: the best rank-r matrix
        _close((heads.q.up.weight @ heads.q.down.weight).detach(), best, atol=1e-4)
    assert 0 < error[5] < error[2]
    # A rank of at least min(H, V) saves nothing and builds the full, exact head.
    full = TokenQHeads(h, vocab, q_rank=h, lm_head_weight=weight)
    assert full.q_rank is None and full.q.down is None
    _close(full.q_values(states), logits, atol=1e-5)
    with pytest.raises(ValueError, match="q_rank"):
        TokenQHeads(h, vocab, q_rank=0)
    with pytest.raises(ValueError, match="lm_head_weight"):
        TokenQHeads(h, vocab, q_rank=None, lm_head_weight=weight.T)


def test_target_head_is_not_moved_by_an_optimizer_step_on_the_online_heads():
    torch.manual_seed(2)
    heads = TokenQHeads(8, 11, q_rank=4)
    before = {k: p.clone() for k, p in heads.target_q.named_parameters()}
    online_before = {k: p.clone() for k, p in heads.q.named_parameters()}
    assert all(not p.requires_grad for p in heads.target_q.parameters())
    trainable = {id(p) for p in heads.trainable_parameters()}
    assert not trainable & {id(p) for p in heads.target_q.parameters()}
    # Even an optimizer handed every parameter (target included) leaves the target alone.
    opt = torch.optim.AdamW(heads.parameters(), lr=0.1, weight_decay=0.1)
    states, actions = torch.randn(2, 3, 8), torch.randint(11, (2, 3))
    q_all, v = heads(states)
    mask = torch.ones(2, 3)
    taken = heads.q_taken(states, actions)
    target_taken = heads.q_taken(states, actions, target=True)
    loss = (q_loss(taken, torch.ones(2, 3), mask) + cql_penalty(q_all, taken, mask)
            + expectile_loss(target_taken - v, mask, 0.7)).sum()
    loss.backward()
    opt.step()
    for k, p in heads.target_q.named_parameters():
        assert torch.equal(p, before[k]), k
    assert any(not torch.equal(p, online_before[k]) for k, p in heads.q.named_parameters())
    heads.update_target(1.0)
    for (_, p), (_, o) in zip(heads.target_q.named_parameters(), heads.q.named_parameters()):
        assert torch.equal(p, o)


def test_q_head_size_for_smollm2():
    full = q_head_parameter_count(576, 49152, None)
    assert 28.3e6 < full < 28.4e6 and 113e6 < full * 4 < 114e6
    assert q_head_parameter_count(576, 49152, 64) == 64 * 576 + 49152 * 64 + 49152


# --- the blocks together ----------------------------------------------------------------------


def test_one_state_bandit_awr_prefers_the_better_token():
    """One state, three tokens; the data takes tokens 0 (reward 1) and 1 (reward 0) equally.

    Q learns the rewards, V their 0.9-expectile (0.9), and AWR moves the policy onto token 0,
    where behaviour cloning would stay at one half each."""
    torch.manual_seed(3)
    h, vocab = 4, 3
    heads = TokenQHeads(h, vocab, q_rank=None)
    policy_logits = torch.zeros(vocab, requires_grad=True)
    opt = torch.optim.Adam(heads.trainable_parameters() + [policy_logits], lr=0.05)
    states = torch.ones(2, 1, h)  # one-token responses: s_0 is the same for both rows
    actions = torch.tensor([[0], [1]])
    rewards = torch.tensor([1.0, 0.0])
    mask = torch.ones(2, 1)
    v_next = torch.zeros(2, 1)  # terminal: never read
    for _ in range(600):
        opt.zero_grad()
        taken = heads.q_taken(states, actions)
        v = heads.values(states)
        target_taken = heads.q_taken(states, actions, target=True)
        adv = iql_advantages(target_taken, v, mask)
        logp = torch.log_softmax(policy_logits, -1)[actions]
        policy, _ = awr_policy_loss(logp, adv, mask, beta=0.1, max_weight=20.0)
        targets = td_targets(rewards, v_next, mask, 1.0)
        loss = q_loss(taken, targets, mask) + expectile_loss(target_taken - v, mask, 0.9) + policy
        loss.sum().backward()
        opt.step()
        heads.update_target(0.05)
    with torch.no_grad():
        _close(heads.q_taken(states, actions).squeeze(-1), [1.0, 0.0], atol=1e-2)
        _close(heads.values(states)[0], [0.9], atol=1e-2)
        assert torch.softmax(policy_logits, -1)[0] > 0.9
