"""Meta-gradients of a whole batch of tasks at once with ``torch.func.vmap``.

The per-task methods in ``meta.py`` stop on data (tolerances, CG breakdown) and report Python
floats; under ``vmap`` control flow cannot depend on data, so here every task runs the same
number of iterations and a task that has finished is frozen by masking:
- inner GD / Nesterov: a task whose ‖∇G‖ ≤ λ·tol keeps its φ;
- CG: a task stops updating once its residual meets the tolerance, or on non-positive
  curvature or a non-finite step (counted, as in ``conjugate_gradient``).
The results equal the per-task loop up to floating-point summation order (tested in float64).
Newton-CG's line search is data-dependent and is not batched: ``supports_batching`` says False
and callers fall back to the loop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from torch.func import grad, grad_and_value, vjp, vmap

from .functional import FunctionalModel, check_finite
from .inner import GradientDescent, Nesterov
from .meta import FOMAML, IMAML, MAML, Reptile


@dataclass
class BatchMetaGradient:
    """Per-task results, stacked: grads [B, P]; query_loss, query_accuracy [B]; for iMAML,
    cg_residual [B] and negative_curvature [B] (bool)."""

    grads: Tensor
    query_loss: Tensor
    query_accuracy: Optional[Tensor]
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


def _inner_solve(method, loss, theta: Tensor, differentiable_theta: bool = False) -> Tensor:
    """Fixed-count GD or Nesterov on G(φ) = L̂(φ) + (λ/2)‖φ − θ‖² with tolerance masking."""
    inner, lam = method.inner, method.lam
    thr = lam * inner.tol
    g_loss = grad(loss)
    phi = prev = theta
    done = torch.zeros((), dtype=torch.bool, device=theta.device)
    for _ in range(inner.steps):
        y = phi + inner.momentum * (phi - prev) if isinstance(inner, Nesterov) else phi
        g = g_loss(y) + lam * (y - theta)
        if thr > 0:  # a task that met the tolerance stays where it met it, with no momentum
            done = done | (torch.linalg.vector_norm(g) <= thr)
            prev, phi = torch.where(done, y, phi), torch.where(done, y, y - inner.lr * g)
        else:
            prev, phi = phi, y - inner.lr * g
    return phi


def _masked_cg(matvec, b: Tensor, max_iter: int, rtol: float, atol: float):
    x = torch.zeros_like(b)
    r, p = b, b
    rs = r @ r
    thr = torch.clamp(rtol * torch.linalg.vector_norm(b), min=atol)
    active = torch.ones((), dtype=torch.bool, device=b.device)
    neg = torch.zeros((), dtype=torch.bool, device=b.device)
    for _ in range(max_iter):
        active = active & (rs.sqrt() > thr)
        Ap = matvec(p)
        pAp = p @ Ap
        bad = ~(pAp > 0) | ~torch.isfinite(pAp)
        neg = neg | (active & (pAp <= 0))
        active = active & ~bad
        alpha = torch.where(active, rs / torch.where(bad, torch.ones_like(pAp), pAp), 0.0)
        x = x + alpha * p
        r = r - alpha * Ap
        rs_new = r @ r
        beta = torch.where(active, rs_new / torch.where(rs > 0, rs, torch.ones_like(rs)), 0.0)
        p = torch.where(active, r + beta * p, p)
        rs = torch.where(active, rs_new, rs)
    return x, rs.sqrt(), neg


def batch_meta_gradient(method, model: FunctionalModel, theta: Tensor, batch) -> BatchMetaGradient:
    """Task meta-gradients of every task of ``batch`` (a ``TaskBatch``) in one vmapped call."""
    if not supports_batching(method):
        raise ValueError(f"{type(method).__name__} with {type(method.inner).__name__} has no "
                         "batched path; use the per-task loop")
    theta = theta.detach()
    classify = batch.y_query.dtype in (torch.int64, torch.int32)

    def query(p, xq, yq):
        logits = model.forward(p, xq)
        loss = model.loss_fn(logits, yq)
        acc = (logits.argmax(-1) == yq).float().mean() if classify else loss * 0
        return loss, acc

    def per_task(xs, ys, xq, yq):
        support = lambda p: model.loss(p, xs, ys)  # noqa: E731
        if isinstance(method, MAML):
            def outer(th):
                loss, acc = query(_inner_solve(method, support, th), xq, yq)
                return loss, acc
            g, (loss, acc) = grad_and_value(outer, has_aux=True)(theta)
            return g, loss, acc, loss * 0, loss < 0
        phi = _inner_solve(method, support, theta)
        if isinstance(method, Reptile):
            loss, acc = query(phi, xq, yq)
            return theta - phi, loss, acc, loss * 0, loss < 0
        v, (loss, acc) = grad_and_value(lambda p: query(p, xq, yq), has_aux=True)(phi)
        if isinstance(method, FOMAML):
            return v, loss, acc, loss * 0, loss < 0
        if method.curvature == "ggn":
            curv = method.curvature_product(model, xs, ys, phi)
        else:  # reverse-over-reverse, the graph of ∇L̂(φ) built once for all CG steps
            _, vjp_fn = vjp(grad(support), phi)
            curv = lambda u: vjp_fn(u)[0]  # noqa: E731
        lam = method.lam
        x, res, neg = _masked_cg(lambda u: u + curv(u) / lam, v, method.cg_max_iter,
                                 method.cg_rtol, method.cg_atol)
        return x, loss, acc, res, neg

    with torch.no_grad() if not isinstance(method, MAML) else torch.enable_grad():
        grads, loss, acc, res, neg = vmap(per_task)(batch.x_support, batch.y_support,
                                                    batch.x_query, batch.y_query)
    check_finite(loss, "query loss")
    check_finite(grads, "task meta-gradients")
    is_imaml = isinstance(method, IMAML)
    return BatchMetaGradient(grads.detach(), loss.detach(), acc.detach() if classify else None,
                             res if is_imaml else None, neg if is_imaml else None)
