"""The generation backend interface that every backend (HF generate, vLLM) implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off


@dataclass
class Completion:
    """One sampled response to one prompt."""

    response_ids: list[int]  # up to and including the first stop token, nothing after it
    behavior_logprobs: list[float]  # [T] log-probs of the processed distribution sampled from
    finish_reason: str  # "stop" (ended with a stop token) | "length" (hit max_new_tokens)


class GenerationBackend(Protocol):
    """Samples n completions per prompt and serves one LoRA version at a time."""

    def generate(
        self, prompt_ids: list[list[int]], n: int, params: SamplingParams, seed: int
    ) -> list[list[Completion]]:
        """Returns, per prompt, its n completions. Deterministic for a given seed on CPU."""
        ...

    def load_adapter(self, state: dict[str, torch.Tensor], version: int) -> None:
        """Switches to adapter `version`; called only between generate calls."""
        ...

    @property
    def version(self) -> int: ...
