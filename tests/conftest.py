"""Shared fixtures: one real local Ray cluster per test session, tiny models built from configs."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster (no dashboard, explicit CPUs). Tests that need Ray take this."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=4,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}},
        )
    yield ray
    ray.shutdown()


def tiny_config(*overrides: str, model: str = "tiny-llama"):
    """The tiny preset with overrides (no Ray needed to build it)."""
    from rlhf_ray.config import load_config

    return load_config(preset="tiny", overrides=[f"model.name={model}", *overrides])


def make_rows(prompts, responses, behavior, ref=None, **cols):
    """Experience rows (dicts) for given token lists; other columns get plausible defaults."""
    rows = []
    for i, (p, r, b) in enumerate(zip(prompts, responses, behavior)):
        row = {
            "uid": f"p{i}/0/0", "prompt_uid": f"p{i}", "group_id": f"p{i}/0",
            "prompt_text": "", "response_text": "", "prompt_ids": list(p),
            "response_ids": list(r), "behavior_logprobs": list(b),
            "ref_logprobs": list(ref[i]) if ref is not None else list(b),
            "reward": 0.0, "group_advantage": 0.0, "finish_reason": "length",
            "policy_version": 0, "source": "online",
        }
        for k, v in cols.items():
            row[k] = v[i] if isinstance(v, (list, tuple)) else v
        rows.append(row)
    return rows


ATOL = 1e-6


def assert_close(actual, expected, atol: float = ATOL) -> None:
    """Absolute-tolerance comparison (rtol 0) against a value or list."""
    import torch

    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)
