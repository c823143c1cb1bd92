"""Reward functions, quarantine, group rule and reward-model position (cases C8, C18 part)."""

import math

import pytest
import torch

from rlhf_ray.scoring.rewards import letter_e_reward, make_reward, score_sequences
from rlhf_ray.scoring.scorer import RewardScorer
from rlhf_ray.types import Rollout, RolloutBatch
from tests.conftest import tiny_config

CALLS = {"n": 0}


def flaky_reward(prompt, response):
    """Raises on one response of each batch, NaN on another, a string on a third."""
    CALLS["n"] += 1
    if "boom" in response:
        raise RuntimeError("reward server down")
    if "nan" in response:
        return float("nan")
    if "str" in response:
        return "high"
    return float(len(response))


def _rollouts(texts, group_of):
    out = []
    for i, text in enumerate(texts):
        out.append(Rollout(
            uid=f"{group_of[i]}/{i}/0", prompt_uid=group_of[i], group_id=f"{group_of[i]}/0",
            prompt_text="p", response_text=text, prompt_ids=[5, 6], response_ids=[7, 8, 9],
            behavior_logprobs=[-1.0, -1.0, -1.0], finish_reason="length", policy_version=0))
    return RolloutBatch(out)


def test_failed_rewards_are_quarantined_and_small_groups_dropped():
    cfg = tiny_config("scorer.reward=tests.scoring.test_scorer:flaky_reward")
    scorer = RewardScorer(cfg)
    texts = ["aa", "boom", "aaaa", "nan",  # group a: 2 survivors -> kept
             "str", "bbb",  # group b: 1 survivor -> dropped
             "c", "cc"]  # group c: kept
    groups = ["a", "a", "a", "a", "b", "b", "c", "c"]
    report, table = scorer.score(_rollouts(texts, groups), return_table=True)
    assert report.quarantined == 3
    assert {q["prompt_uid"] for q in report.quarantine} == {"a", "b"}
    assert any("RuntimeError" in q["reason"] for q in report.quarantine)
    assert report.stats["reward/groups_dropped"] == 1
    assert sorted(table.column("response_text").to_pylist()) == ["aa", "aaaa", "c", "cc"]
    assert all(math.isfinite(r) for r in table.column("reward").to_pylist())
    adv = dict(zip(table.column("response_text").to_pylist(),
                   table.column("group_advantage").to_pylist()))
    assert adv["aa"] == pytest.approx(-1.0, abs=1e-5) and adv["aaaa"] == pytest.approx(1.0, abs=1e-5)
    assert len(table.column("ref_logprobs")[0].as_py()) == 3


def test_builtin_rewards():
    kind, vader = make_reward("vader")
    assert kind == "fn"
    assert vader("", "what a wonderful, great film") > 0.5
    assert vader("", "a terrible, awful mess") < -0.5
    assert letter_e_reward("", "eee aa") == pytest.approx(0.6)
    with pytest.raises(ValueError, match="scorer.reward"):
        make_reward("no-such-reward")
    with pytest.raises(ValueError, match="cannot import"):
        make_reward("no_such_module_xyz:f")


def test_reward_model_scores_the_last_real_token_whatever_the_padding():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                         pad_token_id=2, eos_token_id=2, num_labels=1)
    model = LlamaForSequenceClassification(config).eval()
    seqs = [[5, 2, 9, 11, 2], [7, 8, 2, 2, 6, 13, 14, 2], [3, 4]]  # pad id inside prompts
    alone = [score_sequences(model, [s], 2, "right")[0] for s in seqs]
    right = score_sequences(model, seqs, 2, "right")
    left = score_sequences(model, seqs, 2, "left")
    assert right == pytest.approx(alone, abs=1e-5)
    assert left == pytest.approx(alone, abs=1e-5)


def test_a_reward_model_folder_scores_rollouts(tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from rlhf_ray.models.builtin import ensure_builtin

    tok = AutoTokenizer.from_pretrained(ensure_builtin("tiny-llama"))
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                         num_attention_heads=2, num_key_value_heads=1, vocab_size=len(tok),
                         pad_token_id=tok.pad_token_id, num_labels=1)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    scorer = RewardScorer(tiny_config(f"scorer.reward=model:{tmp_path / 'rm'}"))
    report, table = scorer.score(_rollouts(["good", "bad", "fine", "ok"], ["a", "a", "b", "b"]),
                                 return_table=True)
    assert report.inserted == 0 and report.quarantined == 0 and len(table) == 4
    rewards = table.column("reward").to_pylist()
    assert len(set(rewards)) > 1 and all(math.isfinite(r) for r in rewards)
