"""The outer loop of Algorithm 1: average the task meta-gradients of a batch, step θ."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from . import checks
from .functional import FunctionalModel, check_finite
from .meta import MetaGradient
from .tasks import Task


@dataclass
class StepSummary:
    """Batch means of what the task meta-gradients reported."""

    query_loss: float
    query_accuracy: Optional[float]
    grad_norm: float
    results: List[MetaGradient]


def task_meta_gradients(method, model: FunctionalModel, theta: Tensor, tasks: Sequence[Task]):
    """(sum of the task meta-gradients, per-task ``MetaGradient`` results) at θ, task by task
    (``imaml.batched.batch_meta_gradient`` computes the same per-task terms stacked, looped or
    vmapped, which is what the trainer uses)."""
    results = [method.meta_gradient(model, theta, t) for t in tasks]
    return torch.stack([r.grad for r in results]).sum(0), results


def batch_meta_gradient(method, model: FunctionalModel, theta: Tensor, tasks: Sequence[Task]):
    """(mean task meta-gradient, per-task results) for a batch of tasks at θ."""
    if len(tasks) == 0:
        raise ValueError("a meta-batch needs at least one task")
    g, results = task_meta_gradients(method, model, theta, tasks)
    return g / len(results), results


def apply_meta_gradient(model: FunctionalModel, optimizer: torch.optim.Optimizer, g: Tensor) -> None:
    """Write the flat meta-gradient ``g`` into the module's ``.grad`` fields and step."""
    checks.instance("optimizer", optimizer, (torch.optim.Optimizer,), "a torch optimizer over "
                    "model.module.parameters(), e.g. torch.optim.Adam(module.parameters())")
    mine = {id(model.module.get_parameter(n)) for n in model.names}
    theirs = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not mine <= theirs:
        raise ValueError(f"the optimizer does not step {len(mine - theirs)} of the "
                         f"{len(mine)} parameter tensors of the model's module (θ would not "
                         "move there): build it over model.module.parameters()")
    check_finite(g, "meta-gradient")
    optimizer.zero_grad(set_to_none=False)
    for name, gi in model.unflatten(g).items():
        p = model.module.get_parameter(name)
        if p.grad is None:
            p.grad = gi.detach().clone()
        else:
            p.grad.copy_(gi)
    optimizer.step()


def meta_step(method, model: FunctionalModel, optimizer: torch.optim.Optimizer,
              tasks: Sequence[Task]) -> StepSummary:
    """One step of Algorithm 1: θ ← optimizer step with the batch-mean task meta-gradient.

    ``optimizer`` must optimise ``model.module.parameters()`` (any torch optimizer: SGD, Adam).
    """
    g, results = batch_meta_gradient(method, model, model.theta(), tasks)
    apply_meta_gradient(model, optimizer, g)
    accs = [r.query_accuracy for r in results]
    return StepSummary(
        query_loss=sum(r.query_loss for r in results) / len(results),
        query_accuracy=None if None in accs else sum(accs) / len(accs),
        grad_norm=float(torch.linalg.vector_norm(g)),
        results=results,
    )
