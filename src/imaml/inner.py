"""Inner solvers for the proximal problem min_φ G(φ) = L̂(φ) + (λ/2)‖φ − θ‖².

Each solver stops after ``steps`` iterations or as soon as ‖∇G(φ)‖ ≤ λ·tol, which for a
λ-strongly-convex G guarantees ‖φ − φ*‖ ≤ tol (the δ of Algorithm 2); with one λ per parameter
(Λ = diag λᵢ) the test is ‖Λ⁻¹∇G(φ)‖ ≤ tol (``_Solver._met``). Each reports what it
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

import math
from dataclasses import dataclass, field, replace
from typing import Callable, List, NamedTuple, Optional

import torch
from torch import Tensor

from . import checks
from .functional import NonFiniteError, ProximalProblem, check_finite
from .linear import cg_state

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
        damping: Newton-CG only: the Levenberg–Marquardt μ the solve ended with (0: undamped).
        moments: Adam with ``carry`` only: its final moments [m, v] ([2, P]).
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
    damping: float = 0.0
    moments: Optional[Tensor] = None


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
    checks.whole("steps", steps, minimum=0)
    checks.number("tol", tol, minimum=0)  # an infinite tol would "converge" at step 0
    if lr is not None:
        checks.number("lr", lr, positive=True)


def _norm(g: Tensor) -> Tensor:
    return torch.linalg.vector_norm(g.detach())


def _grad_at(problem: ProximalProblem, phi: Tensor) -> Tensor:
    """∇G(φ) at a returned φ, without a graph."""
    with torch.no_grad():
        return problem.grad(phi.detach()).detach()


class _Solver:
    steps: int
    tol: float
    report: bool
    adaptive: bool = False

    def _met(self, problem: ProximalProblem, g: Tensor, n: Tensor) -> Tensor:
        """Whether ∇G = g (of norm n) meets the tolerance: ‖∇G‖ ≤ λ·tol, and with one λ per
        parameter (Λ = diag λᵢ) ‖Λ⁻¹∇G‖ ≤ tol, the same test for a scalar λ: the distance
        to φ* of a Newton step on the proximal term alone (φ − φ* = Λ⁻¹∇G exactly where L̂
        is locally flat). The bound ‖∇G‖ ≤ λ_min·tol would be stricter, and unattainable where
        a tensor's λ is small: a learned λ of 0.08 on the head made it 25x smaller than the
        other tensors' test, and 91% of the solves missed it (RESULTS.md, learned λ). Without
        a tolerance (tol 0) it never holds."""
        if self.tol <= 0:
            return torch.zeros((), dtype=torch.bool, device=g.device)
        if isinstance(problem.lam, Tensor):
            return _norm(g / problem.lam) <= self.tol
        return n <= problem.lam * self.tol

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
        g = _grad_at(problem, s.phi)  # the one extra gradient a report costs
        n = _norm(g)
        missing = torch.isnan(s.grad_norm)
        converged = s.converged | (missing & self._met(problem, g, n))
        return s._replace(grad_norm=torch.where(missing, n, s.grad_norm), converged=converged,
                          history=torch.cat([s.history, n.reshape(1)]))

    def solve(self, problem: ProximalProblem, phi0: Tensor, steps: Optional[int] = None
              ) -> InnerResult:
        """Solve one task's inner problem from φ₀ (usually θ)."""
        return self._result(self.state(problem, phi0, steps, early_stop=True))

    def _result(self, s: InnerState) -> InnerResult:
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
        phi = phi0
        done = torch.zeros((), dtype=torch.bool, device=phi0.device)
        taken = torch.zeros((), dtype=torch.int64, device=phi0.device)
        hist, last = [], None
        for _ in range(steps):
            g = problem.grad(phi)
            n = _norm(g)
            hist.append(n)
            if self.tol > 0:  # a task that met the tolerance stays where it met it
                done = done | self._met(problem, g, n)
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
        f, g = problem.value_and_grad(phi0)
        n = _norm(g)
        done = self._met(problem, g, n)
        zero = torch.zeros((), dtype=torch.int64, device=phi0.device)
        return AdaptiveCarry(phi0, f, g, n, phi0.new_full((), self.lr), done, zero, zero,
                             f.detach().expand(self.memory).clone())

    def adaptive_step(self, problem: ProximalProblem, c: "AdaptiveCarry") -> "AdaptiveCarry":
        """One accept/reject iteration (a task that has converged stays frozen)."""
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
        n, g = torch.where(accept, nt, n), torch.where(accept, gt, g)
        return AdaptiveCarry(
            torch.where(accept, trial, phi), torch.where(accept, ft, f), g, n,
            torch.where(accept, next_lr, torch.where(reject, 0.5 * lr, lr)),
            done | self._met(problem, g, n), c.taken + accept.long(),
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
            tol = self.tol > 0
            newly = ~done & self._met(problem, g, n) if tol else done
            if tol:  # converged at y: stay there, without momentum
                last = torch.where(newly, n, last)
                done = done | newly
            trial = y - lr * g
            if not self.adaptive:
                if tol:
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
            if early_stop and tol and bool(done):
                break
        history = torch.stack(hist) if hist else phi0.new_zeros(0)
        return self._final(problem, InnerState(phi, torch.where(done, last, nan), done, taken,
                                               rejected, history), early_stop)


@dataclass
class Adam(_Solver):
    """Adam (Kingma & Ba 2015) on G, optionally on mini-batches of ``batch_size`` support
    examples: Reptile's inner loop (Nichol et al. 2018 use lr 1e-3, β1 = 0, β2 = 0.999,
    batches of 10 of 10 shots x 5 ways in training, 5 iterations). It runs all ``steps`` (a
    mini-batch gradient cannot tell that G is minimised); with ``tol`` or ``report`` the full
    ‖∇G‖ at the returned φ is evaluated and reported.

    Its moments start at zero for every task, or, with ``m0``/``v0``/``t0`` (``with_moments``),
    from moments carried over ``t0`` earlier steps. Reptile's own code
    (openai/supervised-reptile, which made the paper's numbers) never resets Adam: its
    moments run on across tasks and meta-iterations, and test-time adaptation starts from
    them too. With ``carry=True`` a solve also returns its final moments (``moments`` in the
    result: [m, v]); the trainer carries their mean over a meta-batch's tasks into the next
    meta-iteration (config ``inner_carry``), so tasks computed together, in a batch or on
    other processes, start from the same moments: the moments of tasks taken one after
    another, as in that code, average over fewer tasks per step but estimate the same E[g²]."""

    lr: float = 1e-3
    steps: int = 5
    beta1: float = 0.0
    beta2: float = 0.999
    eps: float = 1e-8
    batch_size: Optional[int] = None
    tol: float = 0.0
    report: bool = False
    carry: bool = False
    m0: Optional[Tensor] = None
    v0: Optional[Tensor] = None
    t0: int = 0

    def __post_init__(self):
        _check_args(self.steps, self.tol, self.lr)
        if self.t0 < 0 or (self.m0 is None) != (self.v0 is None):
            raise ValueError("carried moments need m0, v0 and a step count t0 >= 0 together")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"beta1 and beta2 must lie in [0, 1), got {self.beta1}, {self.beta2}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1 (or None: full batch), got {self.batch_size}")

    def with_moments(self, m: Tensor, v: Tensor, t: int) -> "Adam":
        """This solver, starting every task from the moments (m, v) of t earlier steps."""
        return replace(self, m0=m.detach(), v0=v.detach(), t0=int(t))

    def state(self, problem: ProximalProblem, phi0: Tensor, steps: Optional[int] = None,
              early_stop: bool = False) -> InnerState:
        return self.run(problem, phi0, steps, early_stop)[0]

    def run(self, problem: ProximalProblem, phi0: Tensor, steps: Optional[int] = None,
            early_stop: bool = False):
        """(InnerState, the final moments [m, v] stacked, [2, P])."""
        steps = self.steps if steps is None else steps
        phi = phi0
        m = torch.zeros_like(phi0) if self.m0 is None else self.m0.to(phi0)
        v = torch.zeros_like(phi0) if self.v0 is None else self.v0.to(phi0)
        hist = []
        for k in range(steps):
            g = (problem.grad(phi) if self.batch_size is None
                 else problem.batch_grad(phi, k, self.batch_size))
            hist.append(_norm(g))
            m = self.beta1 * m + (1 - self.beta1) * g
            v = self.beta2 * v + (1 - self.beta2) * g * g
            t = self.t0 + k + 1
            m_hat = m / (1 - self.beta1 ** t)
            v_hat = v / (1 - self.beta2 ** t)
            phi = phi - self.lr * m_hat / (v_hat.sqrt() + self.eps)
        taken = torch.full((), steps, dtype=torch.int64, device=phi0.device)
        history = torch.stack(hist) if hist else phi0.new_zeros(0)
        nan = phi0.new_full((), float("nan"))
        state = InnerState(phi, nan, torch.zeros((), dtype=torch.bool, device=phi0.device),
                           taken, torch.zeros_like(taken), history)
        return self._final(problem, state, early_stop), torch.stack([m, v])

    def solve(self, problem: ProximalProblem, phi0: Tensor, steps: Optional[int] = None
              ) -> InnerResult:
        s, moments = self.run(problem, phi0, steps, early_stop=True)
        result = self._result(s)
        if self.carry:
            result.moments = moments.detach()
        return result


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
    A meta-batch runs under ``vmap`` (``imaml.batched``): every task has its own step, damping
    and stopping state, and the batch backtracks until each task has accepted a step (``run``).

    **Damping** (``damping`` μ₀ > 0; Levenberg–Marquardt, as in Martens 2010): the direction
    solves (∇²G + μI) d = −∇G instead. Where the network Hessian makes ∇²G indefinite, a
    large enough μ makes the system positive definite, so CG runs its iterations instead of
    stopping at the first direction of negative curvature. μ adapts per task after each
    accepted step from the reduction ratio ρ = (G(φ + t d) − G(φ)) / q(t d), q the undamped
    quadratic model: μ·2/3 when ρ > 3/4, μ·3/2 when ρ < 1/4, and μ·3/2 whenever CG still met
    negative curvature. ``damping=0`` (the default) is plain Newton-CG with Steihaug's rule.
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
    damping: float = 0.0

    def __post_init__(self):
        _check_args(self.steps, self.tol)
        if not (math.isfinite(self.damping) and self.damping >= 0):
            raise ValueError(f"damping must be a finite number >= 0, got {self.damping}")
        if checks.whole("cg_iters", self.cg_iters) < 1:
            raise ValueError(f"cg_iters must be >= 1, got {self.cg_iters}")
        if not 0 < self.backtrack < 1 or not 0 < self.armijo < 1:
            raise ValueError("backtrack and armijo must lie in (0, 1)")

    def solve(self, problem: ProximalProblem, phi0: Tensor, steps: Optional[int] = None
              ) -> InnerResult:
        ops = NewtonOps(
            evaluate=lambda phi: self.evaluate(problem, phi),
            direction=lambda phi, g, mu: self.direction(problem, phi, g, mu, early_stop=True),
            value=lambda phi, d, t: problem.value(phi + t * d).detach())
        s = self.run(ops, phi0, steps)
        st = s.inner
        result = InnerResult(phi=st.phi, steps=int(st.steps), converged=bool(st.converged),
                             grad_norms=st.history.tolist(), evaluations=int(s.evaluations),
                             negative_curvature=int(s.negative_curvature),
                             line_search_failures=int(s.line_search_failed),
                             damping=float(s.damping))
        if bool(torch.isfinite(st.grad_norm)):
            result.grad_norm = float(st.grad_norm)
        result.stop_reason = ("tolerance" if result.converged else
                              "line_search" if result.line_search_failures else "step_cap")
        return result

    # The pieces of one Newton iteration that touch the problem, for one task; the batched
    # path (imaml.batched) vmaps them over the tasks of a meta-batch, and ``run`` drives
    # either, so one implementation serves both.

    def evaluate(self, problem: ProximalProblem, phi: Tensor):
        """(G, ∇G, ‖∇G‖, whether the tolerance is met) at φ."""
        f, g = problem.value_and_grad(phi)
        f, g = f.detach(), g.detach()
        n = _norm(g)
        return f, g, n, self._met(problem, g, n)

    def direction(self, problem: ProximalProblem, phi: Tensor, g: Tensor, mu: Tensor,
                  early_stop: bool = False):
        """CG on (∇²G + μI) d = −∇G: (d, gᵀd, whether the system proved indefinite or d was
        replaced by −∇G, whether CG met negative curvature, ‖d‖²)."""
        hvp = problem.hvp(phi, self.hvp_mode)
        cg = cg_state(lambda v: hvp(v) + mu * v, -g, max_iter=self.cg_iters,
                      early_stop=early_stop)
        d = cg.x.detach()
        slope = torch.dot(g, d)
        fallback = cg.breakdown | ~(slope < 0)
        d = torch.where(fallback, -g, d)
        slope = torch.where(fallback, -torch.dot(g, g), slope)
        return d, slope, fallback | cg.negative_curvature, cg.negative_curvature, torch.dot(d, d)

    def run(self, ops: "NewtonOps", phi0: Tensor, steps: Optional[int] = None) -> "NewtonState":
        """Newton-CG iterations from φ₀ for one task (φ₀ [P]) or a batch ([B, P], with ``ops``
        vmapped). A task that met its tolerance or whose line search failed is frozen; the
        loop ends once no task is active. The line search tries each task's own step until
        every task has accepted one or run out of halvings."""
        steps = self.steps if steps is None else steps
        phi = phi0.detach()
        f, g, n, met = ops.evaluate(phi)
        check_finite(g, "inner gradient")
        check_finite(f, "inner objective")
        count = torch.zeros(n.shape, dtype=torch.int64, device=phi.device)
        done, failed = met, torch.zeros_like(met)
        t_last = torch.full_like(n, 0.5)  # so that the first trial is the Newton step, t = 1
        mu = torch.full_like(n, self.damping)
        taken, evals, neg = count, count, count
        hist, current = [n], True
        for k in range(steps):
            active = ~(done | failed)
            if not bool(active.any()):
                break
            d, slope, indefinite, negc, dd = ops.direction(phi, g, mu)
            neg = neg + (active & negc).long()
            t = torch.clamp(2 * t_last, max=1.0) if self.warm_start else torch.ones_like(t_last)
            searching, t_acc, f_acc = active, torch.zeros_like(t), f
            for _ in range(self.max_backtracks):
                ft = ops.value(phi, d, t)
                evals = evals + searching.long()
                ok = searching & torch.isfinite(ft) & (ft <= f + self.armijo * t * slope)
                t_acc, f_acc = torch.where(ok, t, t_acc), torch.where(ok, ft, f_acc)
                searching = searching & ~ok
                if not bool(searching.any()):
                    break
                t = torch.where(searching, t * self.backtrack, t)
            # no decrease along d: the same direction would fail again, so that task stops
            failed = failed | searching
            accepted = active & ~searching
            if not bool(accepted.any()):
                continue
            if self.damping > 0:
                mu = torch.where(accepted, _adapt_damping(mu, f_acc - f, t_acc, slope, dd,
                                                          indefinite), mu)
            t_last = torch.where(accepted, t_acc, t_last)
            phi = torch.where(accepted[..., None], phi + t_acc[..., None] * d, phi)
            taken = taken + accepted.long()
            current = k + 1 < steps or self.tol > 0 or self.report
            if current:  # (after the last step only when a tolerance or a report needs it)
                f, g, n_new, met = ops.evaluate(phi)
                check_finite(g, "inner gradient")
                check_finite(f, "inner objective")
                n = torch.where(accepted, n_new, n)
                done = done | (accepted & met)
                hist.append(n)
        grad_norm = n if current else torch.full_like(n, float("nan"))
        return NewtonState(InnerState(phi, grad_norm, done, taken, evals - taken,
                                      torch.stack(hist, -1)), evals, neg, failed, mu)


