"""Linear solvers that only see a matvec: ``solve(matvec, b, ...)``.

They do not know they are solving a Hessian system (the idea of jaxopt's ``linear_solve``):
iMAML calls them with ``v -> v + H v / λ``.

- ``conjugate_gradient``: for symmetric positive-definite A (Hestenes-Stiefel).
- ``minres``: for any symmetric A, definite or not (Paige & Saunders 1975); one matvec per
  iteration like CG, and it minimises ‖b − A x‖ over the Krylov space, so it stays meaningful
  where the network Hessian makes I + H/λ indefinite.

One implementation of each serves a single system and a ``torch.func.vmap`` batch of them: the
iterations are plain tensor arithmetic, and a system that has finished (converged, met negative
curvature, broke down) is frozen by masking rather than by leaving the loop. With
``early_stop=True`` (the default, for a single system) the loop also ends as soon as nothing is
active, at the price of one host synchronisation per iteration; the batched path passes
``early_stop=False`` and runs exactly ``max_iter`` iterations. Both give the same result.

**Negative curvature in CG** (the policy): CG's step length is rᵀr / pᵀAp, meaningless when
pᵀAp ≤ 0. CG then stops *before* that step and returns the last iterate, which is the exact
minimiser of the quadratic over the Krylov space explored so far (Steihaug's rule), with
``negative_curvature=True``; with ``on_negative_curvature="raise"`` it raises
``NegativeCurvatureError`` instead. It never returns NaN. Use ``minres`` where the system may be
indefinite.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, NamedTuple, Optional

import torch
from torch import Tensor

Matvec = Callable[[Tensor], Tensor]
CG_POLICIES = ("stop", "raise")


class NegativeCurvatureError(ArithmeticError):
    """CG met a direction p with pᵀAp ≤ 0 and was asked to raise rather than stop."""


@dataclass
class LinearSolveResult:
    """What a linear solve reached (CG or MINRES).

    Attributes:
        x: the solution estimate (never NaN: on breakdown it is the last good iterate).
        residual_norms: ‖b − A x_k‖ for k = 0..(accepted updates) (recursive estimates).
        iterations: matvecs spent.
        converged: the residual tolerance was met.
        negative_curvature: CG: some search direction p had pᵀAp ≤ 0, so A is not positive
            definite, and CG stopped there. MINRES: some Lanczos vector v had vᵀAv ≤ 0 (a
            witness that A is not positive definite); MINRES carries on regardless.
        breakdown: a non-finite quantity appeared; the solver stopped at the last finite iterate.
        solver: 'cg' or 'minres'.
    """

    x: Tensor
    residual_norms: List[float] = field(default_factory=list)
    iterations: int = 0
    converged: bool = False
    negative_curvature: bool = False
    breakdown: bool = False
    solver: str = "cg"

    @property
    def residual(self) -> float:
        return self.residual_norms[-1]


CGResult = LinearSolveResult  # its name before 2026-12-03 (it holds MINRES results too)


class SolveState(NamedTuple):
    """A solve as tensors (what the vmapped path returns): the solution, the final residual
    norm, matvecs spent, negative curvature met, breakdown, and the residual history
    ([max_iter + 1], repeating its last value once a system is frozen)."""

    x: Tensor
    residual: Tensor
    iterations: Tensor
    negative_curvature: Tensor
    breakdown: Tensor
    history: Tensor


def _check(b: Tensor, x0: Optional[Tensor], max_iter: int, rtol: float, atol: float) -> None:
    if max_iter < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter}")
    if rtol < 0 or atol < 0:
        raise ValueError("rtol and atol must be >= 0")
    if b.dim() != 1:
        raise ValueError(f"b must be a 1-D vector, got shape {tuple(b.shape)}")
    if x0 is not None and x0.shape != b.shape:
        raise ValueError(f"x0 has shape {tuple(x0.shape)} but b has {tuple(b.shape)}")


def _threshold(b: Tensor, rtol: float, atol: float) -> Tensor:
    return torch.clamp(rtol * torch.linalg.vector_norm(b), min=atol)


def _safe_div(num: Tensor, den: Tensor, ok: Tensor) -> Tensor:
    """num / den where ``ok``, 0 elsewhere (no NaN or inf leaks through the masked branch)."""
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def cg_state(matvec: Matvec, b: Tensor, x0: Optional[Tensor] = None, max_iter: int = 5,
             rtol: float = 0.0, atol: float = 0.0, early_stop: bool = True) -> SolveState:
    """Conjugate gradient as tensors (vmap-safe with ``early_stop=False``)."""
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - matvec(x) if x0 is not None else b.clone()
    p, rs = r, r @ r
    thr = _threshold(b, rtol, atol)
    breakdown = ~torch.isfinite(rs)
    neg = torch.zeros_like(breakdown)
    active = ~breakdown & (rs.sqrt() > thr)
    matvecs = torch.zeros((), dtype=torch.int64, device=b.device)
    hist = [rs.sqrt()]
    for _ in range(max_iter):
        if early_stop and not bool(active):
            break
        Ap = matvec(p)
        matvecs = matvecs + active.long()
        pAp = p @ Ap
        finite = torch.isfinite(pAp)
        breakdown = breakdown | (active & ~finite)
        neg = neg | (active & finite & (pAp <= 0))
        ok = active & finite & (pAp > 0)
        alpha = _safe_div(rs, pAp, ok)
        r_new = r - alpha * Ap
        rs_new = r_new @ r_new
        breakdown = breakdown | (ok & ~torch.isfinite(rs_new))
        ok = ok & torch.isfinite(rs_new)
        x = torch.where(ok, x + alpha * p, x)
        r = torch.where(ok, r_new, r)
        beta = _safe_div(rs_new, rs, ok & (rs > 0))
        p = torch.where(ok, r + beta * p, p)
        rs = torch.where(ok, rs_new, rs)
        hist.append(rs.sqrt())
        active = ok & (rs.sqrt() > thr)
    return SolveState(x, rs.sqrt(), matvecs, neg, breakdown, torch.stack(hist))


def minres_state(matvec: Matvec, b: Tensor, x0: Optional[Tensor] = None, max_iter: int = 5,
                 rtol: float = 0.0, atol: float = 0.0, early_stop: bool = True) -> SolveState:
    """MINRES as tensors (vmap-safe with ``early_stop=False``): the Lanczos recurrence with
    Givens rotations of Paige & Saunders (1975), without preconditioner. The residual norm is
    the recurrence's φ̄, equal to ‖b − A x_k‖ in exact arithmetic."""
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r1 = b - matvec(x) if x0 is not None else b.clone()
    zero = r1.new_zeros(())
    beta = torch.linalg.vector_norm(r1)
    thr = _threshold(b, rtol, atol)
    breakdown = ~torch.isfinite(beta)
    neg = torch.zeros_like(breakdown)
    active = ~breakdown & (beta > thr)
    matvecs = torch.zeros((), dtype=torch.int64, device=b.device)
    y, r2 = r1, r1
    old_beta, dbar, eps, phibar = zero, zero, zero, beta
    cs, sn = -torch.ones_like(zero), zero
    w, w2 = torch.zeros_like(b), torch.zeros_like(b)
    hist = [phibar]
    tiny = torch.finfo(b.dtype).tiny
    for k in range(max_iter):
        if early_stop and not bool(active):
            break
        v = _safe_div(y, beta, active & (beta > 0))
        Av = matvec(v)
        matvecs = matvecs + active.long()
        y_new = Av - (beta / old_beta) * r1 if k > 0 else Av
        alpha = v @ y_new
        y_new = y_new - _safe_div(alpha, beta, beta > 0) * r2
        beta_new = torch.linalg.vector_norm(y_new)
        finite = torch.isfinite(alpha) & torch.isfinite(beta_new)
        breakdown = breakdown | (active & ~finite)
        ok = active & finite
        neg = neg | (ok & (alpha <= 0))
        # the Givens rotation that keeps the tridiagonal system upper-triangular
        delta = cs * dbar + sn * alpha
        gbar = sn * dbar - cs * alpha
        eps_new = sn * beta_new
        dbar_new = -cs * beta_new
        gamma = torch.clamp(torch.sqrt(gbar * gbar + beta_new * beta_new), min=tiny)
        cs_new, sn_new = gbar / gamma, beta_new / gamma
        phi = cs_new * phibar
        w_new = (v - eps * w2 - delta * w) / gamma
        # commit where active
        x = torch.where(ok, x + phi * w_new, x)
        w2, w = torch.where(ok, w, w2), torch.where(ok, w_new, w)
        r1, r2 = torch.where(ok, r2, r1), torch.where(ok, y_new, r2)
        y = torch.where(ok, y_new, y)
        old_beta, beta = torch.where(ok, beta, old_beta), torch.where(ok, beta_new, beta)
        eps, dbar = torch.where(ok, eps_new, eps), torch.where(ok, dbar_new, dbar)
        cs, sn = torch.where(ok, cs_new, cs), torch.where(ok, sn_new, sn)
        phibar = torch.where(ok, sn_new * phibar, phibar)
        hist.append(phibar)
        # beta = 0: the Krylov space is invariant, x is exact
        active = ok & (phibar > thr) & (beta_new > 0)
    return SolveState(x, phibar, matvecs, neg, breakdown, torch.stack(hist))


