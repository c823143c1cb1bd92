"""Prioritized replay in the learner: importance weights scale the loss, priorities go back."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from rlhf_ray.learner.ppo import PPOTrainer
from rlhf_ray.types import experience_table
from tests.conftest import make_rows, tiny_config
from tests.learner.test_ppo_trainer import _perturb_adapter, _rows_from_policy

PROMPTS = [[5, 6, 7]] * 4
RESPONSES = [[40 + i + j for j in range(n)] for i, n in enumerate([2, 3, 5, 4])]


def _grads(weights=None, advantages=(1.0, -2.0, 3.0, 0.5)):
    cfg = tiny_config("learner.lr=1e-12", "learner.batch_size=4", "learner.micro_batch_size=2",
                      "algorithm.kl_mode=none", "learner.max_grad_norm=0",
                      "algorithm.ratio_anchor=behavior")
    trainer = PPOTrainer(cfg)
    _perturb_adapter(trainer, 0.1)
    rows = _rows_from_policy(trainer, PROMPTS, RESPONSES, group_advantage=list(advantages))
    table = experience_table(rows)
    if weights is not None:
        table = table.append_column("is_weight", pa.array(weights, type=pa.float64()))
    captured = []
    trainer.optimizer.step = lambda: captured.append(
        [p.grad.clone() for p in trainer.policy.trainable_parameters()])
    trainer.train_on(table)
    return captured[0], trainer


def test_importance_weights_scale_each_rows_loss():
    base, _ = _grads()
    half, _ = _grads([0.5] * 4)
    for a, b in zip(base, half):
        torch.testing.assert_close(b, 0.5 * a, atol=1e-7, rtol=1e-5)
    # a zero weight removes the row as a zero advantage would
    dropped, _ = _grads([1.0, 0.0, 1.0, 1.0])
    no_signal, _ = _grads(advantages=(1.0, 0.0, 3.0, 0.5))
    for a, b in zip(dropped, no_signal):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)
    assert any(not torch.allclose(a, b) for a, b in zip(base, dropped))


def test_row_priorities_are_advantage_size_discounted_by_drift():
    _, trainer = _grads(advantages=(1.0, -2.0, 3.0, 0.0))
    pri = np.array(trainer.row_priorities)
    # behavior log-probs are the policy's own: no drift, priority = |advantage|
    np.testing.assert_allclose(pri, [1.0, 2.0, 3.0, 0.0], atol=1e-5)

    cfg = tiny_config("learner.batch_size=2", "algorithm.kl_mode=none",
                      "algorithm.ratio_anchor=behavior")
    trainer = PPOTrainer(cfg)
    rows = _rows_from_policy(trainer, PROMPTS[:2], RESPONSES[:2], group_advantage=[1.0, 1.0])
    for r in rows[1:]:  # row 1 was sampled by a policy 0.3 nats away on every token
        r["behavior_logprobs"] = [b - 0.3 for b in r["behavior_logprobs"]]
    trainer.train_on(experience_table(rows))
    assert trainer.row_priorities[0] > 0.99
    assert abs(trainer.row_priorities[1] - np.exp(-0.3)) < 1e-3


def test_learner_step_sends_priorities_back_to_the_shards(ray_cluster):
    """A real Learner (tiny model) on real prioritized shards: sampled rows get the trainer's
    new priorities, the others keep theirs; the metrics report the weights."""
    import ray

    from rlhf_ray.driver import start_shards
    from rlhf_ray.learner.learner import Learner

    cfg = tiny_config("learner.batch_size=4", "learner.micro_batch_size=4",
                      "replay.sampler=prioritized", "replay.max_times_sampled=4",
                      "replay.max_staleness=4", "replay.num_shards=2")
    shards = start_shards(cfg, "online", None)
    try:
        learner = Learner(cfg, shards, weight_store=None)
        prompts = [[5, 6, 7]] * 8
        responses = [[40 + i, 41 + i] for i in range(8)]
        rows = make_rows(prompts, responses, [[-1.0, -1.0]] * 8,
                         group_advantage=[0.5 * (i + 1) for i in range(8)],
                         priority=[0.5 * (i + 1) for i in range(8)])
        for i, r in enumerate(rows):
            r["uid"] = f"p{i}/0/0"
        learner.replay.insert(experience_table(rows))
        metrics = learner.step()
        assert 0 < metrics["replay/effective_sample_size"] <= 1
        assert metrics["replay/priority_beta"] == cfg.replay.priority_beta
        assert metrics["replay/batch_times_sampled_mean"] == 1.0
        stored = learner.replay.export()
        sampled = stored.filter(pa.compute.equal(stored.column("times_sampled"), 1))
        assert sampled.num_rows == 4
        # the trainer's new priorities were written for exactly the sampled rows
        expected = dict(zip(learner._last_uids, learner.trainer.row_priorities))
        for uid, pri, ts in zip(*(stored.column(c).to_pylist()
                                  for c in ("uid", "priority", "times_sampled"))):
            i = int(uid[1:].split("/")[0])
            if ts:
                assert abs(pri - expected[uid]) < 1e-9
            else:
                assert pri == 0.5 * (i + 1)
    finally:
        for s in shards:
            ray.kill(s)


def test_reward_kl_of_stale_rows_is_taken_at_the_drawing_policy():
    """Rows from an old version whose behavior log-probs are 0.3 below the (unchanged) policy:
    the KL penalty uses the policy as drawn (KL 0 to the reference here), not the stale
    behavior log-probs (which would give -0.3 per token); fresh rows keep the behavior KL."""
    cfg = tiny_config("learner.batch_size=2", "learner.lr=1e-12",
                      "algorithm.kl_mode=reward", "algorithm.kl_estimator=k1")
    results = {}
    for version in (0, 3):
        trainer = PPOTrainer(cfg)
        trainer.version = 3  # the learner is at version 3
        rows = _rows_from_policy(trainer, PROMPTS[:2], RESPONSES[:2], group_advantage=[1.0, -1.0],
                                 policy_version=version)
        for r in rows:
            r["ref_logprobs"] = list(r["behavior_logprobs"])  # zero-init LoRA: policy == ref
            r["behavior_logprobs"] = [b - 0.3 for b in r["behavior_logprobs"]]
        results[version] = trainer.train_on(experience_table(rows))["policy/kl_ref"]
    tokens = (len(RESPONSES[0]) + len(RESPONSES[1])) / 2
    assert abs(results[0]) < 1e-4
    assert abs(results[3] - (-0.3 * tokens)) < 1e-4
