"""Loading the policy, its tokenizer and its LoRA adapter; the value head.

The reference is the policy the run starts from, and never a second copy of the base weights:
- a fresh adapter: the reference is the base model with the adapter disabled;
- `model.adapter_path` given: the trainable adapter starts as a copy of that adapter, and a
  second, frozen copy of it (the `reference` adapter, a few MB) is what the reference runs.
`reference_mode(model)` switches a policy into its reference for one block. Actors in other
processes (the scorer) load the base weights once, frozen, plus the starting adapter if any.
"""

from __future__ import annotations

import contextlib
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
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per actor per load is noise in the driver's log

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
        peft_model.load_adapter(cfg.adapter_path, adapter_name=REFERENCE_ADAPTER,
                                is_trainable=False)
        peft_model.set_adapter("default")
        for name, param in peft_model.named_parameters():
            param.requires_grad_(_is_trainable_lora(name))
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


REFERENCE_ADAPTER = "reference"


def _is_trainable_lora(name: str) -> bool:
    return "lora_" in name and f".{REFERENCE_ADAPTER}" not in name


@contextlib.contextmanager
def reference_mode(peft_model):
    """Within the block, `peft_model` computes the reference (see the module docstring)."""
    if REFERENCE_ADAPTER not in getattr(peft_model, "peft_config", {}):
        with peft_model.disable_adapter():
            yield
        return
    flags = {n: p.requires_grad for n, p in peft_model.named_parameters()}
    peft_model.set_adapter(REFERENCE_ADAPTER)
    try:
        yield
    finally:
        peft_model.set_adapter("default")
        for name, param in peft_model.named_parameters():
            param.requires_grad_(flags[name])


def load_reference(cfg: ModelConfig):
    """The frozen reference for actors that do not train: base, plus the starting adapter."""
    base = load_base_model(cfg, frozen=True)
    if not cfg.adapter_path:
        return base
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, cfg.adapter_path, is_trainable=False)
    model.eval().requires_grad_(False)
    return model


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