def solve_result(state: SolveState, solver: str, rtol: float = 0.0, atol: float = 0.0,
                 b_norm: Optional[float] = None) -> LinearSolveResult:
    """A ``LinearSolveResult`` of one system's ``SolveState`` (``rtol``/``atol`` as it was solved;
    ``b_norm``: ‖b‖, by default its first residual, as it is from x0 = 0)."""
    iters = int(state.iterations)
    hist = state.history.tolist()
    # the history repeats its last value once frozen; the matvec that found a breakdown (or,
    # in CG, negative curvature) updated nothing: keep the accepted updates
    rejected_last = bool(state.breakdown) or (solver == "cg" and bool(state.negative_curvature))
    hist = hist[:max(iters - rejected_last, 0) + 1]
    thr = max(rtol * (hist[0] if b_norm is None else b_norm), atol)
    return LinearSolveResult(x=state.x, residual_norms=hist, iterations=iters,
                             converged=bool(state.residual <= thr),
                             negative_curvature=bool(state.negative_curvature),
                             breakdown=bool(state.breakdown), solver=solver)


def conjugate_gradient(matvec: Matvec, b: Tensor, x0: Optional[Tensor] = None,
                       max_iter: int = 5, rtol: float = 0.0, atol: float = 0.0,
                       on_negative_curvature: str = "stop") -> LinearSolveResult:
    """Solve A x = b for symmetric positive-definite A by conjugate gradient.

    Stops when ‖r‖ ≤ max(rtol‖b‖, atol) (the δ′ of Algorithm 2), after ``max_iter`` matvecs, on
    negative curvature (see the module's policy; ``on_negative_curvature`` is 'stop' or
    'raise'), or on breakdown; the result says which. The iterate returned is always finite.
    """
    _check(b, x0, max_iter, rtol, atol)
    if on_negative_curvature not in CG_POLICIES:
        raise ValueError(f"on_negative_curvature must be one of {CG_POLICIES}, "
                         f"got {on_negative_curvature!r}")
    res = solve_result(cg_state(matvec, b, x0, max_iter, rtol, atol), "cg", rtol, atol,
                       float(torch.linalg.vector_norm(b)))
    if res.negative_curvature and on_negative_curvature == "raise":
        raise NegativeCurvatureError(
            f"CG met negative curvature after {res.iterations} matvecs: the system is not "
            "positive definite (for iMAML: the inner problem is not at a minimum of G); use "
            "minres, the Gauss-Newton curvature, a larger lam or a better-solved inner problem")
    return res


