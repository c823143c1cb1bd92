"""Versioned weight publishing (case C15) and version stamps on rows."""

import time

import pytest
import ray
import torch

from rlhf_ray.generation.generator import Generator
from rlhf_ray.weights.store import WeightStore, fetch_if_newer, publish
from rlhf_ray.types import Prompt, PromptBatch
from tests.conftest import tiny_config


def _state():
    return {f"t{i}": torch.full((256,), float(i)) for i in range(6)}


def test_a_publish_in_pieces_bumps_the_version_once(ray_cluster):
    store = ray.remote(num_cpus=0)(WeightStore).remote()
    version = publish(store, _state(), max_piece_bytes=2048)  # 6 KB in 3 pieces
    assert version == 1
    got_version, state = fetch_if_newer(store, 0)
    assert got_version == 1 and torch.equal(state["t5"], torch.full((256,), 5.0))
    assert fetch_if_newer(store, 1) is None


def test_a_publish_that_fails_midway_does_not_bump_the_version(ray_cluster):
    store = ray.remote(num_cpus=0)(WeightStore).remote()
    publish(store, _state())
    with pytest.raises(RuntimeError, match="injected"):
        publish(store, _state(), max_piece_bytes=2048, _fail_after_pieces=1)
    stats = ray.get(store.stats.remote())
    assert stats["weights/version"] == 1
    assert stats["weights/failed_publishes"] == 1 and stats["weights/open_publishes"] == 0


def test_old_versions_are_released(ray_cluster):
    store = ray.remote(num_cpus=0)(WeightStore).remote(keep=1)
    for _ in range(5):
        publish(store, _state())
    stats = ray.get(store.stats.remote())
    assert stats["weights/version"] == 5 and stats["weights/versions_held"] == 1


def test_rows_keep_the_version_admitted_when_a_publish_lands_mid_generation(ray_cluster):
    cfg = tiny_config("generator.max_new_tokens=64")
    store = ray.remote(num_cpus=0)(WeightStore).remote()
    gen = ray.remote(Generator).options(num_cpus=0).remote(cfg, 0, store)
    ray.get(gen.version.remote())
    adapter = ray.get(gen.adapter_state.remote())
    prompts = PromptBatch([Prompt(f"q{i}", "hello there") for i in range(8)], n_samples=4)
    in_flight = gen.generate.remote(prompts)
    time.sleep(0.5)
    assert publish(store, {k: v + 0.01 for k, v in adapter.items()}) == 1  # lands mid-request
    first = ray.get(in_flight)
    assert {r.policy_version for r in first.rollouts} == {0}
    second = ray.get(gen.generate.remote(prompts))
    assert {r.policy_version for r in second.rollouts} == {1}
    assert ray.get(gen.version.remote()) == 1
