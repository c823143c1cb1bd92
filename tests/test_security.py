"""Security defaults: Ray's token authentication is never turned off, the local cluster has no
dashboard, only a fixed list of environment variables reaches the actors, remote code is off
by default, and checkpoints load without unpickling code."""

from __future__ import annotations

from pathlib import Path

import pytest

import rlhf_ray
from rlhf_ray import driver
from rlhf_ray.config import load_config


def test_local_ray_starts_without_dashboard_and_passes_on_no_secret(monkeypatch):
    calls = []

    class FakeRay:
        @staticmethod
        def is_initialized():
            return False

        @staticmethod
        def init(**kwargs):
            calls.append(kwargs)

    monkeypatch.setitem(__import__("sys").modules, "ray", FakeRay)
    monkeypatch.setenv("HF_TOKEN", "hf_do_not_leak")
    monkeypatch.setenv("WANDB_API_KEY", "wandb_do_not_leak")
    monkeypatch.setenv("RLHF_RAY_CACHE", "/tmp/cache")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    driver.init_ray(load_config(preset="tiny"))
    (kwargs,) = calls
    assert kwargs["include_dashboard"] is False
    env = kwargs["runtime_env"]["env_vars"]
    assert set(env) <= {"OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM", "RLHF_RAY_CACHE",
                        "HF_HUB_OFFLINE"}
    assert "hf_do_not_leak" not in repr(kwargs) and "wandb_do_not_leak" not in repr(kwargs)


def test_nothing_in_the_package_turns_token_auth_off_or_opens_a_port():
    root = Path(rlhf_ray.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "RAY_AUTH_MODE" not in text, path
        assert "include_dashboard=True" not in text, path
        assert "0.0.0.0" not in text, path
        assert "pickle.load" not in text, path
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, (path, line)


def test_remote_code_is_off_unless_asked_for():
    assert load_config(preset="tiny").model.trust_remote_code is False
    assert load_config(preset="default").model.trust_remote_code is False
    with pytest.raises(Exception):
        load_config(preset="tiny", overrides=["model.trust_remote_code=maybe"])
