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


# Per-task figures summed across ranks besides the meta-gradient; their means go to the run
# records (metrics.csv and the progress line).
STATS = ("loss", "accuracy", "tasks", "inner_grad_norm", "inner_evaluated", "inner_converged",
         "cg_residual", "cg_tasks", "negative_curvature")


def _loop_stats(results) -> list:
    """The STATS sums of a list of MetaGradient."""
    norms = [r.inner.grad_norm for r in results if r.inner.grad_norm is not None]
    cgs = [r.cg for r in results if r.cg is not None]
    return [sum(r.query_loss for r in results), sum(r.query_accuracy or 0.0 for r in results),
            len(results), sum(norms), len(norms), sum(r.inner.converged for r in results),
            sum(c.residual / c.residual_norms[0] if c.residual_norms[0] > 0 else 0.0 for c in cgs),
            len(cgs), sum(c.negative_curvature for c in cgs)]


def _batch_stats(r) -> list:
    """The STATS sums of a BatchMetaGradient."""
    n = len(r.query_loss)
    evaluated = torch.isfinite(r.inner_grad_norm)
    acc = r.query_accuracy.sum() if r.query_accuracy is not None else 0.0
    cg = r.cg_residual is not None
    return [r.query_loss.sum(), acc, n, r.inner_grad_norm[evaluated].sum(), evaluated.sum(),
            r.inner_converged.sum(), r.cg_residual.sum() if cg else 0.0, n if cg else 0,
            r.negative_curvature.sum() if cg else 0]


def local_sums(method, model: FunctionalModel, theta: torch.Tensor, batch, batched: bool):
    """[Σ task meta-gradients, then the STATS sums] as one flat tensor (float64 for the
    STATS), for the tasks of ``batch`` (a TaskBatch, possibly empty)."""
    p = theta.numel()
    if batch is None or len(batch) == 0:
        return torch.zeros(p, dtype=theta.dtype), torch.zeros(len(STATS), dtype=torch.float64)
    if batched and supports_batching(method):
        r = batch_meta_gradient(method, model, theta, batch)
        g, stats = r.grads.sum(0), _batch_stats(r)
    else:
        results = [method.meta_gradient(model, theta, t) for t in batch.tasks()]
        g, stats = torch.stack([x.grad for x in results]).sum(0), _loop_stats(results)
    return g.detach(), torch.tensor([float(v) for v in stats], dtype=torch.float64)


def mean_meta_gradient(method, model: FunctionalModel, theta: torch.Tensor, sampler,
                       indices: Sequence[int], batched: bool = True, rank: int = 0, world: int = 1):
    """(mean meta-gradient, statistics) over the tasks ``indices`` of ``sampler``, computed
    across ranks when a process group is running. The statistics: mean query loss and
    accuracy; mean ‖∇G‖ after the inner solve (over the tasks whose solver evaluated it, NaN if
    none did) and the fraction of tasks whose inner solve met its tolerance; for iMAML, the
    mean relative residual of the linear solve and the number of tasks whose linear solve met
    negative curvature."""
    mine = shard(indices, rank, world)
    g, sums = local_sums(method, model, theta, sampler.batch(mine) if mine else None, batched)
    if world > 1:
        both = torch.cat([g.double(), sums])
        dist.all_reduce(both, op=dist.ReduceOp.SUM)
        g, sums = both[:g.numel()].to(g.dtype), both[g.numel():]
    s = dict(zip(STATS, sums.tolist()))
    n = s["tasks"]
    stats = {"loss": s["loss"] / n, "accuracy": s["accuracy"] / n,
             "inner_grad_norm": (s["inner_grad_norm"] / s["inner_evaluated"]
                                 if s["inner_evaluated"] else float("nan")),
             "inner_converged": s["inner_converged"] / n,
             "cg_residual": s["cg_residual"] / s["cg_tasks"] if s["cg_tasks"] else float("nan"),
             "negative_curvature": int(s["negative_curvature"])}
    return g / n, stats


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
