"""Inner solvers for the proximal problem min_φ G(φ) = L̂(φ) + (λ/2)‖φ − θ‖².

Each solver stops after ``steps`` iterations or as soon as ‖∇G(φ)‖ ≤ λ·tol, which for a
λ-strongly-convex G guarantees ‖φ − φ*‖ ≤ tol (the δ of Algorithm 2), and reports what it
reached and why it stopped (``stop_reason``: 'tolerance', 'step_cap' or 'line_search').

One implementation of gradient descent and of Nesterov serves a single task and a
``torch.func.vmap`` batch of tasks (in the manner of jaxopt's solvers): ``state(problem, phi0,
early_stop)`` runs the iterations as plain tensor arithmetic and freezes a task that has met its
tolerance by masking. A single task (``solve``) also leaves the loop once it has converged, at
the price of one host synchronisation per step, and only when a tolerance is set; the batched
path runs every step. Both are plain differentiable arithmetic: run on a θ that requires grad,
they can be unrolled by autograd (that is how the MAML baselines reuse them); iMAML runs them on
a detached θ under ``torch.no_grad`` and never keeps their history.

**Adaptive steps** (``adaptive=True``): a network's Hessian changes by orders of magnitude
across tasks and over meta-training, so no fixed step suits every G (too long a step makes GD
oscillate, and ‖∇G‖ then stalls or grows). With ``adaptive`` the step ``lr`` is only the first
trial: a trial step t that does not decrease G by at least (t/2)‖∇G‖² (Armijo's condition with
constant ½, which holds for any t ≤ 1/L on an L-smooth G) is rejected and t halved; an accepted
step lets the next trial grow by ``grow``. Every iteration costs one gradient (GD) or one
gradient and one objective value (Nesterov), rejected or not, so the step cap is a cost cap;
no iteration depends on data through Python control flow, so it batches under vmap.

**Barzilai–Borwein steps** (gradient descent, ``step_rule='bb'``): after an accepted step s with
gradient change y, the next trial step is s·s / s·y (the inverse of G's curvature along s; at
most 10x longer or shorter than the last, 10x longer where s·y ≤ 0), and a trial is accepted
when it decreases G below the largest of the last ``memory`` accepted values by the Armijo
margin (the non-monotone test of Grippo et al. 1986, Raydan 1997). On a trained Omniglot
Conv-4 the growth rule spent 6 of 16 steps halving 0.1 at θ (‖∇G‖ ≈ 35 there) and then grew
the step by 1.1 per step; BB adapts in one step (RESULTS.md, iMAML-GD row).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, NamedTuple, Optional

import torch
from torch import Tensor

from .functional import NonFiniteError, ProximalProblem, check_finite
from .linear import conjugate_gradient

STOP_REASONS = ("tolerance", "step_cap", "line_search")


@dataclass
class InnerResult:
    """Attributes:
        phi: the approximate minimiser.
        steps: steps taken (accepted steps, for adaptive and line-search solvers).
        grad_norm: ‖∇G(phi)‖ at the returned point, when it was evaluated (always when tol > 0,
            ``report=True`` or ``adaptive=True``; None otherwise, to save a gradient).
        converged: grad_norm ≤ λ·tol.
        grad_norms: ‖∇G‖ at every point where a gradient was taken and kept.
        stop_reason: 'tolerance' (converged), 'step_cap' (ran out of steps) or 'line_search'
            (Newton-CG: no decrease found along the last direction).
        rejected: adaptive solvers: trial steps rejected (and the step halved).
        line_search_failures: Newton-CG only: steps where backtracking found no decrease.
        negative_curvature: Newton-CG only: Newton systems where CG met negative curvature.
        evaluations: Newton-CG only: objective values computed by the line search.
    """

    phi: Tensor
    steps: int = 0
    grad_norm: Optional[float] = None
    converged: bool = False
    grad_norms: List[float] = field(default_factory=list)
    stop_reason: str = "step_cap"
    rejected: int = 0
    line_search_failures: int = 0
    negative_curvature: int = 0
    evaluations: int = 0


class InnerState(NamedTuple):
    """A solve as tensors (what the vmapped path returns).

    ``grad_norm`` is ‖∇G(phi)‖ where it was evaluated at the returned phi, NaN otherwise;
    ``history`` holds the ‖∇G‖ of every iteration (a task frozen by masking repeats its last).
    """

    phi: Tensor
    grad_norm: Tensor
    converged: Tensor
    steps: Tensor
    rejected: Tensor
    history: Tensor


def _check_args(steps: int, tol: float, lr: Optional[float] = None) -> None:
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if tol < 0 or tol != tol:
        raise ValueError(f"tol must be >= 0, got {tol}")
    if lr is not None and not 0 < lr < float("inf"):
        raise ValueError(f"lr must be > 0 and finite, got {lr}")


def _norm(g: Tensor) -> Tensor:
    return torch.linalg.vector_norm(g.detach())


def _grad_norm_at(problem: ProximalProblem, phi: Tensor) -> Tensor:
    """‖∇G(φ)‖ at a returned φ, without a graph (the one extra gradient a report costs)."""
    with torch.no_grad():
        return _norm(problem.grad(phi.detach()))


class _Solver:
    steps: int
    tol: float
    report: bool
    adaptive: bool = False

    def _threshold(self, problem: ProximalProblem) -> float:
        return problem.lam_min * self.tol

    def state(self, problem: ProximalProblem, phi0: Tensor, steps: Optional[int] = None,
              early_stop: bool = False) -> InnerState:
        raise NotImplementedError

    def _final(self, problem: ProximalProblem, s: InnerState, early_stop: bool) -> InnerState:
        """Where the iterations did not evaluate ‖∇G‖ at the returned φ and a tolerance or a
        report asks for it, one more gradient does (appended to the history)."""
        if not (self.tol > 0 or self.report):
            return s
        if early_stop and bool(torch.isfinite(s.grad_norm)):
            return s
        n = _grad_norm_at(problem, s.phi)
        missing = torch.isnan(s.grad_norm)
        thr = self._threshold(problem)
        converged = s.converged | (missing & (n <= thr)) if thr > 0 else s.converged
        return s._replace(grad_norm=torch.where(missing, n, s.grad_norm), converged=converged,
                          history=torch.cat([s.history, n.reshape(1)]))

    def solve(self, problem: ProximalProblem, phi0: Tensor, steps: Optional[int] = None
              ) -> InnerResult:
        """Solve one task's inner problem from φ₀ (usually θ)."""
        s = self.state(problem, phi0, steps, early_stop=True)
        history = s.history.tolist()  # one host synchronisation for the whole solve
        if not all(h < float("inf") for h in history):
            raise NonFiniteError(f"inner gradient is not finite (‖∇G‖ = {history[:4]}...); "
                                 "lower the learning rate, check the inputs for NaN, or raise lam")
        result = InnerResult(phi=s.phi, steps=int(s.steps), rejected=int(s.rejected),
                             grad_norms=history, converged=bool(s.converged))
        grad_norm = float(s.grad_norm)
        if grad_norm == grad_norm:
            result.grad_norm = grad_norm
        result.stop_reason = "tolerance" if result.converged else "step_cap"
        return result


