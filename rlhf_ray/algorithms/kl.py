"""KL between the policy and the frozen reference: per-token estimators and coefficient controllers.

Words: ``logprobs`` are the current policy's log-probs of the sampled tokens and ``ref_logprobs``
the frozen reference's log-probs of the same tokens, both ``[B, T]`` fp32.

Estimators (Schulman, "Approximating KL Divergence", 2020), with ``r = logprobs - ref_logprobs``:

* ``k1 = r`` -- unbiased for KL(policy || ref) when tokens are sampled from the policy, but
  high variance and negative on many tokens.
* ``k2 = r**2 / 2`` -- biased, low variance, always >= 0.
* ``k3 = exp(-r) - 1 + r`` -- unbiased and always >= 0. ``r`` is clamped to [-20, 20] first
  so that ``exp`` cannot overflow when the two models disagree wildly on a token; past the clamp
  k3 is flat (its gradient is 0), which only matters for log ratios no sane run reaches.

``exact_kl`` computes the KL over the whole vocabulary from logits; it is the ground truth that
tests and metrics compare the estimators against.

Controllers hold the KL coefficient (called beta in papers): ``FixedKLController`` never moves,
``AdaptiveKLController`` follows Ziegler et al. 2019 ("Fine-Tuning Language Models from Human
Preferences"). Both keep their one piece of mutable state, ``coef``, in ``state_dict`` so that a
resumed run continues with the coefficient it stopped at.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

KL_ESTIMATORS = ("k1", "k2", "k3")

# k3 takes exp(-r); beyond |r| = 20 the value is useless anyway and exp(20) ~ 5e8 stays finite.
K3_LOG_RATIO_CLAMP = 20.0


def kl_terms(logprobs: Tensor, ref_logprobs: Tensor, estimator: str) -> Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probs.

    Args:
        logprobs: ``[B, T]`` current policy log-probs of the sampled tokens.
        ref_logprobs: ``[B, T]`` reference log-probs of the same tokens.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"`` (see the module docstring).

    Returns:
        ``[B, T]`` per-token estimates. Padding positions are not masked here; the caller
        applies its response mask.

    Raises:
        ValueError: for an unknown estimator or mismatched shapes.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} differ"
        )
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    log_ratio = log_ratio.clamp(-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)
    # expm1 keeps the small-|r| case accurate, so rounding cannot push k3 below 0.
    return torch.expm1(-log_ratio) + log_ratio


def exact_kl(policy_logits: Tensor, ref_logits: Tensor, mask: Tensor) -> Tensor:
    """Exact per-token KL(policy || reference) summed over the vocabulary.

    Args:
        policy_logits: ``[B, T, V]`` policy logits (any temperature already applied).
        ref_logits: ``[B, T, V]`` reference logits.
        mask: ``[B, T]`` float or bool, 1 on valid response tokens.

    Returns:
        ``[B, T]`` KL per token, exactly 0 at masked positions.
    """
    if policy_logits.shape != ref_logits.shape:
        raise ValueError(
            f"policy_logits {tuple(policy_logits.shape)} and ref_logits "
            f"{tuple(ref_logits.shape)} differ"
        )
    if mask.shape != policy_logits.shape[:-1]:
        raise ValueError(f"mask {tuple(mask.shape)} must be {tuple(policy_logits.shape[:-1])}")
    policy_logp = torch.log_softmax(policy_logits, dim=-1)
    ref_logp = torch.log_softmax(ref_logits, dim=-1)
    # Tokens the policy gives probability 0 contribute 0, not 0 * (-inf - x).
    policy_p = policy_logp.exp()
    per_vocab = torch.where(policy_p > 0, policy_p * (policy_logp - ref_logp), 0.0)
    return torch.where(mask.to(torch.bool), per_vocab.sum(dim=-1), 0.0)


class KLController(Protocol):
    """What the learner needs from a KL coefficient holder."""

    coef: float

    def update(self, current_kl: float, n_steps: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class FixedKLController:
    """A constant KL coefficient.

    Args:
        coef: the coefficient, >= 0.
    """

    def __init__(self, coef: float) -> None:
        if coef < 0:
            raise ValueError(f"KL coef must be >= 0, got {coef}")
        self.coef = float(coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Does nothing: the coefficient is fixed. The arguments match the adaptive controller."""
        del current_kl, n_steps

    def state_dict(self) -> dict[str, Any]:
        """Returns the coefficient, for checkpoints."""
        return {"coef": self.coef}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the coefficient saved by ``state_dict``."""
        self.coef = float(state["coef"])


class AdaptiveKLController:
    """Proportional controller that steers the measured KL towards a target (Ziegler et al. 2019).

    Each update: ``error = clip(current_kl / target - 1, -0.2, 0.2)``, then
    ``coef *= 1 + error * n_steps / horizon``, then ``coef`` is clamped to
    ``[min_coef, max_coef]``. A KL above target raises the coefficient, below target lowers it.

    Args:
        init_coef: starting coefficient, inside ``[min_coef, max_coef]``.
        target: the KL to steer towards (same units as ``current_kl``, e.g. nats per sequence).
        horizon: how many steps a full 20% correction is spread over; larger is slower.
        min_coef: lower bound on the coefficient, >= 0.
        max_coef: upper bound on the coefficient.
    """

    ERROR_CLIP = 0.2

    def __init__(
        self,
        init_coef: float,
        target: float,
        horizon: float,
        min_coef: float = 0.0,
        max_coef: float = float("inf"),
    ) -> None:
        if target <= 0:
            raise ValueError(f"KL target must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"KL horizon must be > 0, got {horizon}")
        if not 0 <= min_coef <= init_coef <= max_coef:
            raise ValueError(
                f"need 0 <= min_coef <= init_coef <= max_coef, got "
                f"{min_coef}, {init_coef}, {max_coef}"
            )
        self.coef = float(init_coef)
        self.target = float(target)
        self.horizon = float(horizon)
        self.min_coef = float(min_coef)
        self.max_coef = float(max_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Moves the coefficient towards the value that would give the target KL.

        Args:
            current_kl: the KL measured on the last batch (the same KL the reward shaping or
                loss used).
            n_steps: how many steps (samples, in Ziegler et al.) that measurement covers.

        Raises:
            ValueError: if ``current_kl`` is not finite or ``n_steps`` is negative.
        """
        current_kl = float(current_kl)
        if current_kl != current_kl or current_kl in (float("inf"), float("-inf")):
            raise ValueError(f"current_kl must be finite, got {current_kl}")
        if n_steps < 0:
            raise ValueError(f"n_steps must be >= 0, got {n_steps}")
        error = min(max(current_kl / self.target - 1.0, -self.ERROR_CLIP), self.ERROR_CLIP)
        coef = self.coef * (1.0 + error * n_steps / self.horizon)
        self.coef = min(max(coef, self.min_coef), self.max_coef)

    def state_dict(self) -> dict[str, Any]:
        """Returns the coefficient, for checkpoints (the rest comes from the config)."""
        return {"coef": self.coef}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the coefficient saved by ``state_dict``, clamped to this controller's bounds."""
        self.coef = min(max(float(state["coef"]), self.min_coef), self.max_coef)


def make_kl_controller(kind: str, **kwargs: Any) -> FixedKLController | AdaptiveKLController:
    """Builds a KL controller by name.

    Args:
        kind: ``"fixed"`` (kwargs: ``coef``) or ``"adaptive"`` (kwargs: ``init_coef``,
            ``target``, ``horizon``, optional ``min_coef``, ``max_coef``).
        **kwargs: passed to the controller's constructor.

    Raises:
        ValueError: for an unknown kind.
    """
    if kind == "fixed":
        return FixedKLController(**kwargs)
    if kind == "adaptive":
        return AdaptiveKLController(**kwargs)
    raise ValueError(f"unknown KL controller kind {kind!r}; expected 'fixed' or 'adaptive'")
