"""Loading the policy, its tokenizer and its LoRA adapter; the value head.

The reference model is never a second copy: inside the learner it is the same base model with
the adapter disabled (`peft_model.disable_adapter()`). Actors in other processes (the scorer)
load the base weights once, frozen, with no adapter attached.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rlhf_ray.config import ModelConfig
from rlhf_ray.models.builtin import resolve_model_path

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    path = resolve_model_path(cfg.name, cfg.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token_id is None:
        # Padding only ever exists inside one forward pass and masks come from lengths, so any id
        # works as pad; EOS is the conventional choice.
        if tokenizer.eos_token_id is None:
            raise ValueError(
                f"tokenizer of {cfg.name!r} has neither a pad nor an EOS token; set one in its "
                "tokenizer_config.json"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(cfg: ModelConfig, *, frozen: bool = True):
    """The plain pretrained model, in eval mode (dropout off); frozen unless asked otherwise."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(cfg.name, cfg.cache_dir)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=_DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code
    )
    model.eval()
    if frozen:
        model.requires_grad_(False)
    return model


def attach_lora(model, cfg: ModelConfig):
    """Wraps `model` with a LoRA adapter (fresh, or loaded from cfg.adapter_path)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if cfg.adapter_path:
        peft_model = PeftModel.from_pretrained(model, cfg.adapter_path, is_trainable=True)
    else:
        targets = cfg.lora_target_modules
        lora = LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules="all-linear" if list(targets) == ["all-linear"] else list(targets),
            bias="none",
            task_type="CAUSAL_LM",
        )
        peft_model = get_peft_model(model, lora)
    peft_model.eval()  # dropout stays off: log-prob passes must be deterministic
    return peft_model


def hidden_size(model) -> int:
    config = model.config
    for name in ("hidden_size", "n_embd", "d_model"):
        if hasattr(config, name):
            return int(getattr(config, name))
    raise ValueError(f"cannot find the hidden size in {type(config).__name__}")


class ValueHead(nn.Module):
    """A scalar value per position, read from the policy's last hidden state."""

    def __init__(self, hidden: int):
        super().__init__()
        self.proj = nn.Linear(hidden, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden_states.float()).squeeze(-1)


@dataclass
class Policy:
    """The trainable policy: a peft-wrapped causal LM and, for GAE, a value head."""

    model: object  # peft.PeftModel
    value_head: ValueHead | None

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.value_head is not None:
            params += list(self.value_head.parameters())
        return params


def load_policy(cfg: ModelConfig, *, with_value_head: bool) -> Policy:
    base = load_base_model(cfg, frozen=True)
    model = attach_lora(base, cfg)
    head = ValueHead(hidden_size(base)) if with_value_head else None
    return Policy(model=model, value_head=head)


def lora_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """The adapter tensors only (what travels to the generators), detached CPU copies."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(peft_model).items()}


def load_lora_state_dict(peft_model, state: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(peft_model, state)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ValueError(f"adapter tensors do not match the model: unexpected {unexpected[:5]}")
