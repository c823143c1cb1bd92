"""What the offline learners (preference and token-level Q learning) share: the LoRA policy,
the tokenizer, AdamW with the learner's schedule, a seeded pass order over the training data,
guarded optimizer steps and the saved state.

State on disk (``save``): ``adapter/`` (``save_pretrained``, safetensors), any extra modules as
``<name>.safetensors``, and ``trainer_state.pt`` (optimizer, scheduler, version; read with
``weights_only=True`` by whoever loads it).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from rlhf_ray.config import Config


class OfflineLearnerBase:
    def __init__(self, cfg: Config):
        from rlhf_ray.models.loading import load_policy, load_tokenizer

        self.cfg = cfg
        torch.manual_seed(cfg.run.seed)
        self.policy = load_policy(cfg.model, with_value_head=False)
        self.tokenizer = load_tokenizer(cfg.model)
        self.pad_id = self.tokenizer.pad_token_id
        self.version = 0
        self.skipped_updates = 0
        self._order_rng = torch.Generator().manual_seed(cfg.run.seed)
        self._order: list[int] = []
        self.optimizer = None
        self.scheduler = None

    def adapter_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.policy.model.parameters() if p.requires_grad]

    def _make_optimizer(self, extra_groups: list[dict] | None = None) -> None:
        """AdamW over the adapter (``learner.lr``) and any extra parameter groups, with the
        learner's schedule over ``run.steps``."""
        from rlhf_ray.learner.ppo import _lr_factor

        lrn = self.cfg.learner
        groups = [{"params": self.adapter_parameters(), "lr": lrn.lr}, *(extra_groups or [])]
        self.optimizer = torch.optim.AdamW(groups, lr=lrn.lr,
                                           betas=(lrn.adam_beta1, lrn.adam_beta2),
                                           weight_decay=lrn.weight_decay)
        total = self.cfg.run.steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: _lr_factor(lrn.lr_schedule, step, lrn.warmup_steps,
                                                    total))

    def _next_indices(self, n: int, size: int) -> list[int]:
        """``n`` indices into ``size`` training items, each once per pass, in a seeded order."""
        out = []
        while len(out) < n:
            if not self._order:
                self._order = torch.randperm(size, generator=self._order_rng).tolist()
            out.append(self._order.pop())
        return out

    def _apply_update(self, loss_value: float, params: list[torch.nn.Parameter]) -> float:
        """Clips and steps; a non-finite loss or gradient skips the update (counted) and leaves
        the weights as they were. Returns the gradient norm before clipping."""
        max_norm = self.cfg.learner.max_grad_norm or 1e9
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if math.isfinite(loss_value) and torch.isfinite(grad_norm):
            self.optimizer.step()
            self.scheduler.step()
        else:
            self.skipped_updates += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.version += 1
        return float(grad_norm)

    def _extra_modules(self) -> dict[str, torch.nn.Module]:
        """Modules saved beside the adapter, by file stem."""
        return {}

    def _extra_state(self) -> dict:
        """More entries of ``trainer_state.pt``."""
        return {}

    def save(self, path: str) -> str:
        from safetensors.torch import save_file

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        self.policy.model.save_pretrained(out / "adapter", safe_serialization=True)
        for name, module in self._extra_modules().items():
            state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
            save_file(state, str(out / f"{name}.safetensors"))
        torch.save({"optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "version": self.version,
                    **self._extra_state()},
                   out / "trainer_state.pt")
        return path
