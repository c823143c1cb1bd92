"""One padded forward pass over (prompt, response) pairs, and the per-token log-probs it yields.

Padding exists only here. Masks come from lengths (never from comparing ids with the pad id, which
breaks when pad == EOS), and `position_ids` count real tokens only, so a left-padded row
`[PAD, PAD, a, b, c]` gives `a, b, c` positions 0, 1, 2 and its log-probs equal those of the row run
alone (this matters for absolute-position models such as GPT-2).

The LM head is applied only at the positions that predict response tokens: prompt logits are never
materialised. This assumes the head is a plain linear projection of the last hidden state
(true for Llama, GPT-2, Qwen, Mistral; models that scale or soft-cap logits after the head are not
supported by this function).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L], 1 = real token
    position_ids: torch.Tensor  # [B, L]
    response_ids: torch.Tensor  # [B, T], 0 beyond each row's length
    response_mask: torch.Tensor  # [B, T] float, 1 = real response token
    # Index into L of the hidden state that predicts response token k: prompt_start + p - 1 + k.
    # Column T (one extra) is the state after the last token, for value bootstrapping.
    state_index: torch.Tensor  # [B, T + 1]
    response_lens: torch.Tensor  # [B]

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def pad_batch(
    sequences: list[list[int]], pad_id: int, padding_side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pads token lists into `input_ids` [B, L] and an `attention_mask` [B, L] from lengths."""
    width = max([len(s) for s in sequences] + [0])
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        start = 0 if padding_side == "right" else width - len(seq)
        input_ids[i, start : start + len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[i, start : start + len(seq)] = 1
    return input_ids, attention_mask


def pack(
    prompts: list[list[int]],
    responses: list[list[int]],
    pad_id: int,
    padding_side: str = "right",
) -> PackedBatch:
    """Pads B (prompt, response) token lists into one batch; every prompt needs >= 1 token."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (nothing predicts the first one)")
    b = len(prompts)
    seq_lens = [len(p) + len(r) for p, r in zip(prompts, responses)]
    length = max(seq_lens)
    t = max([len(r) for r in responses] + [0])
    input_ids, attention_mask = pad_batch(
        [list(p) + list(r) for p, r in zip(prompts, responses)], pad_id, padding_side
    )
    response_ids = torch.zeros((b, t), dtype=torch.long)
    response_mask = torch.zeros((b, t), dtype=torch.float32)
    state_index = torch.zeros((b, t + 1), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        start = 0 if padding_side == "right" else length - seq_lens[i]
        if r:
            response_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            response_mask[i, : len(r)] = 1.0
        # States p-1 .. p-1+len(r); beyond the row's end, repeat its last state (masked anyway).
        idx = start + len(p) - 1 + torch.arange(t + 1)
        state_index[i] = idx.clamp(max=start + seq_lens[i] - 1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return PackedBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        response_ids=response_ids,
        response_mask=response_mask,
        state_index=state_index,
        response_lens=torch.tensor([len(r) for r in responses], dtype=torch.long),
    )


def _causal_lm(model):
    """The HF causal LM inside a peft wrapper (LoRA layers are injected into its modules)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def forward_states(model, batch: PackedBatch) -> torch.Tensor:
    """Last hidden states at `state_index`: [B, T + 1, H]."""
    lm = _causal_lm(model)
    backbone = lm.base_model  # LlamaModel, GPT2Model, ... (via base_model_prefix)
    out = backbone(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    )
    hidden = out.last_hidden_state
    index = batch.state_index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    return hidden.gather(1, index)


@dataclass
class ForwardOut:
    logprobs: torch.Tensor  # [B, T], 0 at pads
    logits: torch.Tensor | None = None  # [B, T, V] temperature-scaled, when asked for
    values: torch.Tensor | None = None  # [B, T + 1] when a value head is given
    entropy: torch.Tensor | None = None  # [B, T] when asked for
    states: torch.Tensor | None = None  # [B, T + 1, H] last hidden states, when asked for


def response_logprobs(
    model,
    batch: PackedBatch,
    *,
    temperature: float = 1.0,
    value_head=None,
    with_entropy: bool = False,
    with_logits: bool = False,
    with_states: bool = False,
) -> ForwardOut:
    """Per-token log-probs of the response under softmax(logits / temperature).

    This is the distribution the generator samples from (no top-p/top-k), so these log-probs are
    comparable with the generator's `behavior_logprobs`.
    """
    states = forward_states(model, batch)  # [B, T + 1, H]
    head = _causal_lm(model).get_output_embeddings()
    logits = head(states[:, :-1]).float() / temperature  # [B, T, V]
    logp_all = F.log_softmax(logits, dim=-1)
    logprobs = logp_all.gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)
    logprobs = logprobs * batch.response_mask
    out = ForwardOut(logprobs=logprobs)
    if value_head is not None:
        out.values = value_head(states)
    if with_entropy:
        out.entropy = -(logp_all.exp() * logp_all).sum(-1) * batch.response_mask
    if with_logits:
        out.logits = logits
    if with_states:
        out.states = states
    return out


def chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


@torch.no_grad()
def batched_logprobs(
    model,
    prompts: list[list[int]],
    responses: list[list[int]],
    *,
    pad_id: int,
    temperature: float = 1.0,
    batch_size: int = 16,
) -> list[list[float]]:
    """Unpadded per-token log-probs for many rows, `batch_size` rows per forward pass."""
    result: list[list[float]] = []
    for s in chunks(len(prompts), batch_size):
        batch = pack(prompts[s], responses[s], pad_id)
        lp = response_logprobs(model, batch, temperature=temperature).logprobs
        for i, n in enumerate(batch.response_lens.tolist()):
            result.append(lp[i, :n].tolist())
    return result
