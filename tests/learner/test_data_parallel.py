"""Case C12's data-parallel part: two learner processes in one torch.distributed group (gloo),
each training on half of a batch, make the same update as one learner on the whole batch."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_rows, tiny_config

OVERRIDES = ("algorithm.whiten_advantages=true", "learner.micro_batch_size=1")


def _rows():
    # valid lengths 1, 3, 7 and 20 (C12), distinct rewards and group advantages
    lengths = [1, 3, 7, 20]
    responses = [[(5 + i + t) % 50 + 3 for t in range(n)] for i, n in enumerate(lengths)]
    return make_rows([[1, 2, 3]] * 4, responses, [[-2.5] * n for n in lengths],
                     reward=[1.0, 0.2, 0.6, 0.1], group_advantage=[0.5, -0.3, 0.2, -0.4])


class _Rank:
    def __init__(self, overrides, rank: int, world: int):
        import torch as t

        t.set_num_threads(1)
        from rlhf_ray.learner.ppo import PPOTrainer

        self.rank, self.world = rank, world
        self.trainer = PPOTrainer(tiny_config(*overrides))

    def address(self):
        from rlhf_ray.learner.distributed import rendezvous_address

        return rendezvous_address()

    def join(self, address: str, port: int) -> None:
        from rlhf_ray.learner.distributed import DataParallel

        self.trainer.dp = DataParallel(self.rank, self.world, address, port, timeout_s=120)

    def train(self, rows):
        from rlhf_ray.types import experience_table

        metrics = self.trainer.train_on(experience_table(rows))
        return metrics, self.trainer.adapter_state(), self.trainer.kl_ctl.coef


@pytest.mark.parametrize("extra", [(), ("algorithm.kl_mode=loss", "algorithm.kl_coef=0.3",
                                        "algorithm.kl_controller=adaptive")])
def test_two_learners_on_halves_equal_one_learner_on_the_union(ray_cluster, extra):
    import ray

    overrides = (*OVERRIDES, *extra)
    rows = _rows()
    Rank = ray.remote(num_cpus=0.5)(_Rank)
    single = Rank.remote(overrides, 0, 1)
    ranks = [Rank.remote(overrides, r, 2) for r in range(2)]
    address, port = ray.get(ranks[0].address.remote())
    ray.get([r.join.remote(address, port) for r in ranks])
    # uneven halves on purpose: 1 + 20 tokens against 3 + 7
    halves = [[rows[0], rows[3]], [rows[1], rows[2]]]
    parallel = ray.get([r.train.remote(h) for r, h in zip(ranks, halves)])
    alone = ray.get(single.train.remote(rows))
    for _metrics, state, coef in parallel:
        assert coef == pytest.approx(alone[2], abs=1e-12)  # one KL controller state
        for name, tensor in alone[1].items():
            torch.testing.assert_close(state[name], tensor, atol=1e-6, rtol=0)
    # the update is real: LoRA's B matrices start at zero
    changed = [k for k, v in alone[1].items() if v.abs().max() > 0 and "lora_B" in k]
    assert changed, "the single learner's update left every lora_B at zero"
    for actor in [single, *ranks]:
        ray.kill(actor)