def minres(matvec: Matvec, b: Tensor, x0: Optional[Tensor] = None, max_iter: int = 5,
           rtol: float = 0.0, atol: float = 0.0) -> LinearSolveResult:
    """Solve A x = b for symmetric A, definite or indefinite, by MINRES.

    x_k minimises ‖b − A x‖ over x0 + the k-th Krylov space, so the residual never grows. Stops
    when ‖r‖ ≤ max(rtol‖b‖, atol), after ``max_iter`` matvecs, or on breakdown.
    """
    _check(b, x0, max_iter, rtol, atol)
    return solve_result(minres_state(matvec, b, x0, max_iter, rtol, atol), "minres", rtol, atol,
                        float(torch.linalg.vector_norm(b)))


LINEAR_SOLVERS = {"cg": cg_state, "minres": minres_state}


def neumann_series(matvec: Matvec, b: Tensor, num_terms: int = 20, alpha: float = 1.0) -> Tensor:
    """Approximate A⁻¹ b by the truncated Neumann series α Σ_{k<num_terms} (I − αA)^k b.

    Converges when the spectral radius of I − αA is below one (0 < α < 2/λ_max for SPD A).
    Used by some implicit-gradient papers (Lorraine et al. 2020); here a second method to
    compare CG against.
    """
    if num_terms < 1:
        raise ValueError(f"num_terms must be >= 1, got {num_terms}")
    term = alpha * b
    total = term.clone()
    for _ in range(num_terms - 1):
        term = term - alpha * matvec(term)
        total = total + term
    return total


def dense_matrix(matvec: Matvec, n: int, dtype=torch.float64, device=None) -> Tensor:
    """Materialise the n x n matrix of a linear map column by column (small problems only)."""
    eye = torch.eye(n, dtype=dtype, device=device)
    return torch.stack([matvec(eye[i]) for i in range(n)], dim=1)


def dense_solve(matvec: Matvec, b: Tensor) -> Tensor:
    """Exact solve of A x = b by building A densely and calling ``torch.linalg.solve``."""
    A = dense_matrix(matvec, b.numel(), dtype=b.dtype, device=b.device)
    return torch.linalg.solve(A, b)
