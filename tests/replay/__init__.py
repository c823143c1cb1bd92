"""Tests of rlhf_ray.replay: shards without Ray, the client against real shard actors."""
