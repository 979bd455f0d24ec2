"""Meta-gradients of a whole batch of tasks at once with ``torch.func.vmap``.

Nothing is re-implemented here: the inner solvers (``GradientDescent.state``,
``Nesterov.state``) and the linear solvers (``cg_state``, ``minres_state``) are the same code
the per-task path runs, called with ``early_stop=False``: under ``vmap`` control flow cannot
depend on data, so every task runs the same number of iterations and a task that has finished
is frozen by masking. The results equal the per-task loop up to floating-point summation order
(tested in float64). Newton-CG's line search is data-dependent and is not batched:
``supports_batching`` says False and callers fall back to the loop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from torch.func import grad_and_value, vmap

from .functional import FunctionalModel, ProximalProblem, check_finite, make_hvp, task_loss
from .inner import GradientDescent, Nesterov
from .linear import LINEAR_SOLVERS, NegativeCurvatureError
from .meta import FOMAML, IMAML, MAML, Reptile


@dataclass
class BatchMetaGradient:
    """Per-task results, stacked: grads [B, P]; query_loss, query_accuracy [B]; the inner
    solve's final ‖∇G‖ [B] (NaN where the solver did not evaluate it) and whether it met its
    tolerance [B]; for iMAML, the linear solve's final residual relative to its first [B] and
    whether it met negative curvature [B]."""

    grads: Tensor
    query_loss: Tensor
    query_accuracy: Optional[Tensor]
    inner_grad_norm: Tensor
    inner_converged: Tensor
    cg_residual: Optional[Tensor] = None
    negative_curvature: Optional[Tensor] = None

    @property
    def grad(self) -> Tensor:
        return self.grads.mean(0)


def supports_batching(method) -> bool:
    inner = getattr(method, "inner", None)
    if isinstance(method, (IMAML, FOMAML, Reptile)):
        return isinstance(inner, (GradientDescent, Nesterov))
    if isinstance(method, MAML):
        return isinstance(inner, GradientDescent)
    return False


def batch_meta_gradient(method, model: FunctionalModel, theta: Tensor, batch) -> BatchMetaGradient:
    """Task meta-gradients of every task of ``batch`` (a ``TaskBatch``) in one vmapped call."""
    if not supports_batching(method):
        raise ValueError(f"{type(method).__name__} with {type(method.inner).__name__} has no "
                         "batched path; use the per-task loop")
    theta = theta.detach()
    classify = batch.y_query.dtype in (torch.int64, torch.int32)
    lam = method.lam

    def query(p, xq, yq):
        logits = model.forward(p, xq)
        loss = model.loss_fn(logits, yq)
        acc = (logits.argmax(-1) == yq).float().mean() if classify else loss * 0
        return loss, acc

    def inner_solve(support, th):
        return method.inner.state(ProximalProblem(support, th, lam), th, early_stop=False)

    def per_task(xs, ys, xq, yq):
        support = task_loss(model, xs, ys)
        if isinstance(method, MAML):
            def outer(th):
                s = inner_solve(support, th)
                loss, acc = query(s.phi, xq, yq)
                return loss, (acc, s.grad_norm.detach(), s.converged)
            g, (loss, (acc, gn, conv)) = grad_and_value(outer, has_aux=True)(theta)
            return g, loss, acc, gn, conv, loss * 0, conv & False
        s = inner_solve(support, theta)
        phi = s.phi
        if isinstance(method, Reptile):
            loss, acc = query(phi, xq, yq)
            return theta - phi, loss, acc, s.grad_norm, s.converged, loss * 0, s.converged & False
        v, (loss, acc) = grad_and_value(lambda p: query(p, xq, yq), has_aux=True)(phi)
        if isinstance(method, FOMAML):
            return v, loss, acc, s.grad_norm, s.converged, loss * 0, s.converged & False
        if method.curvature == "ggn":
            curv = method.curvature_product(model, xs, ys, phi)
        else:  # reverse-over-reverse: the graph of ∇L̂(φ) built once for all iterations
            curv = make_hvp(support, phi, "rev-rev")
        lin = LINEAR_SOLVERS[method.linear_solver](
            lambda u: u + curv(u) / lam, v, max_iter=method.cg_max_iter, rtol=method.cg_rtol,
            atol=method.cg_atol, early_stop=False)
        rel = lin.residual / lin.history[0].clamp_min(torch.finfo(v.dtype).tiny)  # ‖r₀‖ = ‖v‖
        return lin.x, loss, acc, s.grad_norm, s.converged, rel, lin.negative_curvature

    with torch.no_grad() if not isinstance(method, MAML) else torch.enable_grad():
        grads, loss, acc, gn, conv, res, neg = vmap(per_task)(
            batch.x_support, batch.y_support, batch.x_query, batch.y_query)
    check_finite(loss, "query loss")
    check_finite(grads, "task meta-gradients")
    is_imaml = isinstance(method, IMAML)
    if (is_imaml and method.linear_solver == "cg" and method.on_negative_curvature == "raise"
            and bool(neg.any())):
        raise NegativeCurvatureError(f"CG met negative curvature on {int(neg.sum())} of "
                                     f"{len(neg)} tasks of the batch")
    return BatchMetaGradient(grads.detach(), loss.detach(), acc.detach() if classify else None,
                             gn.detach(), conv, res if is_imaml else None,
                             neg if is_imaml else None)
