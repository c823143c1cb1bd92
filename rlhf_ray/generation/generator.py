"""The Generator: tokenizes prompts, samples responses through a backend, stamps versions.

Before each request it pulls the newest published adapter from the weight store, so it switches
versions only between requests; every row carries the version its request was admitted under.

Prompt length rule (`data.prompt_overflow`): a prompt longer than `data.max_prompt_tokens`
tokens is either truncated to its last `max_prompt_tokens` tokens (`truncate`, the text nearest
the response is kept) or skipped (`drop`). Empty prompts are always skipped. Each case is counted
in the batch stats (`rollout/prompts_truncated`, `rollout/prompts_dropped`), never raised.
"""

from __future__ import annotations

import hashlib
import time

import torch

from rlhf_ray.config import Config
from rlhf_ray.generation.backend import SamplingParams
from rlhf_ray.types import PromptBatch, Rollout, RolloutBatch, make_uid


def request_seed(base_seed: int, generator_id: int, request_idx: int) -> int:
    """A distinct, reproducible seed per (run seed, generator, request)."""
    digest = hashlib.blake2b(f"{base_seed}/{generator_id}/{request_idx}".encode(), digest_size=4)
    return int.from_bytes(digest.digest(), "little")


def stop_token_ids(tokenizer, model) -> set[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(int(i) for i in gen_eos)
    return ids


class Generator:
    """One generator (runs as a Ray actor in the driver; usable in-process in tests)."""

    def __init__(self, cfg: Config, generator_id: int = 0, weight_store=None):
        torch.set_num_threads(cfg.generator.torch_threads)
        from rlhf_ray.models.loading import attach_lora, load_base_model, load_tokenizer

        self.cfg = cfg
        self.generator_id = generator_id
        self.weight_store = weight_store
        self.tokenizer = load_tokenizer(cfg.model)
        base = load_base_model(cfg.model)
        self.model = attach_lora(base, cfg.model)
        self.model.requires_grad_(False)
        if cfg.generator.backend != "hf":
            raise ValueError(f"generator.backend={cfg.generator.backend!r} is not available")
        from rlhf_ray.generation.hf_backend import HFBackend

        self.backend = HFBackend(self.model, self.tokenizer, stop_token_ids(self.tokenizer, base))
        self.requests = 0
        self.seeds: list[int] = []

    # -- weights ---------------------------------------------------------------------------
    def _pull_weights(self) -> None:
        if self.weight_store is None:
            return
        from rlhf_ray.weights.store import fetch_if_newer

        update = fetch_if_newer(self.weight_store, self.backend.version)
        if update is not None:
            version, state = update
            self.backend.load_adapter(state, version)

    def set_weights(self, state: dict, version: int) -> int:
        """Direct push (tests, sync mode); takes effect before the next request."""
        self.backend.load_adapter(state, version)
        return version

    def pid(self) -> int:
        """The actor's process id (for operations and fault tests)."""
        import os

        return os.getpid()

    def version(self) -> int:
        return self.backend.version

    def adapter_state(self) -> dict:
        from rlhf_ray.models.loading import lora_state_dict

        return lora_state_dict(self.model)

    # -- sampling --------------------------------------------------------------------------
    def _tokenize(self, batch: PromptBatch):
        limit, rule = self.cfg.data.max_prompt_tokens, self.cfg.data.prompt_overflow
        kept, truncated, dropped = [], 0, 0
        for prompt in batch.prompts:
            ids = self.tokenizer(prompt.text, add_special_tokens=True)["input_ids"]
            if not ids or not prompt.text.strip():
                dropped += 1
                continue
            if len(ids) > limit:
                if rule == "drop":
                    dropped += 1
                    continue
                ids, truncated = ids[-limit:], truncated + 1
            kept.append((prompt, ids))
        return kept, truncated, dropped

    def generate(self, batch: PromptBatch) -> RolloutBatch:
        self._pull_weights()
        version = self.backend.version  # the version this request is admitted under
        idx = self.requests if batch.request_idx is None else batch.request_idx
        seed = request_seed(self.cfg.generator.seed, self.generator_id, idx)
        self.requests += 1
        self.seeds.append(seed)
        kept, truncated, dropped = self._tokenize(batch)
        g = self.cfg.generator
        params = SamplingParams(g.max_new_tokens, g.temperature, g.top_p, g.top_k)
        start = time.perf_counter()
        per_prompt = self.backend.generate([ids for _, ids in kept], batch.n_samples, params, seed)
        elapsed = time.perf_counter() - start
        rollouts, tokens = [], 0
        for (prompt, ids), completions in zip(kept, per_prompt):
            for idx, c in enumerate(completions):
                tokens += len(c.response_ids)
                rollouts.append(
                    Rollout(
                        uid=make_uid(prompt.uid, idx, version),
                        prompt_uid=prompt.uid,
                        group_id=f"{prompt.uid}/{version}",
                        prompt_text=self.tokenizer.decode(ids, skip_special_tokens=True),
                        response_text=self.tokenizer.decode(c.response_ids, skip_special_tokens=True),
                        prompt_ids=list(ids),
                        response_ids=c.response_ids,
                        behavior_logprobs=c.behavior_logprobs,
                        finish_reason=c.finish_reason,
                        policy_version=version,
                        source=prompt.source,
                    )
                )
        stats = {
            "rollout/prompts": float(len(kept)),
            "rollout/prompts_truncated": float(truncated),
            "rollout/prompts_dropped": float(dropped),
            "rollout/samples": float(len(rollouts)),
            "rollout/tokens": float(tokens),
            "perf/generate_s": elapsed,
            "perf/generate_tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
        }
        return RolloutBatch(rollouts=rollouts, generator_id=self.generator_id, stats=stats)
