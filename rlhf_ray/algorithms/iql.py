"""Token-level offline RL: IQL (in the spirit of ILQL) and CQL's conservative penalty.

Building blocks only; nothing here runs a model. Words and indexing, for one response of ``T``
tokens ``a_0 .. a_{T-1}`` after a prompt:

* state ``s_t`` = the prompt plus the response prefix ``a_0 .. a_{t-1}``, and action ``a_t`` =
  response token ``t``. ``s_T`` is the state after the last token.
* ``forward.forward_states`` returns ``[B, T + 1, H]`` hidden states: column ``t`` is ``s_t``
  (the state that predicts token ``t``), column ``T`` the state after the last one (for a row
  shorter than the batch, column ``len`` is its state after its last token; see ``PackedBatch``).
* ``Q(s_t, a_t)`` comes from the states ``[:, :-1]`` (as the LM logits do), ``V(s_t)`` from all
  ``T + 1`` states, so ``v[:, :-1]`` is ``V(s_t)`` and ``v_next = v[:, 1:]`` is ``V(s_{t+1})``.

The losses (Kostrikov et al. 2021, "Offline Reinforcement Learning with Implicit Q-Learning";
Snell et al. 2022, "Offline RL for Natural Language Generation with Implicit Language Q
Learning"; Kumar et al. 2020, "Conservative Q-Learning for Offline Reinforcement Learning"):

* Q regression: ``Q(s_t, a_t) -> r_t + gamma * V(s_{t+1})`` (``td_targets``, ``q_loss``); ``V``
  after a terminal (EOS) response is 0, after a truncated one the estimate ``V(s_T)``.
* V regression: the expectile ``tau`` of ``Q_target(s_t, a_t)`` over the dataset's actions
  (``expectile_loss`` on ``Q_target - V``). With ``tau > 0.5`` V leans towards the best
  in-dataset action, which is what makes IQL improve on the data without ever evaluating a token
  the data does not contain.
* CQL penalty: ``logsumexp_a Q(s_t, a) - Q(s_t, a_t)`` (``cql_penalty``) pushes down the Q of
  every token the data did not take; ILQL adds it with a small coefficient.
* Policy: advantage-weighted regression, ``-min(exp(A / beta), max_weight) * log pi(a_t | s_t)``
  with ``A = Q_target(s_t, a_t) - V(s_t)`` (``awr_weights``, ``awr_policy_loss``): the
  likelihood of the dataset tokens, weighted towards the good ones, so the policy stays inside
  the data's support.

Masks are ``[B, T]`` float or bool, built from lengths by the caller and non-zero on valid
response tokens. As in ``advantages``, whatever sits at masked positions is replaced with
``torch.where`` before any arithmetic, and per-token outputs are exactly 0 there. Per-token losses
are returned ``[B, T]``; reduce them with ``ppo.aggregate_token_mean``.

Known limits: one online Q head and one target (ILQL and IQL take the minimum of two; not done
here); the TD target uses the online V, detached, as IQL does (no target V); the Q head over the
vocabulary is a full or low-rank linear map of the last hidden state (see ``TokenQHeads``);
ILQL's decoding-time perturbation of the logits by ``Q - V`` is not implemented, the policy is
trained by AWR instead.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from rlhf_ray.algorithms.advantages import as_bool_mask, last_valid_index, masked_mean

# Smallest spread (largest weight / smallest weight - 1) of the AWR weights over the whole
# advantage range that ``check_iql_settings`` accepts when given an advantage bound.
MIN_WEIGHT_SPREAD = 1e-3


def _check_shape(name: str, x: Tensor, shape: torch.Size | tuple[int, ...]) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)}")


# --- value and Q regression -------------------------------------------------------------------


def expectile_loss(diff: Tensor, mask: Tensor, tau: float) -> Tensor:
    """Asymmetric squared loss ``|tau - 1(u < 0)| * u**2`` per token, ``u = diff``.

    ``diff`` is target minus prediction: for IQL's value loss ``Q_target(s_t, a_t) - V(s_t)``,
    with the Q side detached by the caller and the gradient flowing into V. A prediction below
    the target (``u > 0``) is weighted ``tau``, one above ``1 - tau``, so the minimiser over a
    set of targets is their ``tau``-expectile: the mean at 0.5, towards the maximum as ``tau``
    approaches 1. No factor 1/2 (``tau = 0.7``: ``u = 1`` gives 0.7, ``u = -1`` gives 0.3).

    Args:
        diff: ``[B, T]`` target minus prediction (with gradient through the prediction).
        mask: ``[B, T]`` float or bool, non-zero on valid response tokens.
        tau: the expectile, in (0, 1).

    Returns:
        ``[B, T]`` loss, exactly 0 at masked positions.
    """
    if not 0.0 < tau < 1.0:
        raise ValueError(f"expectile tau must be in (0, 1), got {tau}")
    valid = as_bool_mask(mask)
    _check_shape("diff", diff, valid.shape)
    u = torch.where(valid, diff, 0.0)
    weight = torch.where(u < 0, 1.0 - tau, tau)
    return torch.where(valid, weight * u.square(), 0.0)


def td_targets(
    rewards: Tensor,
    v_next: Tensor,
    mask: Tensor,
    gamma: float,
    *,
    truncated: Tensor | None = None,
    per_token_rewards: Tensor | None = None,
    lam: float = 0.0,
) -> Tensor:
    """Targets for ``Q(s_t, a_t)``: one-step ``r_t + gamma * V(s_{t+1})`` (``lam = 0``, IQL's
    own), or lambda-returns, without gradient.

    With ``lam > 0`` the target is the lambda-return ``G_t = r_t + gamma * ((1 - lam) *
    V(s_{t+1}) + lam * G_{t+1})``, computed backwards as ``G_t = y_t + gamma * lam * (G_{t+1} -
    V(s_{t+1}))`` from the one-step targets ``y_t``; the last valid token keeps its one-step
    target (0 or ``V(s_T)`` after it, as below). ``lam = 1`` is the Monte-Carlo return of the
    data. A larger ``lam`` carries an end-of-response reward back over many tokens in one update
    instead of one token per update, at the price of estimating the value of the data's own
    continuation rather than the best in-data one (the expectile of V still leans up).

    ``r_t`` is ``per_token_rewards[b, t]`` (0 when None; e.g. ``-kl_coef * kl`` against the
    reference) plus, on the last valid token of row ``b``, the sequence reward ``rewards[b]``.
    ``V(s_{t+1})`` is ``v_next[b, t]``, except after the last valid token of a terminal row,
    where it is 0 (the episode ended with EOS). A truncated row (cut at the token budget,
    ``finish_reason == "length"``) bootstraps there from ``v_next[b, last]`` = ``V(s_T)``, the
    state after its last token. Tokens before the last always bootstrap.

    Indexing: with ``v`` the values over the ``T + 1`` states of ``forward_states``, pass
    ``v_next = v[:, 1:]`` (detached or not: the result is detached). Then ``v_next[b, t]`` is V
    of the state after token ``t``. The last valid token is found from the mask, so rows of
    different lengths share one batch.

    Args:
        rewards: ``[B]`` sequence rewards, placed on each row's last valid token.
        v_next: ``[B, T]`` ``V(s_{t+1})``, the value of the state after token ``t``.
        mask: ``[B, T]`` float or bool, non-zero on valid response tokens.
        gamma: discount per token, in [0, 1].
        truncated: ``[B]`` bool, True where the response was cut rather than ended by EOS;
            all terminal when None.
        per_token_rewards: ``[B, T]`` extra reward on every valid token; none when None.
        lam: the lambda of the returns, in [0, 1]; 0 gives one-step targets.

    Returns:
        ``[B, T]`` targets, exactly 0 at masked positions. A row with no valid token gets 0.

    Raises:
        ValueError: on mismatched shapes, gamma outside [0, 1], or a non-finite reward on a row
            that has tokens (or a non-finite per-token reward on a valid token).
    """
    valid = as_bool_mask(mask)
    if valid.dim() != 2:
        raise ValueError(f"mask must be [B, T], got shape {tuple(valid.shape)}")
    _check_shape("v_next", v_next, valid.shape)
    _check_shape("rewards", rewards, valid.shape[:1])
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must be in [0, 1], got {lam}")

    with torch.no_grad():
        last, has_valid = last_valid_index(valid)
        bad = has_valid & ~torch.isfinite(rewards)
        if bool(bad.any()):
            raise ValueError(f"non-finite rewards on rows {bad.nonzero().flatten().tolist()}")
        if per_token_rewards is None:
            r = torch.zeros_like(v_next, dtype=torch.float32)
        else:
            _check_shape("per_token_rewards", per_token_rewards, valid.shape)
            bad_tokens = valid & ~torch.isfinite(per_token_rewards)
            if bool(bad_tokens.any()):
                rows = bad_tokens.any(dim=-1).nonzero().flatten().tolist()
                raise ValueError(f"non-finite per_token_rewards on rows {rows}")
            r = torch.where(valid, per_token_rewards.detach().float(), 0.0)
        end_reward = torch.where(has_valid, rewards.detach().float(), 0.0)
        r = r.scatter_add(1, last.unsqueeze(1), end_reward.unsqueeze(1))

        is_last = torch.zeros_like(valid).scatter(1, last.unsqueeze(1), has_valid.unsqueeze(1))
        bootstrap = ~is_last
        if truncated is not None:
            _check_shape("truncated", truncated, valid.shape[:1])
            bootstrap = bootstrap | as_bool_mask(truncated).unsqueeze(1)
        next_value = torch.where(valid & bootstrap, v_next.detach().float(), 0.0)
        targets = torch.where(valid, r + gamma * next_value, 0.0)
        if lam > 0:
            # the tokens whose successor is a valid token of the same row
            continues = valid & ~is_last
            returns = targets.clone()
            for t in range(valid.shape[1] - 2, -1, -1):
                correction = gamma * lam * (returns[:, t + 1] - next_value[:, t])
                returns[:, t] = torch.where(continues[:, t], targets[:, t] + correction,
                                            targets[:, t])
            targets = torch.where(valid, returns, 0.0)
        return targets


def q_loss(q_taken: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Squared TD error ``(Q(s_t, a_t) - target_t)**2`` per token (no factor 1/2).

    Args:
        q_taken: ``[B, T]`` online Q of the dataset tokens (with gradient).
        targets: ``[B, T]`` from ``td_targets`` (detached here).
        mask: ``[B, T]`` float or bool, non-zero on valid response tokens.

    Returns:
        ``[B, T]`` loss, exactly 0 at masked positions.
    """
    valid = as_bool_mask(mask)
    _check_shape("q_taken", q_taken, valid.shape)
    _check_shape("targets", targets, valid.shape)
    q = torch.where(valid, q_taken, 0.0)
    y = torch.where(valid, targets.detach(), 0.0)
    return torch.where(valid, (q - y).square(), 0.0)