def _sufficient_decrease(f: Tensor, f_trial: Tensor, lr: Tensor, grad_norm: Tensor,
                         otherwise: Tensor):
    """(accept, grow): Armijo's test with constant ½, G(φ − t∇G) ≤ G(φ) − (t/2)‖∇G‖², and
    whether the step may grow. Near a minimum the decrease it asks for falls below the
    rounding error of G itself; where the two values are equal to within that error the test
    cannot tell, ``otherwise`` decides (for gradient descent: whether ‖∇G‖ fell), and the step
    keeps its length."""
    eps = torch.finfo(f.dtype).eps
    flat = (f_trial - f).abs() <= 16 * eps * (f.abs() + 1)
    armijo = torch.isfinite(f_trial) & (f_trial <= f - 0.5 * lr * grad_norm * grad_norm)
    return armijo | (torch.isfinite(f_trial) & flat & otherwise), armijo & ~flat


@dataclass
class _FirstOrder(_Solver):
    """The settings gradient descent and Nesterov share: the step ``lr`` (the first trial step
    with ``adaptive``), ``steps``, the tolerance ``tol`` (δ), ``report`` (evaluate ‖∇G‖ at the
    returned φ even without a tolerance), and ``grow``, the factor an accepted adaptive step
    lets the next one grow by."""

    lr: float = 0.1
    steps: int = 16
    tol: float = 0.0
    report: bool = False
    adaptive: bool = False
    grow: float = 1.1

    def __post_init__(self):
        _check_args(self.steps, self.tol, self.lr)
        if not self.grow >= 1:
            raise ValueError(f"grow must be >= 1, got {self.grow}")


