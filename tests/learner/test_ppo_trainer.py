"""The PPO learner on real tiny models (cases C2, C4, C10, C11, C12, C16)."""

import torch

from rlhf_ray.algorithms.kl import exact_kl
from rlhf_ray.learner.ppo import Batch, PPOTrainer
from rlhf_ray.models.forward import pack, response_logprobs
from rlhf_ray.models.loading import reference_mode
from rlhf_ray.types import experience_table
from tests.conftest import make_rows, tiny_config


def _rows_from_policy(trainer, prompts, responses, **cols):
    """Rows whose behavior log-probs are the trainer's own (one left-padded batch)."""
    batch = pack(prompts, responses, trainer.pad_id, padding_side="left")
    lp = response_logprobs(trainer.policy.model, batch).logprobs.detach()
    behavior = [lp[i, : len(r)].tolist() for i, r in enumerate(responses)]
    return make_rows(prompts, responses, behavior, **cols)


def _gpt2_prompts():
    prompts = [[7 + j for j in range(n)] for n in range(2, 13, 2)]  # 6 prompts, lengths 2..12
    responses = [[300 + 11 * i + j for j in range(8)] for i in range(6)]
    return prompts, responses


def test_lr0_step_in_micro_batches_has_zero_log_ratio_and_no_clipping():
    cfg = tiny_config("learner.lr=1e-12", "learner.batch_size=6", "learner.micro_batch_size=2",
                      "algorithm.ratio_anchor=behavior", "algorithm.kl_mode=none",
                      model="tiny-gpt2")
    trainer = PPOTrainer(cfg)
    prompts, responses = _gpt2_prompts()
    rows = _rows_from_policy(trainer, prompts, responses,
                             group_advantage=[1.0, -1.0, 0.5, -0.5, 2.0, -2.0])
    metrics = trainer.train_on(experience_table(rows))
    assert metrics["policy/clipfrac"] == 0.0
    assert abs(metrics["policy/ratio_mean"] - 1.0) < 1e-5
    assert abs(metrics["policy/approx_kl"]) < 1e-5


def _perturb_adapter(trainer, scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in trainer.policy.model.named_parameters():
            if "lora_B" in name and p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def _exact_kl(trainer, prompts, responses):
    batch = pack(prompts, responses, trainer.pad_id)
    model = trainer.policy.model
    with torch.no_grad():
        pol = response_logprobs(model, batch, with_logits=True).logits
        with reference_mode(model):
            ref = response_logprobs(model, batch, with_logits=True).logits
    return float(exact_kl(pol, ref, batch.response_mask).sum() / batch.response_mask.sum())


def test_kl_term_step_lowers_the_exact_kl_to_the_reference():
    for mode, estimator in (("loss", "k3"), ("loss", "k2"), ("reward", "k1")):
        cfg = tiny_config("algorithm.kl_coef=1.0", f"algorithm.kl_mode={mode}",
                          f"algorithm.kl_estimator={estimator}", "learner.batch_size=6",
                          "learner.max_grad_norm=0")
        trainer = PPOTrainer(cfg)
        _perturb_adapter(trainer, 0.35)
        prompts, responses = _gpt2_prompts()
        before = _exact_kl(trainer, prompts, responses)
        assert 0.01 < before < 0.2, before
        ref = trainer.logprobs_of(experience_table(make_rows(prompts, responses,
                                  [[0.0] * 8] * 6)), reference=True)
        rows = _rows_from_policy(trainer, prompts, responses, group_advantage=0.0)
        for i, row in enumerate(rows):
            row["ref_logprobs"] = ref[i, :8].tolist()
        trainer.optimizer = torch.optim.SGD(trainer.policy.trainable_parameters(), lr=1e-2)
        trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda s: 1.0)
        trainer.train_on(experience_table(rows))
        after = _exact_kl(trainer, prompts, responses)
        assert after < before, (mode, estimator, before, after)


def test_empty_and_eos_only_responses_give_finite_loss_and_gradients():
    cfg = tiny_config("learner.batch_size=4", "learner.micro_batch_size=2",
                      "algorithm.kl_mode=loss", "algorithm.kl_estimator=k3",
                      "algorithm.entropy_coef=0.01")
    trainer = PPOTrainer(cfg)
    eos = trainer.pad_id
    prompts = [[5, 6], [7], [8, 9], [10]]
    responses = [[], [], [eos], [11, 12]]  # first micro-batch is all-empty
    rows = make_rows(prompts, responses, [[-1.0] * len(r) for r in responses],
                     group_advantage=[1.0, -1.0, 1.0, -1.0])
    grads = []
    original_step = trainer.optimizer.step

    def capture():
        grads.extend(p.grad.clone() for p in trainer.policy.trainable_parameters()
                     if p.grad is not None)
        original_step()

    trainer.optimizer.step = capture
    metrics = trainer.train_on(experience_table(rows))
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values()
               if isinstance(v, float))
    assert metrics["learner/skipped_updates"] == 0
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_reference_is_frozen_and_kl_starts_at_exactly_zero(tmp_path):
    for adapter in (None, "saved"):
        overrides = ["learner.lr=1e-3", "learner.batch_size=6"]
        if adapter:
            donor = PPOTrainer(tiny_config())
            _perturb_adapter(donor, 0.3, seed=1)
            donor.policy.model.save_pretrained(tmp_path / "start")
            overrides.append(f"model.adapter_path={tmp_path / 'start'}")
        trainer = PPOTrainer(tiny_config(*overrides))
        model = trainer.policy.model
        opt_params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
        for name, p in model.named_parameters():
            if "lora_" not in name or ".reference" in name:
                assert not p.requires_grad, name
                assert id(p) not in opt_params, name
        prompts, responses = _gpt2_prompts()
        table = experience_table(make_rows(prompts, responses, [[0.0] * 8] * 6))
        ref0 = trainer.logprobs_of(table, reference=True)
        assert torch.equal(trainer.logprobs_of(table), ref0)  # KL exactly 0 at step 0
        rows = _rows_from_policy(trainer, prompts, responses,
                                 group_advantage=[1.0, -1.0, 0.5, -0.5, 2.0, -2.0])
        for _ in range(5):
            trainer.train_on(experience_table(rows))
        assert torch.equal(trainer.logprobs_of(table, reference=True), ref0)
        assert not torch.equal(trainer.logprobs_of(table), ref0)


