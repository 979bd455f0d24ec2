"""Meta-gradients of a whole batch of tasks: ``vmap`` of each method's one per-task computation
(``terms``), or a loop over it.

Nothing is re-implemented here: the inner solves are ``imaml.inner.run`` on a ``Batch`` of the
tasks' problems (each solver's ``step`` vmapped over the tasks, one iteration at a time, so the
batch leaves its loop as soon as every task has finished; a finished task is frozen by masking
meanwhile), then the method's ``terms`` is vmapped over the tasks with their solved states; a
method that differentiates through its inner solve (MAML, ``unrolls``) has its whole ``terms``
vmapped. Under ``vmap`` control flow cannot depend on data, so every linear system runs the same
number of iterations (masked once solved). The results equal the per-task loop up to
floating-point summation order (tested in float64).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from torch.func import vmap
from torch.utils._pytree import tree_map

from .functional import FunctionalModel, check_finite
from .inner import Batch, run
from .meta import TaskTerms


@dataclass
class BatchMetaGradient:
    """Per-task results, stacked: grads [B, P]; query_loss, query_accuracy [B]; the inner
    solve's final ‖∇G‖ [B] (NaN where the solver did not evaluate it) and whether it met its
    tolerance [B]; for iMAML, the linear solve's final residual relative to its first [B],
    whether it met negative curvature [B] and, for a tensor λ, ∂L_test/∂λ [B, P]; an Adam inner
    solver's final moments where it carries them [B, 2, P]; the inner solve's steps [B]."""

    grads: Tensor
    query_loss: Tensor
    query_accuracy: Optional[Tensor]
    inner_grad_norm: Tensor
    inner_converged: Tensor
    cg_residual: Optional[Tensor] = None
    negative_curvature: Optional[Tensor] = None
    lam_grads: Optional[Tensor] = None  # iMAML with one λ per parameter: ∂L_test/∂λ [B, P]
    inner_moments: Optional[Tensor] = None  # an Adam inner solver that carries them: [B, 2, P]
    inner_steps: Optional[Tensor] = None  # the inner solve's steps [B]

    @property
    def grad(self) -> Tensor:
        return self.grads.mean(0)


def _stack(terms) -> TaskTerms:
    """Per-task ``TaskTerms`` stacked as ``vmap`` stacks them (the linear solve's own state left
    out: its history's length depends on where each solve stopped)."""
    terms = [t._replace(linear={k: v for k, v in t.linear.items() if k != "solve"}) for t in terms]
    return tree_map(lambda *x: torch.stack(x), *terms)


def batch_meta_gradient(method, model: FunctionalModel, theta: Tensor, batch,
                        vectorised: bool = True) -> BatchMetaGradient:
    """Task meta-gradients of every task of ``batch`` (a ``TaskBatch``): in one vmapped call, or
    (``vectorised=False``) task by task, each task's solves then leaving as soon as they are
    done."""
    theta = theta.detach()
    data = (batch.x_support, batch.y_support, batch.x_query, batch.y_query)
    with torch.enable_grad() if method.unrolls else torch.no_grad():
        if not vectorised:
            t = _stack([method.terms(model, theta, task.x_support, task.y_support, task.x_query,
                                     task.y_query)[0] for task in batch.tasks()])
        elif method.unrolls:
            t = vmap(lambda *d: method.terms(model, theta, *d, sync=False)[0])(*data)
        else:
            problems = Batch(lambda x, y: method.support_problem(model, theta, x, y),
                             batch.x_support, batch.y_support)
            inner = run(method.inner, problems, theta)
            t = vmap(lambda *d: method.terms(model, theta, *d[:4], inner=d[4:], sync=False)[0])(
                *data, *inner)
    check_finite(t.loss, "query loss")
    check_finite(t.grad, "task meta-gradients")
    method.check(t)
    lam_grad = t.linear.get("lam_grad")
    acc = t.accuracy.detach()
    return BatchMetaGradient(
        t.grad.detach(), t.loss.detach(), None if bool(torch.isnan(acc).any()) else acc,
        t.inner.grad_norm.detach(), t.inner.converged, t.linear.get("residual"),
        t.linear.get("negative_curvature"), lam_grad if lam_grad is not None and lam_grad.dim() > 1
        else None, method.inner.moments(t.inner), t.inner.steps)