STEP_RULES = ("grow", "bb")
_BB_RANGE = 10.0  # a Barzilai–Borwein step is at most this factor longer or shorter than the last


@dataclass
class GradientDescent(_FirstOrder):
    """φ ← φ − lr ∇G(φ), from φ₀ = θ; with ``adaptive``, lr is adapted per task by accepting or
    rejecting each trial step (module docstring). ``step_rule`` (adaptive only): 'grow' (an
    accepted step lets the next grow by ``grow``) or 'bb' (Barzilai–Borwein steps with a
    non-monotone test over the last ``memory`` values of G; module docstring)."""

    step_rule: str = "grow"
    memory: int = 5

    def __post_init__(self):
        super().__post_init__()
        if self.step_rule not in STEP_RULES:
            raise ValueError(f"step_rule must be one of {STEP_RULES}, got {self.step_rule!r}")
        if self.step_rule != "grow" and not self.adaptive:
            raise ValueError(f"step_rule {self.step_rule!r} sizes adaptive steps: "
                             "set adaptive=True (in a config: inner_adaptive=true)")
        if self.memory < 1:
            raise ValueError(f"memory must be at least 1, got {self.memory}")

    def state(self, problem: ProximalProblem, phi0: Tensor, steps: Optional[int] = None,
              early_stop: bool = False) -> InnerState:
        steps = self.steps if steps is None else steps
        if self.adaptive:
            return self._adaptive(problem, phi0, steps, early_stop)
        thr = self._threshold(problem)
        phi = phi0
        done = torch.zeros((), dtype=torch.bool, device=phi0.device)
        taken = torch.zeros((), dtype=torch.int64, device=phi0.device)
        hist, last = [], None
        for _ in range(steps):
            g = problem.grad(phi)
            n = _norm(g)
            hist.append(n)
            if thr > 0:  # a task that met the tolerance stays where it met it
                done = done | (n <= thr)
                phi = torch.where(done, phi, phi - self.lr * g)
                taken = taken + (~done).long()
                last = n
                if early_stop and bool(done):
                    break
            else:
                phi = phi - self.lr * g
                taken = taken + 1
        nan = phi0.new_full((), float("nan"))
        # the last gradient was taken at the returned φ only if the solve stopped on it
        grad_norm = torch.where(done, last, nan) if last is not None else nan
        history = torch.stack(hist) if hist else phi0.new_zeros(0)
        return self._final(problem, InnerState(phi, grad_norm, done, taken,
                                               torch.zeros_like(taken), history), early_stop)

    def _adaptive(self, problem, phi0, steps, early_stop) -> InnerState:
        c = self.adaptive_start(problem, phi0)
        hist = [c.n]
        for _ in range(steps):
            if early_stop and self.tol > 0 and bool(c.done):
                break
            c = self.adaptive_step(problem, c)
            hist.append(c.n)
        return c.inner_state(torch.stack(hist))

    def adaptive_start(self, problem: ProximalProblem, phi0: Tensor) -> "AdaptiveCarry":
        """The state of an adaptive solve before its first iteration (with ``adaptive_step``,
        what lets a batched caller leave the loop once every task has converged)."""
        thr = self._threshold(problem)
        f, g = problem.value_and_grad(phi0)
        n = _norm(g)
        done = n <= thr if thr > 0 else torch.zeros((), dtype=torch.bool, device=phi0.device)
        zero = torch.zeros((), dtype=torch.int64, device=phi0.device)
        return AdaptiveCarry(phi0, f, g, n, phi0.new_full((), self.lr), done, zero, zero,
                             f.detach().expand(self.memory).clone())

    def adaptive_step(self, problem: ProximalProblem, c: "AdaptiveCarry") -> "AdaptiveCarry":
        """One accept/reject iteration (a task that has converged stays frozen)."""
        thr = self._threshold(problem)
        phi, f, g, n, lr, done = c.phi, c.f, c.g, c.n, c.lr, c.done
        bb = self.step_rule == "bb"
        recent = c.recent  # G at the last accepted points (the non-monotone test of 'bb')
        trial = phi - lr * g
        ft, gt = problem.value_and_grad(trial)
        nt = _norm(gt)
        f_ref = recent.max() if bb else f
        accept, grow = _sufficient_decrease(f_ref, ft, lr, n, nt < n)
        accept = accept & ~done
        reject = ~done & ~accept
        if bb:
            s, y = -lr * g, gt - g
            sy = torch.dot(s.detach(), y.detach())
            step = torch.where(sy > 0, lr * lr * n * n / sy, lr * _BB_RANGE)
            next_lr = step.clamp(lr / _BB_RANGE, lr * _BB_RANGE)
            recent = torch.where(accept, torch.cat([recent[1:], ft.detach().reshape(1)]), recent)
        else:
            next_lr = torch.where(grow, lr * self.grow, lr)
        n = torch.where(accept, nt, n)
        return AdaptiveCarry(
            torch.where(accept, trial, phi), torch.where(accept, ft, f),
            torch.where(accept, gt, g), n,
            torch.where(accept, next_lr, torch.where(reject, 0.5 * lr, lr)),
            done | (n <= thr) if thr > 0 else done, c.taken + accept.long(),
            c.rejected + reject.long(), recent)


