"""Sharded replay buffer: Arrow storage in Ray actors, samplers, removers and a client.

``ReplayShard`` (a plain class, ``ReplayShardActor`` as a Ray actor) stores one slice of the
Experience table; ``ReplayClient`` routes rows to shards by a stable uid hash and samples across
them. See ``shard.py`` for the storage layout and ``removers.py`` for eligibility rules.
"""

from rlhf_ray.replay.client import ReplayClient, stable_shard
from rlhf_ray.replay.removers import EligibilityRule, FifoRemover, Remover
from rlhf_ray.replay.samplers import Sampler, UniformSampler
from rlhf_ray.replay.shard import (
    ReplayShard,
    ReplayShardActor,
    make_shard_actors,
    validate_experience_table,
)

__all__ = [
    "EligibilityRule",
    "FifoRemover",
    "Remover",
    "ReplayClient",
    "ReplayShard",
    "ReplayShardActor",
    "Sampler",
    "UniformSampler",
    "make_shard_actors",
    "stable_shard",
    "validate_experience_table",
]