def _adapt_damping(mu: Tensor, actual: Tensor, t: Tensor, slope: Tensor, dd: Tensor,
                   indefinite: Tensor) -> Tensor:
    """Levenberg–Marquardt μ after a step t·d that changed G by ``actual``. CG's iterate x of
    A x = b has xᵀA x = bᵀx, so with A = ∇²G + μI and b = −∇G the undamped quadratic model
    changes by q(t d) = t gᵀd + ½t²(−gᵀd − μ‖d‖²); ρ = actual / q. Where CG met negative
    curvature (or its direction was unusable) μ was too small: it grows."""
    predicted = t * slope - 0.5 * t * t * (slope + mu * dd)
    rho = torch.where(predicted < 0, actual / torch.where(predicted < 0, predicted, -1.0), 0.0)
    new = torch.where(rho > 0.75, mu * (2 / 3), torch.where(rho < 0.25, mu * 1.5, mu))
    return torch.where(indefinite, mu * 1.5, new)


class NewtonOps(NamedTuple):
    """What ``NewtonCG.run`` asks of the problem(s): ``evaluate(φ)``, ``direction(φ, g, μ)``
    (``NewtonCG.evaluate``/``direction`` for one task, or those vmapped over a batch) and
    ``value(φ, d, t)`` = G(φ + t d)."""

    evaluate: Callable
    direction: Callable
    value: Callable


class NewtonState(NamedTuple):
    """A Newton-CG solve as tensors: the ``InnerState`` plus Newton-CG's own counts
    (line-search evaluations, systems that met negative curvature, whether the line search
    failed, the final damping μ)."""

    inner: InnerState
    evaluations: Tensor
    negative_curvature: Tensor
    line_search_failed: Tensor
    damping: Tensor
