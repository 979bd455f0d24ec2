"""Inner solvers for the proximal problem min_φ G(φ) = L̂(φ) + (λ/2)‖φ − θ‖².

Each solver stops after ``steps`` iterations or as soon as ‖∇G(φ)‖ ≤ λ·tol, which for a
λ-strongly-convex G guarantees ‖φ − φ*‖ ≤ tol (the δ of Algorithm 2), and reports what it
reached. The solvers are plain differentiable arithmetic: run on a θ that requires grad, they
can be unrolled by autograd (that is how the MAML baselines reuse them); iMAML runs them on a
detached θ under ``torch.no_grad`` and never keeps their history.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import Tensor

from .functional import ProximalProblem, check_finite
from .linear import conjugate_gradient


@dataclass
class InnerResult:
    """Attributes:
        phi: the approximate minimiser.
        steps: iterations taken.
        grad_norm: ‖∇G(phi)‖ at the returned point, when it was evaluated (always when tol > 0
            or ``report=True``; None otherwise, to save a gradient).
        converged: grad_norm ≤ λ·tol.
        grad_norms: ‖∇G‖ at every point where a gradient was taken.
        line_search_failures: Newton-CG only: steps where backtracking found no decrease.
        negative_curvature: Newton-CG only: Newton systems where CG met negative curvature.
    """

    phi: Tensor
    steps: int = 0
    grad_norm: Optional[float] = None
    converged: bool = False
    grad_norms: List[float] = field(default_factory=list)
    line_search_failures: int = 0
    negative_curvature: int = 0


def _check_args(steps: int, tol: float, lr: Optional[float] = None) -> None:
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    if lr is not None and not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")


class _Solver:
    steps: int
    tol: float
    report: bool

    def _norm(self, g: Tensor, what: str, result: InnerResult) -> float:
        n = float(torch.linalg.vector_norm(g.detach()))
        result.grad_norms.append(n)
        if not n < float("inf"):
            check_finite(g.detach(), what)
        return n

    def _threshold(self, problem: ProximalProblem) -> float:
        return problem.lam * self.tol

    def _finish(self, problem: ProximalProblem, result: InnerResult) -> InnerResult:
        if not result.converged and (self.tol > 0 or self.report):
            with torch.no_grad():
                result.grad_norm = self._norm(problem.grad(result.phi.detach()),
                                              "inner gradient", result)
            result.converged = result.grad_norm <= self._threshold(problem)
        return result


@dataclass
class GradientDescent(_Solver):
    """φ ← φ − lr ∇G(φ), from φ₀ = θ."""

    lr: float = 0.1
    steps: int = 16
    tol: float = 0.0
    report: bool = False

    def __post_init__(self):
        _check_args(self.steps, self.tol, self.lr)

    def solve(self, problem: ProximalProblem, phi0: Tensor, steps: Optional[int] = None
              ) -> InnerResult:
        steps = self.steps if steps is None else steps
        result = InnerResult(phi=phi0)
        phi, thr = phi0, self._threshold(problem)
        for _ in range(steps):
            g = problem.grad(phi)
            n = self._norm(g, "inner gradient", result)
            if n <= thr:
                result.grad_norm, result.converged = n, True
                break
            phi = phi - self.lr * g
            result.steps += 1
        result.phi = phi
        return self._finish(problem, result)


@dataclass
class Nesterov(_Solver):
    """Nesterov's accelerated gradient: y = φ + μ(φ − φ_prev), φ ← y − lr ∇G(y).

    For an L-smooth, λ-strongly-convex G, lr = 1/L and μ = (√κ − 1)/(√κ + 1) with κ = L/λ
    give the √κ log(1/δ) rate of the paper's Table 1.
    """

    lr: float = 0.1
    momentum: float = 0.9
    steps: int = 16
    tol: float = 0.0
    report: bool = False

    def __post_init__(self):
        _check_args(self.steps, self.tol, self.lr)
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")

    def solve(self, problem: ProximalProblem, phi0: Tensor, steps: Optional[int] = None
              ) -> InnerResult:
        steps = self.steps if steps is None else steps
        result = InnerResult(phi=phi0)
        phi_prev = phi = phi0
        thr = self._threshold(problem)
        for _ in range(steps):
            y = phi + self.momentum * (phi - phi_prev)
            g = problem.grad(y)
            n = self._norm(g, "inner gradient", result)
            if n <= thr:
                phi, result.grad_norm, result.converged = y, n, True
                break
            phi_prev, phi = phi, y - self.lr * g
            result.steps += 1
        result.phi = phi
        return self._finish(problem, result)


@dataclass
class NewtonCG(_Solver):
    """Hessian-free Newton (Martens 2010) for G: the direction solves ∇²G d = −∇G with
    ``cg_iters`` CG steps (5 in iMAML-HF), then a backtracking Armijo line search.

    Network Hessians are indefinite: when CG meets negative curvature it stops and returns
    the last iterate (Steihaug's rule), which is still a descent direction; if that leaves no
    descent direction, the step falls back to −∇G. A line search that finds no decrease in
    ``max_backtracks`` halvings leaves φ where it was, ends the solve and is counted in the result.
    """

    steps: int = 10
    cg_iters: int = 5
    tol: float = 0.0
    armijo: float = 1e-4
    backtrack: float = 0.5
    max_backtracks: int = 20
    hvp_mode: str = "rev-rev"
    report: bool = False

    def __post_init__(self):
        _check_args(self.steps, self.tol)
        if self.cg_iters < 1:
            raise ValueError(f"cg_iters must be >= 1, got {self.cg_iters}")
        if not 0 < self.backtrack < 1 or not 0 < self.armijo < 1:
            raise ValueError("backtrack and armijo must lie in (0, 1)")

    def solve(self, problem: ProximalProblem, phi0: Tensor, steps: Optional[int] = None
              ) -> InnerResult:
        steps = self.steps if steps is None else steps
        result = InnerResult(phi=phi0)
        phi, thr = phi0.detach(), self._threshold(problem)
        for _ in range(steps):
            f, g = problem.value_and_grad(phi)
            f, g = f.detach(), g.detach()
            n = self._norm(g, "inner gradient", result)
            check_finite(f, "inner objective")
            if n <= thr:
                result.grad_norm, result.converged = n, True
                break
            cg = conjugate_gradient(problem.hvp(phi, self.hvp_mode), -g, max_iter=self.cg_iters)
            result.negative_curvature += int(cg.negative_curvature)
            d = cg.x.detach()
            slope = torch.dot(g, d)
            if cg.breakdown or not slope < 0:
                d, slope = -g, -torch.dot(g, g)
            t = 1.0
            for _ in range(self.max_backtracks):
                trial = phi + t * d
                ft = problem.value(trial).detach()
                if torch.isfinite(ft) and ft <= f + self.armijo * t * slope:
                    phi = trial
                    break
                t *= self.backtrack
            else:
                # No decrease along d: the same direction would fail again, so stop here.
                result.line_search_failures += 1
                break
            result.steps += 1
        result.phi = phi
        return self._finish(problem, result)


SOLVERS = {"gd": GradientDescent, "nesterov": Nesterov, "newton-cg": NewtonCG}