def cql_penalty(q_all: Tensor, q_taken: Tensor, mask: Tensor) -> Tensor:
    """CQL's conservative penalty per token: ``logsumexp_a Q(s_t, a) - Q(s_t, a_t)``.

    It is the cross-entropy of ``softmax(Q(s_t, .))`` against the dataset token, so it is >= 0
    and equals ``log V`` when every Q is equal. Minimising it lowers the Q of tokens the data did
    not take relative to the one it did, which keeps the argmax of Q (and the advantages) from
    trusting tokens the data never shows. The logsumexp is taken in fp32.

    ``q_all`` is masked before the logsumexp, which costs one ``[B, T, V]`` temporary but keeps
    NaN or inf at padded positions out of the gradient.

    Args:
        q_all: ``[B, T, V]`` online Q of every vocabulary token (with gradient).
        q_taken: ``[B, T]`` online Q of the dataset tokens, normally ``q_all`` gathered at the
            response ids (with gradient).
        mask: ``[B, T]`` float or bool, non-zero on valid response tokens.

    Returns:
        ``[B, T]`` penalty, exactly 0 at masked positions.
    """
    valid = as_bool_mask(mask)
    if q_all.dim() != 3 or q_all.shape[:2] != valid.shape:
        raise ValueError(
            f"q_all has shape {tuple(q_all.shape)}, expected {tuple(valid.shape)} + [V]"
        )
    _check_shape("q_taken", q_taken, valid.shape)
    q_all = torch.where(valid.unsqueeze(-1), q_all.float(), 0.0)
    q = torch.where(valid, q_taken.float(), 0.0)
    return torch.where(valid, torch.logsumexp(q_all, dim=-1) - q, 0.0)


