"""Behavior log-probs, seeds and the prompt-length rule of the generator (cases C1, C17)."""

import math

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper

from rlhf_ray.generation.generator import Generator
from rlhf_ray.generation.hf_backend import sampled_logprobs
from rlhf_ray.learner.ppo import PPOTrainer
from rlhf_ray.types import Prompt, PromptBatch, experience_table, rollout_to_row
from tests.conftest import tiny_config


def test_behavior_logprob_is_of_the_temperature_scaled_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    processed = TemperatureLogitsWarper(0.5)(torch.zeros(1, 1, dtype=torch.long), logits)
    lp = sampled_logprobs((processed,), torch.tensor([[0]]))
    assert lp.item() == pytest.approx(-0.142932, abs=1e-6)
    assert not math.isclose(lp.item(), -0.407606, abs_tol=1e-3)  # raw
    assert not math.isclose(lp.item(), -0.815212, abs_tol=1e-3)  # raw / T


@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.0])
def test_learner_recomputes_the_generators_behavior_logprobs(temperature):
    cfg = tiny_config(f"generator.temperature={temperature}", "generator.max_new_tokens=16",
                      "generator.n_samples=2")
    gen = Generator(cfg)
    prompts = [Prompt(f"q{i}", t) for i, t in enumerate(
        ["hello there", "the movie was", "a b c d e f", "Count one two and"])]
    batch = gen.generate(PromptBatch(prompts, n_samples=2))
    assert len(batch.rollouts) == 8
    rows = [rollout_to_row(r, reward=0.0, ref_logprobs=r.behavior_logprobs)
            for r in batch.rollouts]
    table = experience_table(rows)
    trainer = PPOTrainer(cfg)
    learner_lp = trainer.logprobs_of(table)
    for i, r in enumerate(batch.rollouts):
        n = len(r.response_ids)
        assert n > 0
        assert torch.allclose(learner_lp[i, :n], torch.tensor(r.behavior_logprobs), atol=1e-5)


def _responses(gen, prompt="the movie was"):
    out = gen.generate(PromptBatch([Prompt("same", prompt)], n_samples=4))
    return [tuple(r.response_ids) for r in out.rollouts]


def test_two_generators_differ_and_a_rerun_reproduces_them():
    cfg = tiny_config("generator.temperature=1.0")
    a, b = Generator(cfg, generator_id=0), Generator(cfg, generator_id=1)
    ra, rb = _responses(a), _responses(b)
    assert len(set(ra + rb)) > 1
    assert a.seeds != b.seeds
    again = _responses(Generator(cfg, generator_id=0))
    assert again == ra


def test_long_prompts_are_truncated_or_dropped_and_counted():
    long_text = " ".join(["word"] * 200)
    prompts = [Prompt("long", long_text), Prompt("ok", "short one"), Prompt("empty", "  ")]
    cfg = tiny_config("data.max_prompt_tokens=16", "data.prompt_overflow=truncate")
    out = Generator(cfg).generate(PromptBatch(prompts, n_samples=2))
    assert out.stats["rollout/prompts_truncated"] == 1
    assert out.stats["rollout/prompts_dropped"] == 1  # the empty one
    assert all(len(r.prompt_ids) <= 16 for r in out.rollouts)
    assert {r.prompt_uid for r in out.rollouts} == {"long", "ok"}

    cfg = tiny_config("data.max_prompt_tokens=16", "data.prompt_overflow=drop")
    out = Generator(cfg).generate(PromptBatch(prompts, n_samples=2))
    assert out.stats["rollout/prompts_dropped"] == 2
    assert {r.prompt_uid for r in out.rollouts} == {"ok"}


def test_rows_carry_uid_group_and_finish_reason():
    cfg = tiny_config("generator.max_new_tokens=5")
    out = Generator(cfg).generate(PromptBatch([Prompt("u1", "hello")], n_samples=3))
    assert [r.uid for r in out.rollouts] == ["u1/0/0", "u1/1/0", "u1/2/0"]
    assert len({r.group_id for r in out.rollouts}) == 1
    for r in out.rollouts:
        assert r.finish_reason in ("stop", "length")
        assert len(r.behavior_logprobs) == len(r.response_ids)
        if r.finish_reason == "length":
            assert len(r.response_ids) == 5