def _grads_for_micro_batch(micro):
    cfg = tiny_config("learner.lr=1e-12", "learner.batch_size=4",
                      f"learner.micro_batch_size={micro}", "algorithm.kl_mode=none",
                      "learner.max_grad_norm=0", "algorithm.ratio_anchor=behavior")
    trainer = PPOTrainer(cfg)
    _perturb_adapter(trainer, 0.1)
    lengths = [1, 3, 7, 20]
    prompts = [[5, 6, 7]] * 4
    responses = [[40 + i + j for j in range(n)] for i, n in enumerate(lengths)]
    rows = _rows_from_policy(trainer, prompts, responses, group_advantage=[1.0, 2.0, 3.0, 4.0])
    captured = []
    trainer.optimizer.step = lambda: captured.append(
        [p.grad.clone() for p in trainer.policy.trainable_parameters()])
    trainer._shuffle = torch.Generator().manual_seed(0)
    trainer.train_on(experience_table(rows))
    return captured[0]


def test_gradients_do_not_depend_on_the_micro_batch_split():
    g1, g2, g4 = (_grads_for_micro_batch(m) for m in (1, 2, 4))
    for a, b, c in zip(g1, g2, g4):
        assert torch.allclose(a, b, atol=1e-6) and torch.allclose(a, c, atol=1e-6)


def test_ratio_anchor_decides_the_clip_fraction():
    prompts, responses = _gpt2_prompts()
    for anchor, expected in (("behavior", 1.0), ("proximal", 0.0)):
        cfg = tiny_config("learner.batch_size=6", "algorithm.kl_mode=none",
                          f"algorithm.ratio_anchor={anchor}", "algorithm.clip_eps=0.2",
                          "algorithm.is_cap=2.0")
        trainer = PPOTrainer(cfg)
        rows = _rows_from_policy(trainer, prompts, responses, group_advantage=1.0)
        for row in rows:  # the generator's policy put 0.3 less log-prob on every token
            row["behavior_logprobs"] = [x - 0.3 for x in row["behavior_logprobs"]]
        metrics = trainer.train_on(experience_table(rows))
        assert abs(metrics["policy/clipfrac"] - expected) < 1e-6, anchor
        if anchor == "proximal":
            assert abs(metrics["policy/is_weight_mean"] - torch.exp(torch.tensor(0.3))) < 1e-4


def test_batch_masks_come_from_lengths():
    rows = make_rows([[1], [1]], [[5, 7, 2], [5, 7, 8, 8, 8]], [[0.0] * 3, [0.0] * 5])
    batch = Batch.from_table(experience_table(rows))
    assert batch.mask[0].tolist() == [1, 1, 1, 0, 0]


def test_gae_trains_the_value_head_and_several_epochs_use_the_proximal_pass():
    cfg = tiny_config("algorithm.advantage=gae", "learner.batch_size=6", "learner.ppo_epochs=2",
                      "learner.num_minibatches=2", "learner.micro_batch_size=2",
                      "algorithm.kl_controller=adaptive", "algorithm.kl_target=0.01",
                      "learner.lr_schedule=cosine", "learner.warmup_steps=1")
    trainer = PPOTrainer(cfg)
    assert trainer.policy.value_head is not None
    prompts, responses = _gpt2_prompts()
    rows = _rows_from_policy(trainer, prompts, responses, reward=[1.0, 0.0, 1.0, 0.0, 0.5, 0.2],
                             finish_reason=["stop", "length"] * 3)
    head_before = trainer.policy.value_head.proj.weight.clone()
    metrics = trainer.train_on(experience_table(rows))
    assert metrics["policy/value_loss"] > 0
    assert not torch.equal(trainer.policy.value_head.proj.weight, head_before)
    # 2 epochs x 2 minibatches: the later optimizer steps see a ratio that moved off 1
    assert metrics["policy/approx_kl"] > 0
    assert metrics["learner/skipped_updates"] == 0
    assert 0 < metrics["learner/lr"] <= cfg.learner.lr


def test_a_nan_batch_skips_the_update_and_keeps_weights_finite():
    cfg = tiny_config("learner.batch_size=6")
    trainer = PPOTrainer(cfg)
    prompts, responses = _gpt2_prompts()
    rows = _rows_from_policy(trainer, prompts, responses, group_advantage=1.0)
    rows[0]["ref_logprobs"] = [float("nan")] * 8  # poisons the KL shaping of one row
    before = [p.clone() for p in trainer.policy.trainable_parameters()]
    metrics = trainer.train_on(experience_table(rows))
    assert metrics["learner/skipped_updates"] == 1
    after = trainer.policy.trainable_parameters()
    assert all(torch.equal(a, b) for a, b in zip(before, after))