class AdaptiveCarry(NamedTuple):
    """What an adaptive gradient-descent solve carries from one iteration to the next."""

    phi: Tensor
    f: Tensor
    g: Tensor
    n: Tensor
    lr: Tensor
    done: Tensor
    taken: Tensor
    rejected: Tensor
    recent: Tensor

    def inner_state(self, history: Tensor) -> InnerState:
        return InnerState(self.phi, self.n, self.done, self.taken, self.rejected, history)


@dataclass
class Nesterov(_FirstOrder):
    """Nesterov's accelerated gradient: y = φ + μ(φ − φ_prev), φ ← y − lr ∇G(y).

    For an L-smooth, λ-strongly-convex G, lr = 1/L and μ = (√κ − 1)/(√κ + 1) with κ = L/λ
    give the √κ log(1/δ) rate of the paper's Table 1. With ``adaptive``, each trial step from y
    is accepted or rejected as in the module docstring (a rejection halves lr and drops the
    momentum), and the momentum restarts whenever an accepted step raises G (the function-value
    restart of O'Donoghue & Candès 2015), which keeps the √κ rate without knowing κ.
    """

    momentum: float = 0.9

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")

    def state(self, problem: ProximalProblem, phi0: Tensor, steps: Optional[int] = None,
              early_stop: bool = False) -> InnerState:
        steps = self.steps if steps is None else steps
        thr = self._threshold(problem)
        mu = self.momentum
        phi_prev = phi = phi0
        done = torch.zeros((), dtype=torch.bool, device=phi0.device)
        taken = torch.zeros((), dtype=torch.int64, device=phi0.device)
        rejected = torch.zeros_like(taken)
        lr = phi0.new_full((), self.lr)
        f_phi = problem.value(phi0) if self.adaptive else None
        nan = phi0.new_full((), float("nan"))
        hist, last = [], nan
        for _ in range(steps):
            y = phi + mu * (phi - phi_prev)
            if self.adaptive:
                fy, g = problem.value_and_grad(y)
            else:
                g = problem.grad(y)
            n = _norm(g)
            hist.append(n)
            newly = ~done & (n <= thr) if thr > 0 else done
            if thr > 0:  # converged at y: stay there, without momentum
                last = torch.where(newly, n, last)
                done = done | newly
            trial = y - lr * g
            if not self.adaptive:
                if thr > 0:
                    phi_prev, phi = torch.where(done, y, phi), torch.where(done, y, trial)
                    taken = taken + (~done).long()
                else:
                    phi_prev, phi = phi, trial
                    taken = taken + 1
            else:
                ft = problem.value(trial)
                accept, grow = _sufficient_decrease(fy, ft, lr, n, torch.ones_like(done))
                accept = accept & ~done
                reject = ~done & ~accept
                restart = accept & (ft > f_phi)
                new_phi = torch.where(done, y, torch.where(accept, trial, phi))
                phi_prev = torch.where(done | reject | restart, new_phi, phi)
                phi = new_phi
                f_phi = torch.where(accept, ft, torch.where(newly, fy, f_phi))
                lr = torch.where(accept & grow, lr * self.grow, torch.where(reject, 0.5 * lr, lr))
                taken = taken + accept.long()
                rejected = rejected + reject.long()
            if early_stop and thr > 0 and bool(done):
                break
        history = torch.stack(hist) if hist else phi0.new_zeros(0)
        return self._final(problem, InnerState(phi, torch.where(done, last, nan), done, taken,
                                               rejected, history), early_stop)


