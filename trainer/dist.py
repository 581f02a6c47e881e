"""Data parallelism under `torchrun`: process group set-up and gradient averaging.

Gradients are summed with one flat all-reduce after the backward pass rather
than through `DistributedDataParallel`'s hooks: meta-learning calls
`autograd.grad` inside the forward pass (the inner step), which DDP's
bucketed reducer is not built to see, and a single explicit all-reduce is the
same data-parallel arithmetic with no surprises.  gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device_type: str) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def all_reduce_grads(params: list[torch.nn.Parameter], info: DistInfo) -> None:
    """Sum every parameter's gradient over processes (the loss is pre-scaled to a global mean)."""
    if info.world <= 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    off = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[off : off + n].view_as(p).clone()
        off += n


def all_reduce_scalars(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    """Sum a few floats over processes (for metrics)."""
    if info.world <= 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        dist.barrier()


def teardown(info: DistInfo) -> None:
    if info.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
