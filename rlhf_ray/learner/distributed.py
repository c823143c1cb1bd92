"""Data-parallel learners: one torch.distributed process group over the learner actors.

Each learner draws its own share of the batch from the buffer and computes gradients of its
rows' token losses divided by the token count of the whole minibatch (summed over the ranks),
so summing the gradients over the ranks gives exactly the gradient one learner would compute on
the union (case C12). Clipping, the NaN check and the optimizer step then run on identical
gradients on every rank, and the weights stay identical without a broadcast. Rank 0 publishes
the adapter and writes checkpoints.

Backend: gloo (the models run on the CPU in this build; ``backend`` takes "nccl" for CUDA
tensors). Rank 0's actor picks the address (its node's IP and a free port); the driver hands it
to every rank.
"""

from __future__ import annotations

import socket
from datetime import timedelta

import torch


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def rendezvous_address() -> tuple[str, int]:
    """This process's node IP (as Ray sees it) and a free port on it."""
    import ray

    return ray.util.get_node_ip_address(), free_port()


class DataParallel:
    """Sums over the learner ranks (a no-op object is never built: one learner has none)."""

    def __init__(self, rank: int, world: int, address: str, port: int, *, backend: str = "gloo",
                 timeout_s: float = 300.0):
        import torch.distributed as dist

        self.rank, self.world = rank, world
        self.backend = backend
        dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=timeout_s))
        self._dist = dist

    def sum_scalar(self, value: float) -> float:
        t = torch.tensor([float(value)], dtype=torch.float64)
        self._dist.all_reduce(t)
        return float(t.item())

    def sum_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Replaces every parameter's gradient by its sum over the ranks (one flat all-reduce;
        a missing gradient counts as zeros)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self._dist.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n

    def close(self) -> None:
        if self._dist.is_initialized():
            self._dist.destroy_process_group()
