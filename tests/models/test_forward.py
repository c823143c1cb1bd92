"""Padding, position ids and determinism of the one forward pass (cases C2, C3, C9)."""

import torch

from rlhf_ray.models.forward import pack, response_logprobs
from rlhf_ray.models.loading import attach_lora, load_base_model
from tests.conftest import tiny_config


def _model(name):
    cfg = tiny_config(model=name)
    return attach_lora(load_base_model(cfg.model), cfg.model)


def test_left_padded_row_gets_positions_from_the_mask():
    batch = pack([[11, 12, 13], [21, 22, 23, 24, 25]], [[], []], pad_id=0, padding_side="left")
    # row 0 is [PAD, PAD, a, b, c]: its real tokens get positions 0, 1, 2
    assert batch.attention_mask[0].tolist() == [0, 0, 1, 1, 1]
    assert batch.position_ids[0, 2:].tolist() == [0, 1, 2]
    assert batch.position_ids[1].tolist() == [0, 1, 2, 3, 4]


def test_padded_sequence_logprobs_equal_the_sequence_alone_gpt2():
    model = _model("tiny-gpt2")
    prompts = [[5 + i for i in range(n)] for n in range(2, 13, 2)]  # lengths 2..12
    responses = [[100 + j for j in range(8)] for _ in prompts]
    for side in ("left", "right"):
        together = response_logprobs(model, pack(prompts, responses, 2, side)).logprobs
        for i, (p, r) in enumerate(zip(prompts, responses)):
            alone = response_logprobs(model, pack([p], [r], 2)).logprobs
            assert torch.allclose(together[i], alone[0], atol=1e-5), (side, i)


def test_dropout_config_gives_bit_identical_logprob_passes():
    model = _model("tiny-llama-dropout")
    assert model.config.attention_dropout == 0.1
    batch = pack([[5, 6, 7], [8, 9]], [[10, 11, 12], [13]], pad_id=2)
    a = response_logprobs(model, batch).logprobs
    b = response_logprobs(model, batch).logprobs
    assert torch.equal(a, b)


def test_pad_equal_eos_mask_comes_from_lengths_and_keeps_the_eos_token():
    # pad id == EOS id == 2; the response [5, 7, 2] padded to [5, 7, 2, 2, 2] beside a longer row
    batch = pack([[9, 9], [9, 9]], [[5, 7, 2], [5, 7, 8, 8, 8]], pad_id=2)
    assert batch.response_ids[0].tolist() == [5, 7, 2, 0, 0]
    assert batch.response_mask[0].tolist() == [1, 1, 1, 0, 0]
    assert int(batch.response_lens[0]) == 3
    model = _model("tiny-llama")
    lp = response_logprobs(model, batch).logprobs
    assert lp[0, 2] != 0  # the EOS log-prob is part of the response (and of the loss)
    assert torch.all(lp[0, 3:] == 0)


def test_empty_response_packs_and_gives_zero_logprobs():
    model = _model("tiny-llama")
    batch = pack([[5, 6], [7]], [[], [3]], pad_id=2)
    out = response_logprobs(model, batch)
    assert out.logprobs.shape == (2, 1)
    assert out.logprobs[0, 0] == 0 and torch.isfinite(out.logprobs).all()
