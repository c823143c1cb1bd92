"""Generation with transformers' `generate` on a peft-wrapped policy (the CPU backend).

Behavior log-probs come from the *processed* scores that `generate` samples from (temperature,
and top-p/top-k when set), so `behavior_logprobs[t] = log_softmax(logits_t / T)[token_t]` for plain
temperature sampling. Prompts are left-padded; `generate` derives position ids from the attention
mask. A fresh `GenerationConfig` is built per call so the checkpoint's own sampling defaults
(a top_k=50 in many generation_config.json files) never leak in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf_ray.generation.backend import Completion, SamplingParams
from rlhf_ray.models.forward import pad_batch
from rlhf_ray.models.loading import load_lora_state_dict


def sampled_logprobs(scores: tuple[torch.Tensor, ...], tokens: torch.Tensor) -> torch.Tensor:
    """Log-probs [B, steps] of the sampled `tokens` under the processed `scores` (one [B, V]
    tensor per step, as `generate` returns them), i.e. of the distribution sampled from."""
    if not scores:
        return torch.zeros_like(tokens, dtype=torch.float32)
    stacked = torch.stack(scores, dim=1).float()  # [B, steps, V]
    return F.log_softmax(stacked, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


class HFBackend:
    def __init__(self, model, tokenizer, stop_token_ids: set[int]):
        self.model = model
        self.tokenizer = tokenizer
        self.stop_token_ids = set(stop_token_ids)
        self.pad_id = tokenizer.pad_token_id
        self._version = 0

    @property
    def version(self) -> int:
        return self._version

    def load_adapter(self, state: dict[str, torch.Tensor], version: int) -> None:
        load_lora_state_dict(self.model, state)
        self._version = version

    def _generation_config(self, params: SamplingParams):
        from transformers import GenerationConfig

        return GenerationConfig(
            do_sample=True,
            max_new_tokens=params.max_new_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,  # 0 disables top-k (None would mean the default, 50)
            eos_token_id=sorted(self.stop_token_ids),
            pad_token_id=self.pad_id,
            output_scores=True,
            return_dict_in_generate=True,
            use_cache=True,
        )

    @torch.no_grad()
    def generate(
        self, prompt_ids: list[list[int]], n: int, params: SamplingParams, seed: int
    ) -> list[list[Completion]]:
        if not prompt_ids:
            return []
        rows = [p for p in prompt_ids for _ in range(n)]  # n consecutive samples per prompt
        input_ids, attention_mask = pad_batch(rows, self.pad_id, padding_side="left")
        width = input_ids.shape[1]
        torch.manual_seed(seed)
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=self._generation_config(params),
        )
        new_tokens = out.sequences[:, width:]  # [B*n, steps]
        logprobs = sampled_logprobs(out.scores, new_tokens)
        completions: list[Completion] = []
        for i in range(len(rows)):
            ids = new_tokens[i].tolist()
            end, reason = len(ids), "length"
            for t, tok in enumerate(ids):
                if tok in self.stop_token_ids:
                    end, reason = t + 1, "stop"
                    break
            completions.append(
                Completion(
                    response_ids=ids[:end],
                    behavior_logprobs=logprobs[i, :end].tolist(),
                    finish_reason=reason,
                )
            )
        return [completions[j * n : (j + 1) * n] for j in range(len(prompt_ids))]
