"""Reward functions and reward models.

A reward is chosen by `scorer.reward`:

- a builtin name: `vader` (VADER compound sentiment of the response, in [-1, 1]; the default task's
  "steer towards positive continuations" reward) or `letter-e` (share of letters in the response
  that are "e"; a fast, learnable signal for the tiny test preset);
- `module:function`, any importable Python callable `f(prompt: str, response: str) -> float`.
  This imports and runs that code inside the scorer actors: only name code you trust;
- `model:PATH`, an HF sequence-classification reward model folder (score = logit 0).

Functions see the decoded prompt and response without pad or special-token text. The scorer calls
them one at a time on a helper thread, and a call that takes longer than `scorer.reward_timeout_s`
quarantines its sample (with 0, they run in the scorer's own thread without a limit); reward
models run without a timeout.
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch

RewardFn = Callable[[str, str], float]


def vader_reward() -> RewardFn:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()

    def vader(prompt: str, response: str) -> float:
        return float(analyzer.polarity_scores(response)["compound"])

    return vader


def letter_e_reward(prompt: str, response: str) -> float:
    letters = [c for c in response.lower() if c.isalpha()]
    return sum(c == "e" for c in letters) / len(letters) if letters else 0.0


BUILTIN_REWARDS: dict[str, Callable[[], RewardFn]] = {
    "vader": vader_reward,
    "letter-e": lambda: letter_e_reward,
}


def load_callable(spec: str) -> RewardFn:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"scorer.reward={spec!r}: expected 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"scorer.reward={spec!r}: cannot import {module_name!r}: {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"scorer.reward={spec!r}: {module_name}.{attr} is not a callable")
    return fn


class RewardModel:
    """An HF sequence-classification model; the score is read at the last real token.

    The scored position is the last attention-mask-1 token found from the mask, never from pad
    ids (with pad == EOS, HF's own lookup stops at the first EOS inside the prompt). Encoder
    models without a `score` head (BERT-style, pooled at the first token) run as they are.
    """

    def __init__(self, path: str, *, trust_remote_code: bool = False, max_length: int = 512):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, trust_remote_code=trust_remote_code
        )
        self.model.eval().requires_grad_(False)
        self.pad_id = self.tokenizer.pad_token_id or self.tokenizer.eos_token_id or 0
        self.max_length = max_length

    @torch.no_grad()
    def score_ids(self, sequences: list[list[int]], padding_side: str = "right") -> list[float]:
        return score_sequences(self.model, sequences, self.pad_id, padding_side)

    def score_texts(self, prompts: list[str], responses: list[str]) -> list[float]:
        sequences = [
            self.tokenizer(p + r, truncation=True, max_length=self.max_length)["input_ids"]
            for p, r in zip(prompts, responses)
        ]
        return self.score_ids(sequences)


@torch.no_grad()
def score_sequences(model, sequences: list[list[int]], pad_id: int, padding_side: str) -> list[float]:
    """Reward-model score of each token sequence, padded on `padding_side` into one batch."""
    from rlhf_ray.models.forward import pad_batch

    ids, mask = pad_batch(sequences, pad_id, padding_side)
    width = ids.shape[1]
    head = getattr(model, "score", None)
    if head is None:
        return model(input_ids=ids, attention_mask=mask).logits[:, 0].float().tolist()
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = model.base_model(
        input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    # last real token of each row, from the mask: the highest index whose mask is 1
    last = (mask * torch.arange(width)).argmax(-1)
    pooled = hidden[torch.arange(len(sequences)), last]
    return head(pooled)[:, 0].float().tolist()


def make_reward(spec: str, *, trust_remote_code: bool = False):
    """Returns ("fn", RewardFn) or ("model", RewardModel) for a `scorer.reward` value."""
    if spec in BUILTIN_REWARDS:
        return "fn", BUILTIN_REWARDS[spec]()
    if spec.startswith("model:"):
        return "model", RewardModel(spec[len("model:") :], trust_remote_code=trust_remote_code)
    if ":" in spec:
        return "fn", load_callable(spec)
    raise ValueError(
        f"scorer.reward={spec!r}: not a builtin ({', '.join(BUILTIN_REWARDS)}), "
        "a 'module:function' or a 'model:PATH'"
    )