def iql_advantages(q_target_taken: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """``A(s_t, a_t) = Q_target(s_t, a_t) - V(s_t)`` per token, detached, 0 at masked positions.

    Args:
        q_target_taken: ``[B, T]`` target-head Q of the dataset tokens.
        v: ``[B, T]`` ``V(s_t)`` (``v[:, :-1]`` of the ``T + 1`` state values).
        mask: ``[B, T]`` float or bool, non-zero on valid response tokens.
    """
    valid = as_bool_mask(mask)
    _check_shape("q_target_taken", q_target_taken, valid.shape)
    _check_shape("v", v, valid.shape)
    with torch.no_grad():
        return torch.where(valid, q_target_taken.float() - v.float(), 0.0)


# --- policy extraction ------------------------------------------------------------------------


def _check_weight_settings(beta: float, max_weight: float) -> None:
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"AWR beta must be finite and > 0, got {beta}")
    if not (math.isfinite(max_weight) and max_weight > 0):
        raise ValueError(f"AWR max_weight must be finite and > 0, got {max_weight}")


def awr_weights(
    advantage: Tensor, beta: float, max_weight: float, mask: Tensor | None = None
) -> Tensor:
    """Advantage weights ``min(exp(A / beta), max_weight)`` per token, detached.

    The exponent is clamped at ``log(max_weight)`` before ``exp``, so no inf is ever formed:
    every weight is finite for any finite advantage (a very negative one gives a weight that
    underflows to 0, which drops the token). NaN advantages stay NaN on valid tokens.

    Args:
        advantage: ``[B, T]`` advantages (see ``iql_advantages``).
        beta: temperature, finite and > 0; smaller is greedier.
        max_weight: the cap, finite and > 0.
        mask: ``[B, T]``; weights are exactly 0 at masked positions when given.

    Returns:
        ``[B, T]`` weights.
    """
    _check_weight_settings(beta, max_weight)
    with torch.no_grad():
        a = advantage.detach().float()
        if mask is not None:
            valid = as_bool_mask(mask)
            _check_shape("advantage", a, valid.shape)
            a = torch.where(valid, a, 0.0)
        weights = (a / beta).clamp(max=math.log(max_weight)).exp().clamp(max=max_weight)
        if mask is not None:
            weights = torch.where(valid, weights, 0.0)
    return weights


