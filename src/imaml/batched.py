"""Meta-gradients of a whole batch of tasks at once with ``torch.func.vmap``.

Nothing is re-implemented here: the inner solves are ``imaml.inner.run`` on a ``Batch`` of
the tasks' problems (each solver's ``step`` vmapped over the tasks, one iteration at a time, so
the batch leaves its loop as soon as every task has finished; a finished task is frozen by
masking meanwhile), and the linear solvers (``cg_state``, ``minres_state``) are the same code
the per-task path runs, called with ``early_stop=False``: under ``vmap`` control flow cannot
depend on data, so every system runs the same number of iterations. The results equal the
per-task loop up to floating-point summation order (tested in float64). Newton-CG (iMAML-HF)
maps the pieces of its iteration: each task backtracks along its own direction until every
task of the batch has accepted a step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from torch.func import grad_and_value, vmap

from .functional import FunctionalModel, check_finite, curvature_product
from .implicit import adjoint_solve
from .inner import Adam, Batch, GradientDescent, Nesterov, NewtonCG, run
from .linear import LINEAR_SOLVERS, NegativeCurvatureError
from .meta import FOMAML, IMAML, MAML, Reptile


@dataclass
class BatchMetaGradient:
    """Per-task results, stacked: grads [B, P]; query_loss, query_accuracy [B]; the inner
    solve's final ‖∇G‖ [B] (NaN where the solver did not evaluate it) and whether it met its
    tolerance [B]; for iMAML, the linear solve's final residual relative to its first [B],
    whether it met negative curvature [B] and, for a tensor λ, ∂L_test/∂λ [B, P]."""

    grads: Tensor
    query_loss: Tensor
    query_accuracy: Optional[Tensor]
    inner_grad_norm: Tensor
    inner_converged: Tensor
    cg_residual: Optional[Tensor] = None
    negative_curvature: Optional[Tensor] = None
    lam_grads: Optional[Tensor] = None  # iMAML with one λ per parameter: ∂L_test/∂λ [B, P]
    inner_moments: Optional[Tensor] = None  # an Adam inner solver that carries them: [B, 2, P]

    @property
    def grad(self) -> Tensor:
        return self.grads.mean(0)


def supports_batching(method) -> bool:
    inner = getattr(method, "inner", None)
    if isinstance(method, (FOMAML, Reptile)):
        return isinstance(inner, (GradientDescent, Nesterov, Adam))
    if isinstance(method, IMAML):
        return isinstance(inner, (GradientDescent, Nesterov, NewtonCG))
    if isinstance(method, MAML):
        return isinstance(inner, GradientDescent)
    return False


def _inner_states(method, model: FunctionalModel, theta: Tensor, batch):
    """(the inner solver's final state, stacked over the tasks of ``batch``, and the ‖∇G‖
    history [B, K]): one ``inner.run`` on the batch's problems, which leaves its loop as soon as
    every task has finished (a finished task is frozen by masking meanwhile, so each result
    equals its own solve)."""
    problems = Batch(lambda x, y: method.support_problem(model, theta, x, y),
                     batch.x_support, batch.y_support)
    return run(method.inner, problems, theta)


def batch_meta_gradient(method, model: FunctionalModel, theta: Tensor, batch) -> BatchMetaGradient:
    """Task meta-gradients of every task of ``batch`` (a ``TaskBatch``) in one vmapped call."""
    if not supports_batching(method):
        raise ValueError(f"{type(method).__name__} with {type(method.inner).__name__} has no "
                         "batched path; use the per-task loop")
    theta = theta.detach()
    classify = batch.y_query.dtype in (torch.int64, torch.int32)
    lam = method.lam
    per_parameter = isinstance(method, IMAML) and isinstance(lam, Tensor)

    def query(p, xq, yq):
        logits = model.forward(p, xq)
        loss = model.loss_fn(logits, yq)
        # accuracy where ``accuracy_of`` defines it (integer labels, class scores [n, classes]),
        # NaN elsewhere and then reported as None
        if classify and logits.dim() == 2:
            return loss, (logits.argmax(-1) == yq).float().mean()
        return loss, loss * float("nan")

    def inner_solve(xs, ys, th):
        return run(method.inner, method.support_problem(model, th, xs, ys), th, sync=False)[0]

    def per_task(xs, ys, xq, yq, s=None):
        if isinstance(method, MAML):
            def outer(th):
                s = inner_solve(xs, ys, th)
                loss, acc = query(s.phi, xq, yq)
                return loss, (acc, s.grad_norm.detach(), s.converged)
            g, (loss, (acc, gn, conv)) = grad_and_value(outer, has_aux=True)(theta)
            return g, loss, acc, gn, conv, loss * 0, conv & False, loss * 0
        phi = s.phi
        if isinstance(method, Reptile):
            loss, acc = query(phi, xq, yq)
            return (theta - phi, loss, acc, s.grad_norm, s.converged, loss * 0,
                    s.converged & False, loss * 0)
        v, (loss, acc) = grad_and_value(lambda p: query(p, xq, yq), has_aux=True)(phi)
        if isinstance(method, FOMAML):
            return v, loss, acc, s.grad_norm, s.converged, loss * 0, s.converged & False, loss * 0
        curv = curvature_product(model, xs, ys, phi, method.curvature, method.hvp_mode)
        solve = lambda A, b: LINEAR_SOLVERS[method.linear_solver](  # noqa: E731
            A, b, max_iter=method.cg_max_iter, rtol=method.cg_rtol, atol=method.cg_atol,
            early_stop=False)
        g, w, lin = adjoint_solve(curv, v, lam, model.adapt_mask, solve)
        rel = lin.residual / lin.history[0].clamp_min(torch.finfo(v.dtype).tiny)  # ‖r₀‖ = ‖b‖
        lam_grad = -(phi - theta) * w if per_parameter else loss * 0
        return g, loss, acc, s.grad_norm, s.converged, rel, lin.negative_curvature, lam_grad

    data = (batch.x_support, batch.y_support, batch.x_query, batch.y_query)
    moments = None
    if isinstance(method, MAML):
        with torch.enable_grad():
            grads, loss, acc, gn, conv, res, neg, lam_grads = vmap(per_task)(*data)
    else:
        with torch.no_grad():
            states, _ = _inner_states(method, model, theta, batch)
            moments = method.inner.moments(states)
            grads, loss, acc, gn, conv, res, neg, lam_grads = vmap(per_task)(*data, states)
    check_finite(loss, "query loss")
    check_finite(grads, "task meta-gradients")
    is_imaml = isinstance(method, IMAML)
    if (is_imaml and method.linear_solver == "cg" and method.on_negative_curvature == "raise"
            and bool(neg.any())):
        raise NegativeCurvatureError(f"CG met negative curvature on {int(neg.sum())} of "
                                     f"{len(neg)} tasks of the batch")
    classify = classify and not bool(torch.isnan(acc).any())
    return BatchMetaGradient(grads.detach(), loss.detach(), acc.detach() if classify else None,
                             gn.detach(), conv, res if is_imaml else None,
                             neg if is_imaml else None, lam_grads if per_parameter else None,
                             moments)
