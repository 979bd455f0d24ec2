"""Data-parallel meta-training on PyTorch's own distributed stack (``torch.distributed``).

The outer average over tasks is data-parallel by nature: each rank computes the task
meta-gradients of its share of the meta-batch (tasks ``rank, rank + world, ...`` of the
iteration, drawn from the same seeded sampler on every rank, so no data moves), and one
``all_reduce`` sums gradients, losses, accuracies and task counts. Every rank then takes the same
optimizer step from the same state, so the replicas stay identical; rank 0 alone logs, validates
and writes checkpoints. Launch with ``torchrun`` (gloo on CPU, NCCL on GPU):

    torchrun --standalone --nproc_per_node=2 -m imaml.cli train configs/... --out runs/x
"""
from __future__ import annotations

import os
from typing import Sequence, Tuple

import torch
import torch.distributed as dist

from .batched import batch_meta_gradient, supports_batching
from .functional import FunctionalModel


def init_from_env() -> Tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(indices: Sequence[int], rank: int, world: int) -> list:
    """This rank's tasks of a meta-batch: every world-th, starting at rank."""
    return list(indices)[rank::world]


def local_sums(method, model: FunctionalModel, theta: torch.Tensor, batch, batched: bool):
    """[Σ task meta-gradients, Σ query losses, Σ query accuracies, number of tasks] as one
    flat tensor, for the tasks of ``batch`` (a TaskBatch, possibly empty)."""
    p = theta.numel()
    if batch is None or len(batch) == 0:
        return torch.zeros(p + 3, dtype=theta.dtype)
    if batched and supports_batching(method):
        r = batch_meta_gradient(method, model, theta, batch)
        g, loss = r.grads.sum(0), r.query_loss.sum()
        acc = r.query_accuracy.sum() if r.query_accuracy is not None else loss * 0
    else:
        results = [method.meta_gradient(model, theta, t) for t in batch.tasks()]
        g = torch.stack([x.grad for x in results]).sum(0)
        loss = torch.tensor(sum(x.query_loss for x in results))
        acc = torch.tensor(sum(x.query_accuracy or 0.0 for x in results))
    n = torch.tensor(float(len(batch)))
    return torch.cat([g.detach(), torch.stack([loss, acc, n]).to(g.dtype)])


def mean_meta_gradient(method, model: FunctionalModel, theta: torch.Tensor, sampler,
                       indices: Sequence[int], batched: bool = True, rank: int = 0, world: int = 1):
    """(mean meta-gradient, mean query loss, mean query accuracy) over the tasks ``indices``
    of ``sampler``, computed across ranks when a process group is running."""
    mine = shard(indices, rank, world)
    sums = local_sums(method, model, theta, sampler.batch(mine) if mine else None, batched)
    if world > 1:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    n = sums[-1]
    return sums[:-3] / n, float(sums[-3] / n), float(sums[-2] / n)


def broadcast_parameters(module: torch.nn.Module, world: int) -> None:
    """Make every rank start from rank 0's parameters."""
    if world > 1:
        for p in module.parameters():
            dist.broadcast(p.data, src=0)


def from_rank0(value: float, world: int) -> float:
    """Rank 0's value of a float on every rank (for decisions all ranks must share)."""
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.broadcast(t, src=0)
    return float(t)


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()