def awr_policy_loss(
    logprobs: Tensor, advantages: Tensor, mask: Tensor, *, beta: float, max_weight: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Advantage-weighted log-likelihood of the dataset tokens: ``-w_t * log pi(a_t | s_t)``.

    ``w_t = awr_weights(A_t)``, a constant. This is the closed-form solution of improving on the
    behaviour policy under a KL constraint to it, projected onto the policy: it only ever
    reweights tokens the data contains, so the policy stays near the behaviour policy. A
    constant weight would make it behaviour cloning.

    Args:
        logprobs: ``[B, T]`` current policy log-probs of the dataset tokens (with gradient).
        advantages: ``[B, T]`` (see ``iql_advantages``), detached here.
        mask: ``[B, T]`` float or bool, non-zero on valid response tokens.
        beta: AWR temperature, finite and > 0.
        max_weight: the weight cap, finite and > 0.

    Returns:
        ``(per_token_loss [B, T], stats)``; the loss is exactly 0 at masked positions. ``stats``
        holds detached 0-d tensors over valid tokens: ``weight_mean``, ``weight_max``,
        ``weight_capped_frac`` (share at the cap) and ``advantage_mean``. A weight mean that
        stays at 1 with a tiny spread means the run is doing behaviour cloning.
    """
    valid = as_bool_mask(mask)
    _check_shape("logprobs", logprobs, valid.shape)
    _check_shape("advantages", advantages, valid.shape)
    weights = awr_weights(advantages, beta, max_weight, valid)
    logp = torch.where(valid, logprobs, 0.0)
    loss = torch.where(valid, -weights * logp, 0.0)
    with torch.no_grad():
        stats = {
            "weight_mean": masked_mean(weights, valid),
            "weight_max": weights.max() if weights.numel() else weights.new_zeros(()),
            "weight_capped_frac": masked_mean((weights >= max_weight).float(), valid),
            "advantage_mean": masked_mean(torch.where(valid, advantages.float(), 0.0), valid),
        }
    return loss, {k: v.detach() for k, v in stats.items()}


def check_iql_settings(
    beta: float,
    max_weight: float,
    tau_expectile: float,
    *,
    gamma: float = 1.0,
    polyak_tau: float = 0.005,
    cql_alpha: float = 0.0,
    advantage_bound: float | None = None,
    names: Mapping[str, str] | None = None,
) -> None:
    """Rejects IQL/CQL settings that cannot run or that turn AWR into behaviour cloning.

    The AWR weight is ``w(A) = min(exp(A / beta), max_weight)``. Behaviour cloning in disguise
    means ``w`` does not depend on ``A``. Over advantages in ``[-M, M]`` (``M > 0``) the largest
    weight over the smallest is ``min(exp(2M / beta), max_weight * exp(M / beta))`` (when
    ``max_weight >= 1``), so the weights are all equal only when ``beta`` is infinite or ``M`` is
    0. Hence:

    * ``beta`` must be finite and > 0: ``beta = inf`` makes every weight exactly 1.
    * ``max_weight`` must be finite and >= 1. A cap below 1 binds on tokens worse than V and
      gives every token with ``A >= beta * log(max_weight)`` one weight, erasing the distinction
      AWR exists for. A cap of exactly 1 is allowed: positive-advantage tokens then share weight
      1 and worse ones are down-weighted, a filtered behaviour cloning that still uses ``A``.
    * With ``advantage_bound`` (``M``, a bound on ``|A|``; with the sequence reward only at the
      end and ``gamma = 1`` the reward range ``max - min`` of the data), ``M`` must be > 0
      (``M = 0``: every advantage and so every weight is 1) and the spread above must be at
      least ``MIN_WEIGHT_SPREAD`` (0.1 %): a larger ``beta`` changes no token's weight by more
      than rounding. Without a bound, a ``beta`` far above the advantages' scale approaches
      behaviour cloning continuously and cannot be told from the settings alone; watch the
      ``weight_mean`` and ``weight_max`` stats of ``awr_policy_loss``.

    Also checked: ``tau_expectile`` in (0, 1) (IQL wants > 0.5; 0.5 regresses V onto the mean,
    one-step SARSA-like), ``gamma`` in [0, 1], ``polyak_tau`` in (0, 1] (0 would freeze the
    target Q at its initialisation, so V and the advantages would never learn from the data) and
    ``cql_alpha`` finite and >= 0.

    Args:
        beta: AWR temperature.
        max_weight: AWR weight cap.
        tau_expectile: the expectile of the V regression.
        gamma: discount per token.
        polyak_tau: target-Q update rate.
        cql_alpha: coefficient of ``cql_penalty`` (0 is plain IQL).
        advantage_bound: a bound on ``|A|``, when known.
        names: setting name -> config key, for the messages (e.g.
            ``{"beta": "offline.awr_beta"}``); the argument names by default.

    Raises:
        ValueError: naming the first bad setting.
    """
    names = dict(names or {})

    def fail(key: str, value: object, why: str) -> None:
        raise ValueError(f"{names.get(key, key)}={value}: {why}")

    if not (math.isfinite(beta) and beta > 0):
        fail("beta", beta, "must be finite and > 0 (beta = inf makes every AWR weight 1, "
             "which is behaviour cloning)")
    if not (math.isfinite(max_weight) and max_weight >= 1):
        fail("max_weight", max_weight, "must be finite and >= 1 (a cap below 1 gives every "
             "token with advantage >= beta * log(max_weight) the same weight)")
    if not 0.0 < tau_expectile < 1.0:
        fail("tau_expectile", tau_expectile, "must be in (0, 1); IQL uses 0.7 to 0.9")
    if not 0.0 <= gamma <= 1.0:
        fail("gamma", gamma, "must be in [0, 1]")
    if not 0.0 < polyak_tau <= 1.0:
        fail("polyak_tau", polyak_tau, "must be in (0, 1] (0 never updates the target Q)")
    if not (math.isfinite(cql_alpha) and cql_alpha >= 0):
        fail("cql_alpha", cql_alpha, "must be finite and >= 0")
    if advantage_bound is not None:
        if not (math.isfinite(advantage_bound) and advantage_bound > 0):
            fail("advantage_bound", advantage_bound, "must be finite and > 0 (a bound of 0 "
                 "makes every advantage 0 and every AWR weight 1, which is behaviour cloning)")
        log_spread = min(2.0 * advantage_bound / beta,
                         math.log(max_weight) + advantage_bound / beta)
        if log_spread < math.log1p(MIN_WEIGHT_SPREAD):
            fail("beta", beta, f"is so large against advantage_bound={advantage_bound} that "
                 f"every AWR weight lies within {MIN_WEIGHT_SPREAD:.1%} of the others: "
                 "behaviour cloning in disguise; lower beta")


# --- heads and target updates -----------------------------------------------------------------


@torch.no_grad()
def polyak_update(target_module: nn.Module, online_module: nn.Module, tau: float) -> None:
    """In place: ``target <- (1 - tau) * target + tau * online`` for every parameter.

    Floating-point buffers get the same average, other buffers are copied. No gradient is
    recorded. The two modules must have the same parameter names and shapes.

    Args:
        target_module: updated in place.
        online_module: read only.
        tau: update rate in [0, 1]; 1 copies the online module, 0 changes nothing.
    """
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"polyak tau must be in [0, 1], got {tau}")
    for kind, target_items, online_items in (
        ("parameters", target_module.named_parameters(), online_module.named_parameters()),
        ("buffers", target_module.named_buffers(), online_module.named_buffers()),
    ):
        target, online = dict(target_items), dict(online_items)
        if target.keys() != online.keys():
            raise ValueError(
                f"target and online {kind} differ: {sorted(target.keys() ^ online.keys())[:5]}"
            )
        for name, t in target.items():
            o = online[name]
            if t.shape != o.shape:
                raise ValueError(f"{name}: target {tuple(t.shape)}, online {tuple(o.shape)}")
            if t.is_floating_point():
                t.lerp_(o.to(t.dtype), tau)
            else:
                t.copy_(o)


def q_head_parameter_count(hidden: int, vocab: int, q_rank: int | None) -> int:
    """Parameters of one Q head: ``V * H + V`` full, ``r * H + V * r + V`` at rank ``r``
    (a rank of at least ``min(H, V)`` builds the full head, see ``QHead``)."""
    if q_rank is None or q_rank >= min(hidden, vocab):
        return vocab * hidden + vocab
    return q_rank * hidden + vocab * q_rank + vocab


class QHead(nn.Module):
    """``Q(s, .)`` over the vocabulary from a hidden state: ``H -> V``, or ``H -> r -> V``.

    A rank ``r >= min(H, V)`` saves nothing (``r * (H + V) >= V * H``), so it builds the full
    head instead; ``rank`` holds what was built.
    """

    def __init__(
        self,
        hidden: int,
        vocab: int,
        rank: int | None,
        lm_head_weight: Tensor | None = None,
        init_scale: float = 0.01,
    ):
        super().__init__()
        if rank is not None and rank < 1:
            raise ValueError(f"q_rank must be >= 1 or None, got {rank}")
        if rank is not None and rank >= min(hidden, vocab):
            rank = None  # the full head is then exact and no larger
        self.rank = rank
        self.down = None if rank is None else nn.Linear(hidden, rank, bias=False)
        self.up = nn.Linear(hidden if rank is None else rank, vocab)
        nn.init.zeros_(self.up.bias)
        if lm_head_weight is not None:
            _check_shape("lm_head_weight", lm_head_weight, (vocab, hidden))
            self._init_from(lm_head_weight.detach().float(), rank)
        elif rank is None:
            # Q starts near 0, with std init_scale * rms(hidden state).
            nn.init.normal_(self.up.weight, std=init_scale / math.sqrt(hidden))
        else:
            nn.init.normal_(self.down.weight, std=1.0 / math.sqrt(hidden))
            nn.init.normal_(self.up.weight, std=init_scale / math.sqrt(rank))

    @torch.no_grad()
    def _init_from(self, weight: Tensor, rank: int | None) -> None:
        if rank is None:
            self.up.weight.copy_(weight)
            return
        # The best rank-r approximation of the LM head W [V, H] (truncated SVD), split evenly:
        # down = S^1/2 Vr^T, up = W Vr S^-1/2, so up @ down = W Vr Vr^T. The right singular
        # vectors come from the small [H, H] eigenproblem of W^T W (in fp64), which is
        # faster than an SVD of W for a large vocabulary (a few seconds on CPU for SmolLM2).
        w64 = weight.double()
        eigenvalues, eigenvectors = torch.linalg.eigh(w64.T @ w64)  # ascending
        top = eigenvectors[:, -rank:].flip(-1)  # [H, r], largest first
        root = eigenvalues[-rank:].flip(-1).clamp_min(0.0).sqrt().sqrt()  # S^1/2
        self.down.weight.copy_((root.unsqueeze(1) * top.T).float())
        self.up.weight.copy_((w64 @ top / torch.where(root > 0, root, 1.0)).float())

    def _features(self, hidden_states: Tensor) -> Tensor:
        x = hidden_states.float()
        return x if self.down is None else self.down(x)

    def forward(self, hidden_states: Tensor) -> Tensor:
        """``[..., H] -> [..., V]``."""
        return self.up(self._features(hidden_states))

    def taken(self, hidden_states: Tensor, actions: Tensor) -> Tensor:
        """Q of the given tokens only, ``[..., H], [...] -> [...]``, never forming ``[..., V]``."""
        x = self._features(hidden_states)
        return (x * self.up.weight[actions]).sum(-1) + self.up.bias[actions]


class TokenQHeads(nn.Module):
    """IQL heads on the policy's last hidden states: ``Q(s, .)`` over the vocabulary, ``V(s)``,
    and a frozen target copy of the Q head that only ``update_target`` moves.

    Cost: a full Q head is a second LM head, ``V * H`` parameters; for SmolLM2-135M (H = 576,
    V = 49152) that is about 28.3M parameters, 113 MB in fp32. With the target copy, the
    gradient and AdamW's two moments that is about 570 MB of head state, plus a ``[B, T, V]``
    fp32 activation like the logits: affordable on a GPU, heavy for CPU runs, and it grows with
    the vocabulary (Llama-3's 128k vocabulary at H = 4096 is 525M parameters per head).
    ``q_rank = r`` factorises the head as ``H -> r -> V``: at the default r = 64 it is about
    3.2M parameters (13 MB) for SmolLM2. A rank of at least ``min(H, V)`` builds the full head
    (the tiny test models, H = 64, get it by default). ``q_taken`` never forms ``[B, T, V]``, so
    only the CQL penalty needs the full ``q_values``.

    Initialisation: from ``lm_head_weight`` (the policy's output embedding, ``[V, H]``) Q starts
    as the logits, exactly for the full head and as their best rank-r approximation (truncated
    SVD) for a low-rank one; this is ILQL's choice. Without it Q starts near 0 (small random
    weights, zero bias). V (``H -> 1``) starts at exactly 0, like ``models.loading.ValueHead``.
    Hidden states are cast to fp32; the heads are fp32.

    Use ``trainable_parameters`` for the optimizer: the target's parameters have
    ``requires_grad`` False and must not be in it.
    """

    def __init__(
        self,
        hidden: int,
        vocab: int,
        *,
        q_rank: int | None = 64,
        lm_head_weight: Tensor | None = None,
        init_scale: float = 0.01,
    ):
        super().__init__()
        self.hidden, self.vocab = hidden, vocab
        self.q = QHead(hidden, vocab, q_rank, lm_head_weight, init_scale)
        self.q_rank = self.q.rank  # None: the full head
        self.v = nn.Linear(hidden, 1)
        nn.init.zeros_(self.v.weight)
        nn.init.zeros_(self.v.bias)
        self.target_q = copy.deepcopy(self.q)
        self.target_q.requires_grad_(False)

    def forward(self, hidden_states: Tensor) -> tuple[Tensor, Tensor]:
        """``[B, N, H] -> (q_all [B, N, V], v [B, N])`` at the same positions (online heads)."""
        return self.q_values(hidden_states), self.values(hidden_states)

    def q_values(self, hidden_states: Tensor) -> Tensor:
        """Online ``Q(s, .)``: ``[B, N, H] -> [B, N, V]``."""
        return self.q(hidden_states)

    def q_taken(self, hidden_states: Tensor, actions: Tensor, *, target: bool = False) -> Tensor:
        """``Q(s_t, a_t)``: ``[B, T, H], [B, T] long -> [B, T]``; the target head without grad."""
        if hidden_states.shape[:-1] != actions.shape:
            raise ValueError(
                f"hidden_states {tuple(hidden_states.shape)} and actions {tuple(actions.shape)} "
                "do not match"
            )
        if not target:
            return self.q.taken(hidden_states, actions)
        with torch.no_grad():
            return self.target_q.taken(hidden_states, actions)

    def values(self, hidden_states: Tensor) -> Tensor:
        """``V(s)``: ``[B, N, H] -> [B, N]``."""
        return self.v(hidden_states.float()).squeeze(-1)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The online Q and V parameters (never the target's)."""
        return list(self.q.parameters()) + list(self.v.parameters())

    def update_target(self, tau: float) -> None:
        """Polyak-averages the online Q head into the target (see ``polyak_update``)."""
        polyak_update(self.target_q, self.q, tau)