@dataclass
class Adam(_Solver):
    """Adam (Kingma & Ba 2015) on G from fresh moments for every task, optionally on
    mini-batches of ``batch_size`` support examples: Reptile's inner loop (Nichol et al.
    2018 use lr 1e-3, β1 = 0, β2 = 0.999, batches of 10 of 10 shots x 5 ways in training, 5
    iterations). It runs all ``steps`` (a mini-batch gradient cannot tell that G is
    minimised); with ``tol`` or ``report`` the full ‖∇G‖ at the returned φ is evaluated and
    reported."""

    lr: float = 1e-3
    steps: int = 5
    beta1: float = 0.0
    beta2: float = 0.999
    eps: float = 1e-8
    batch_size: Optional[int] = None
    tol: float = 0.0
    report: bool = False

    def __post_init__(self):
        _check_args(self.steps, self.tol, self.lr)
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"beta1 and beta2 must lie in [0, 1), got {self.beta1}, {self.beta2}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1 (or None: full batch), got {self.batch_size}")

    def state(self, problem: ProximalProblem, phi0: Tensor, steps: Optional[int] = None,
              early_stop: bool = False) -> InnerState:
        steps = self.steps if steps is None else steps
        phi, m, v = phi0, torch.zeros_like(phi0), torch.zeros_like(phi0)
        hist = []
        for k in range(steps):
            g = (problem.grad(phi) if self.batch_size is None
                 else problem.batch_grad(phi, k, self.batch_size))
            hist.append(_norm(g))
            m = self.beta1 * m + (1 - self.beta1) * g
            v = self.beta2 * v + (1 - self.beta2) * g * g
            m_hat = m / (1 - self.beta1 ** (k + 1))
            v_hat = v / (1 - self.beta2 ** (k + 1))
            phi = phi - self.lr * m_hat / (v_hat.sqrt() + self.eps)
        taken = torch.full((), steps, dtype=torch.int64, device=phi0.device)
        history = torch.stack(hist) if hist else phi0.new_zeros(0)
        nan = phi0.new_full((), float("nan"))
        state = InnerState(phi, nan, torch.zeros((), dtype=torch.bool, device=phi0.device),
                           taken, torch.zeros_like(taken), history)
        return self._final(problem, state, early_stop)


@dataclass
class NewtonCG(_Solver):
    """Hessian-free Newton (Martens 2010) for G: the direction solves ∇²G d = −∇G with
    ``cg_iters`` CG steps (5 in iMAML-HF), then a backtracking Armijo line search.

    Network Hessians are indefinite: when CG meets negative curvature it stops and returns
    the last iterate (Steihaug's rule), which is still a descent direction; if that leaves no
    descent direction, the step falls back to −∇G. The line search starts from twice the last
    accepted step (at most 1, the Newton step): near a stall of Newton's method the accepted
    steps are short, and restarting at 1 each time spent most evaluations on halvings
    (scripts/probe_newton.py measured 760 against 206 objective evaluations over 100 steps). A
    line search that finds no decrease in ``max_backtracks`` halvings leaves φ where it was,
    ends the solve (``stop_reason`` 'line_search') and is counted in the result.
    Data-dependent by nature (the line search), so it is not batched.
    """

    steps: int = 10
    cg_iters: int = 5
    tol: float = 0.0
    armijo: float = 1e-4
    backtrack: float = 0.5
    max_backtracks: int = 20
    hvp_mode: str = "rev-rev"
    report: bool = False
    warm_start: bool = True

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
        t_last = 0.5  # so that the first trial is the Newton step, t = 1
        for _ in range(steps):
            f, g = problem.value_and_grad(phi)
            f, g = f.detach(), g.detach()
            n = float(_norm(g))
            result.grad_norms.append(n)
            check_finite(g, "inner gradient")
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
            t = min(1.0, 2 * t_last) if self.warm_start else 1.0
            for _ in range(self.max_backtracks):
                trial = phi + t * d
                ft = problem.value(trial).detach()
                result.evaluations += 1
                if torch.isfinite(ft) and ft <= f + self.armijo * t * slope:
                    phi, t_last = trial, t
                    break
                t *= self.backtrack
            else:
                # No decrease along d: the same direction would fail again, so stop here.
                result.line_search_failures += 1
                result.stop_reason = "line_search"
                break
            result.steps += 1
        result.phi = phi
        if not result.converged and (self.tol > 0 or self.report):
            n = _grad_norm_at(problem, phi)
            check_finite(n, "inner gradient")
            result.grad_norm = float(n)
            result.grad_norms.append(result.grad_norm)
            result.converged = result.grad_norm <= thr
        if result.converged:
            result.stop_reason = "tolerance"
        return result
