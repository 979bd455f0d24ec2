"""Inner solvers for the proximal problem min_φ G(φ) = L̂(φ) + (λ/2)‖φ − θ‖².

Each solver stops after ``steps`` iterations or as soon as ‖∇G(φ)‖ ≤ λ·tol, which bounds
‖φ − φ*‖ ≤ tol (the δ of Algorithm 2) where G is λ-strongly convex, and says why it stopped.
A solver is ``init(problem, φ₀) -> state`` and ``step(problem, state, k, last)`` on a NamedTuple
of tensors (jaxopt's and optax's shape); ONE driver, ``run``, owns the loop, the early exit, the
history and the final gradient, for one ``ProximalProblem`` or a ``Batch`` of them (the steps
vmapped over the tasks, a finished task frozen by masking). The iterations are differentiable
arithmetic: MAML unrolls them; iMAML runs them under ``torch.no_grad``. Step rules, restarts,
damping and the measurements behind them: the documentation's inner-solver page.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor
from torch.func import vmap

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
        rejected: trial steps rejected (adaptive solvers: and the step halved; Newton-CG: the
            line search's backtracks).
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


class Batch(NamedTuple):
    """The inner problems of a meta-batch for ``run``: ``make(x, y)`` builds the problem of one
    task's support set, ``xs``/``ys`` are the support sets stacked over the tasks."""

    make: Callable[[Any, Tensor], ProximalProblem]
    xs: Any
    ys: Tensor

    def map(self, fn: Callable, *args, shared: bool = False):
        """``fn(problem, *args)`` for every task, by ``vmap``: the args batched along dim 0, or
        the same for every task (``shared``)."""
        dims = (0, 0) + (None if shared else 0,) * len(args)
        return vmap(lambda x, y, *a: fn(self.make(x, y), *a), in_dims=dims)(self.xs, self.ys, *args)


def _map(problem, fn: Callable, *args):
    """``fn(problem, *args)`` for one problem, or for every task of a ``Batch``."""
    return problem.map(fn, *args) if isinstance(problem, Batch) else fn(problem, *args)


def run(solver: "_Solver", problem, phi0: Tensor, steps: Optional[int] = None,
        sync: bool = True) -> Tuple[NamedTuple, Tensor]:
    """Solve from φ₀ (usually θ): (the solver's final state, the history of ‖∇G‖).

    ``problem`` is a ``ProximalProblem`` (φ₀ [P]) or a ``Batch`` (φ₀ [B, P], or [P] for the
    same start for every task; the state and the history [B, K] then stacked over tasks).
    ``sync``: the loop may ask the host whether every task has finished, and leave (only where
    the solver can finish early); pass False inside a ``torch.func`` transform, where every
    step then runs. Where a tolerance or a report asks for ‖∇G‖ at the returned φ and the
    iterations did not evaluate it, one more gradient does (appended to the history)."""
    steps = solver.steps if steps is None else steps
    init, step = solver.init, solver.step
    if solver.mapped and isinstance(problem, Batch):
        shared = phi0.dim() == 1  # one φ₀ (θ) for every task
        if not (sync and solver.stops):  # nothing to leave early for: vmap the whole solve
            return problem.map(lambda q, p: run(solver, q, p, steps, sync=False), phi0,
                               shared=shared)
        init = lambda pr, p: pr.map(solver.init, p, shared=shared)  # noqa: E731
        step = lambda pr, s, k, last: pr.map(  # noqa: E731
            lambda q, s: solver.step(q, s, k, last), s)
    elif isinstance(problem, Batch) and phi0.dim() == 1:  # a solver that maps its own pieces
        phi0 = phi0.expand(len(problem.ys), -1)
    s = init(problem, phi0)
    hist = [s.grad_norm] if solver.logs_start else []
    stoppable = sync and solver.stops
    for k in range(steps):
        if stoppable and bool(solver.finished(s).all()):
            break
        s, n = step(problem, s, k, k + 1 == steps)
        if n is not None:
            hist.append(n)
    wanted = solver.tol > 0 or solver.report
    if wanted and not (sync and bool(torch.isfinite(s.grad_norm).all())):
        n, met = _map(problem, solver._norm_and_met, s.phi)  # the extra gradient a report costs
        missing = torch.isnan(s.grad_norm)
        s = s._replace(grad_norm=torch.where(missing, n, s.grad_norm),
                       converged=s.converged | (missing & met))
        hist.append(n)
    history = torch.stack(hist, -1) if hist else s.phi.new_zeros(s.phi.shape[:-1] + (0,))
    return s, history


def _check_args(steps: int, tol: float, lr: Optional[float] = None) -> None:
    checks.whole("steps", steps, minimum=0)
    checks.number("tol", tol, minimum=0)  # an infinite tol would "converge" at step 0
    if lr is not None:
        checks.number("lr", lr, positive=True)


def _norm(g: Tensor) -> Tensor:
    return torch.linalg.vector_norm(g.detach())


def _flags(phi0: Tensor):
    """(converged False, zero count, NaN): the shared fields of a state before any step."""
    zero = torch.zeros((), dtype=torch.int64, device=phi0.device)
    return torch.zeros((), dtype=torch.bool, device=phi0.device), zero, phi0.new_full((), math.nan)


class _Solver:
    """What ``run`` asks of a solver: ``init``/``step`` (per task when ``mapped``, else on a
    problem or a ``Batch`` as it is), ``logs_start`` (whether ``init`` evaluated ‖∇G(φ₀)‖, the
    history's first entry), ``stops`` (whether the loop can end before the step cap) and
    ``finished``; ``unrollable``: whether MAML may back-propagate through its iterations."""

    steps: int
    tol: float
    report: bool
    mapped = True
    logs_start = False
    unrollable = True  # its iterations are differentiable arithmetic that MAML can unroll

    @property
    def stops(self) -> bool:
        return self.tol > 0

    def finished(self, s) -> Tensor:
        return s.converged

    def _met(self, problem: ProximalProblem, g: Tensor, n: Tensor) -> Tensor:
        """Whether ∇G = g (of norm n) meets the tolerance: ‖∇G‖ ≤ λ·tol, and with one λ per
        parameter ‖Λ⁻¹∇G‖ ≤ tol (why not λ_min·tol: the inner-solver page). Never for tol 0."""
        if self.tol <= 0:
            return torch.zeros((), dtype=torch.bool, device=g.device)
        if isinstance(problem.lam, Tensor):
            return _norm(g / problem.lam) <= self.tol
        return n <= problem.lam * self.tol

    def _norm_and_met(self, problem: ProximalProblem, phi: Tensor):
        with torch.no_grad():
            g = problem.grad(phi.detach()).detach()
        n = _norm(g)
        return n, self._met(problem, g, n)

    def init(self, problem, phi0: Tensor):
        raise NotImplementedError

    def step(self, problem, s, k: int, last: bool):
        raise NotImplementedError

    def moments(self, s) -> Optional[Tensor]:
        """What a solve carries to the next meta-iteration (Adam's moments), or None."""
        return None

    def _extras(self, s) -> dict:
        return {}

    def solve(self, problem: ProximalProblem, phi0: Tensor, steps: Optional[int] = None
              ) -> InnerResult:
        """Solve one task's inner problem from φ₀ (usually θ)."""
        return self.result(*run(self, problem, phi0, steps))

    def result(self, s, history: Tensor) -> InnerResult:
        """The ``InnerResult`` of one task's final state and history (``run``)."""
        hist = history.tolist()  # one host synchronisation for the whole solve
        if not all(h < float("inf") for h in hist):
            raise NonFiniteError(f"inner gradient is not finite (‖∇G‖ = {hist[:4]}...); "
                                 "lower the learning rate, check the inputs for NaN, or raise lam")
        grad_norm = float(s.grad_norm)
        extras = self._extras(s)
        converged = bool(s.converged)
        stop = ("tolerance" if converged else
                "line_search" if extras.get("line_search_failures") else "step_cap")
        return InnerResult(phi=s.phi, steps=int(s.steps), rejected=int(s.rejected),
                           grad_norms=hist, converged=converged, stop_reason=stop,
                           grad_norm=grad_norm if grad_norm == grad_norm else None, **extras)


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


class GDState(NamedTuple):
    """Gradient descent's state: the shared fields, then G, ∇G and the trial step at φ, and G
    at the last ``memory`` accepted points (adaptive steps only; NaN without)."""

    phi: Tensor
    grad_norm: Tensor
    converged: Tensor
    steps: Tensor
    rejected: Tensor
    f: Tensor
    g: Tensor
    lr: Tensor
    recent: Tensor


@dataclass
class GradientDescent(_FirstOrder):
    """φ ← φ − lr ∇G(φ), from φ₀ = θ. With ``adaptive``, lr is only the first trial step t of
    each task: a trial that does not decrease G by (t/2)‖∇G‖² (Armijo's test with constant ½,
    met by any t ≤ 1/L on an L-smooth G) is rejected and t halved; every iteration costs one
    gradient, accepted or not. ``step_rule`` (adaptive only): 'grow' (an accepted step lets
    the next grow by ``grow``) or 'bb' (Barzilai–Borwein: after an accepted step s with
    gradient change y the next trial is s·s/s·y, within 10x of the last, 10x longer where
    s·y ≤ 0, accepted against the largest of the last ``memory`` accepted values of G: the
    non-monotone test of Grippo et al. 1986 and Raydan 1997)."""

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

    @property
    def logs_start(self) -> bool:
        return self.adaptive

    def init(self, problem: ProximalProblem, phi0: Tensor) -> GDState:
        no, zero, nan = _flags(phi0)
        lr = phi0.new_full((), self.lr)
        if not self.adaptive:
            return GDState(phi0, nan, no, zero, zero, nan, nan, lr, nan)
        f, g = problem.value_and_grad(phi0)
        n = _norm(g)
        return GDState(phi0, n, self._met(problem, g, n), zero, zero, f, g, lr,
                       f.detach().expand(self.memory).clone())

    def step(self, problem: ProximalProblem, s: GDState, k: int, last: bool):
        if self.adaptive:
            s = self._adaptive_step(problem, s)
            return s, s.grad_norm
        g = problem.grad(s.phi)
        n = _norm(g)
        if self.tol <= 0:
            return s._replace(phi=s.phi - self.lr * g, steps=s.steps + 1), n
        done = s.converged | self._met(problem, g, n)  # a task that met it stays where it met it
        return s._replace(phi=torch.where(done, s.phi, s.phi - self.lr * g),
                          grad_norm=torch.where(done, n, s.grad_norm), converged=done,
                          steps=s.steps + (~done).long()), n

    def _adaptive_step(self, problem: ProximalProblem, s: GDState) -> GDState:
        """One accept/reject iteration (a task that has converged stays frozen)."""
        phi, f, g, n, lr, done = s.phi, s.f, s.g, s.grad_norm, s.lr, s.converged
        bb = self.step_rule == "bb"
        recent = s.recent  # G at the last accepted points (the non-monotone test of 'bb')
        trial = phi - lr * g
        ft, gt = problem.value_and_grad(trial)
        nt = _norm(gt)
        f_ref = recent.max() if bb else f
        accept, grow = _sufficient_decrease(f_ref, ft, lr, n, nt < n)
        accept = accept & ~done
        reject = ~done & ~accept
        if bb:
            s_, y = -lr * g, gt - g
            sy = torch.dot(s_.detach(), y.detach())
            step = torch.where(sy > 0, lr * lr * n * n / sy, lr * _BB_RANGE)
            next_lr = step.clamp(lr / _BB_RANGE, lr * _BB_RANGE)
            recent = torch.where(accept, torch.cat([recent[1:], ft.detach().reshape(1)]), recent)
        else:
            next_lr = torch.where(grow, lr * self.grow, lr)
        n, g = torch.where(accept, nt, n), torch.where(accept, gt, g)
        return GDState(torch.where(accept, trial, phi), n, done | self._met(problem, g, n),
                       s.steps + accept.long(), s.rejected + reject.long(),
                       torch.where(accept, ft, f), g,
                       torch.where(accept, next_lr, torch.where(reject, 0.5 * lr, lr)), recent)


class NesterovState(NamedTuple):
    """Nesterov's state: the shared fields, then the previous iterate, the step and G(φ)
    (adaptive steps only; NaN without)."""

    phi: Tensor
    grad_norm: Tensor
    converged: Tensor
    steps: Tensor
    rejected: Tensor
    phi_prev: Tensor
    lr: Tensor
    f_phi: Tensor


@dataclass
class Nesterov(_FirstOrder):
    """Nesterov's accelerated gradient: y = φ + μ(φ − φ_prev), φ ← y − lr ∇G(y).

    For an L-smooth, λ-strongly-convex G, lr = 1/L and μ = (√κ − 1)/(√κ + 1) with κ = L/λ
    give the √κ log(1/δ) rate of the paper's Table 1. With ``adaptive``, each trial step from y
    is accepted or rejected as in GradientDescent (a rejection halves lr and drops the
    momentum), and the momentum restarts whenever an accepted step raises G (the function-value
    restart of O'Donoghue & Candès 2015), which keeps the √κ rate without knowing κ.
    """

    momentum: float = 0.9

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")

    def init(self, problem: ProximalProblem, phi0: Tensor) -> NesterovState:
        no, zero, nan = _flags(phi0)
        f_phi = problem.value(phi0) if self.adaptive else nan
        return NesterovState(phi0, nan, no, zero, zero, phi0, phi0.new_full((), self.lr), f_phi)

    def step(self, problem: ProximalProblem, s: NesterovState, k: int, last: bool):
        phi, phi_prev, lr, done = s.phi, s.phi_prev, s.lr, s.converged
        y = phi + self.momentum * (phi - phi_prev)
        if self.adaptive:
            fy, g = problem.value_and_grad(y)
        else:
            g = problem.grad(y)
        n = _norm(g)
        tol = self.tol > 0
        newly = ~done & self._met(problem, g, n) if tol else done
        grad_norm = torch.where(newly, n, s.grad_norm)  # converged at y: stay there, no momentum
        done = done | newly
        trial = y - lr * g
        if not self.adaptive:
            if not tol:
                return s._replace(phi=trial, phi_prev=phi, steps=s.steps + 1), n
            return s._replace(phi=torch.where(done, y, trial), phi_prev=torch.where(done, y, phi),
                              grad_norm=grad_norm, converged=done,
                              steps=s.steps + (~done).long()), n
        ft = problem.value(trial)
        accept, grow = _sufficient_decrease(fy, ft, lr, n, torch.ones_like(done))
        accept = accept & ~done
        reject = ~done & ~accept
        restart = accept & (ft > s.f_phi)
        new_phi = torch.where(done, y, torch.where(accept, trial, phi))
        return NesterovState(
            new_phi, grad_norm, done, s.steps + accept.long(), s.rejected + reject.long(),
            torch.where(done | reject | restart, new_phi, phi),
            torch.where(accept & grow, lr * self.grow, torch.where(reject, 0.5 * lr, lr)),
            torch.where(accept, ft, torch.where(newly, fy, s.f_phi))), n


class AdamState(NamedTuple):
    """Adam's state: the shared fields, then its moments m and v."""

    phi: Tensor
    grad_norm: Tensor
    converged: Tensor
    steps: Tensor
    rejected: Tensor
    m: Tensor
    v: Tensor


@dataclass
class Adam(_Solver):
    """Adam (Kingma & Ba 2015) on G, optionally on mini-batches of ``batch_size`` support
    examples: Reptile's inner loop (Nichol et al. 2018: lr 1e-3, β1 = 0, β2 = 0.999). It runs
    all ``steps``; with ``tol`` or ``report`` the full ‖∇G‖ at the returned φ is reported. Its
    moments start at zero, or (``with_moments``) from moments carried over ``t0`` earlier steps,
    as Reptile's own code never resets them; with ``carry=True`` a solve returns its final
    moments ([m, v]), whose batch mean the trainer carries on (config ``inner_carry``)."""

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
    stops = False
    unrollable = False  # (not tested as MAML's inner loop)

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

    def init(self, problem: ProximalProblem, phi0: Tensor) -> AdamState:
        no, zero, nan = _flags(phi0)
        m = torch.zeros_like(phi0) if self.m0 is None else self.m0.to(phi0)
        v = torch.zeros_like(phi0) if self.v0 is None else self.v0.to(phi0)
        return AdamState(phi0, nan, no, zero, zero, m, v)

    def step(self, problem: ProximalProblem, s: AdamState, k: int, last: bool):
        g = (problem.grad(s.phi) if self.batch_size is None
             else problem.batch_grad(s.phi, k, self.batch_size))
        m = self.beta1 * s.m + (1 - self.beta1) * g
        v = self.beta2 * s.v + (1 - self.beta2) * g * g
        t = self.t0 + k + 1
        m_hat = m / (1 - self.beta1 ** t)
        v_hat = v / (1 - self.beta2 ** t)
        phi = s.phi - self.lr * m_hat / (v_hat.sqrt() + self.eps)
        return s._replace(phi=phi, steps=s.steps + 1, m=m, v=v), _norm(g)

    def moments(self, s: AdamState) -> Optional[Tensor]:
        return torch.stack([s.m, s.v], -2).detach() if self.carry else None

    def _extras(self, s: AdamState) -> dict:
        return {"moments": self.moments(s)}


class NewtonState(NamedTuple):
    """Newton-CG's state: the shared fields (``rejected``: the line search's backtracks), then
    G and ∇G at φ, whether the line search failed, the last accepted step, the damping μ, the
    objective values the line search computed and the systems that met negative curvature."""

    phi: Tensor
    grad_norm: Tensor
    converged: Tensor
    steps: Tensor
    rejected: Tensor
    f: Tensor
    g: Tensor
    failed: Tensor
    t_last: Tensor
    mu: Tensor
    evaluations: Tensor
    negative_curvature: Tensor


@dataclass
class NewtonCG(_Solver):
    """Hessian-free Newton (Martens 2010) for G: the direction solves ∇²G d = −∇G with
    ``cg_iters`` CG steps (5 in iMAML-HF), then a backtracking Armijo line search from twice the
    last accepted step (at most 1, the Newton step; ``warm_start``). Where CG meets negative
    curvature it returns its last iterate (Steihaug), and −∇G where that is no descent
    direction. A line search without decrease in ``max_backtracks`` halvings ends the solve
    (``stop_reason`` 'line_search'). ``damping`` μ₀ > 0 solves (∇²G + μI) d = −∇G instead, μ
    adapted per task by Levenberg–Marquardt's rule (``_adapt_damping``); 0 is plain Newton-CG.
    On a ``Batch`` each piece of an iteration is vmapped over the tasks, every task with its own
    step, damping and stopping state."""

    steps: int = 5
    cg_iters: int = 5
    tol: float = 0.0
    armijo: float = 1e-4
    backtrack: float = 0.5
    max_backtracks: int = 20
    hvp_mode: str = "rev-rev"
    report: bool = False
    warm_start: bool = True
    damping: float = 0.0
    mapped = False
    logs_start = True
    stops = True
    unrollable = False  # it detaches φ and its line search branches on values

    def __post_init__(self):
        _check_args(self.steps, self.tol)
        if not (math.isfinite(self.damping) and self.damping >= 0):
            raise ValueError(f"damping must be a finite number >= 0, got {self.damping}")
        if checks.whole("cg_iters", self.cg_iters) < 1:
            raise ValueError(f"cg_iters must be >= 1, got {self.cg_iters}")
        if not 0 < self.backtrack < 1 or not 0 < self.armijo < 1:
            raise ValueError("backtrack and armijo must lie in (0, 1)")

    def finished(self, s: NewtonState) -> Tensor:
        return s.converged | s.failed

    def _extras(self, s: NewtonState) -> dict:
        return {"evaluations": int(s.evaluations), "negative_curvature": int(s.negative_curvature),
                "line_search_failures": int(s.failed), "damping": float(s.mu)}

    def evaluate(self, problem: ProximalProblem, phi: Tensor):
        """(G, ∇G, ‖∇G‖, whether the tolerance is met) at φ, for one task."""
        f, g = problem.value_and_grad(phi)
        f, g = f.detach(), g.detach()
        n = _norm(g)
        return f, g, n, self._met(problem, g, n)

    def direction(self, problem: ProximalProblem, phi: Tensor, g: Tensor, mu: Tensor,
                  early_stop: bool = False):
        """CG on (∇²G + μI) d = −∇G for one task: (d, gᵀd, whether the system proved indefinite
        or d was replaced by −∇G, whether CG met negative curvature, ‖d‖²)."""
        hvp = problem.hvp(phi, self.hvp_mode)
        cg = cg_state(lambda v: hvp(v) + mu * v, -g, max_iter=self.cg_iters,
                      early_stop=early_stop)
        d = cg.x.detach()
        slope = torch.dot(g, d)
        fallback = cg.breakdown | ~(slope < 0)
        d = torch.where(fallback, -g, d)
        slope = torch.where(fallback, -torch.dot(g, g), slope)
        return d, slope, fallback | cg.negative_curvature, cg.negative_curvature, torch.dot(d, d)

    def _evaluate(self, problem, phi: Tensor):
        f, g, n, met = _map(problem, self.evaluate, phi)
        check_finite(g, "inner gradient")
        check_finite(f, "inner objective")
        return f, g, n, met

    def init(self, problem, phi0: Tensor) -> NewtonState:
        phi = phi0.detach()
        f, g, n, met = self._evaluate(problem, phi)
        count = torch.zeros(n.shape, dtype=torch.int64, device=phi.device)
        return NewtonState(phi, n, met, count, count, f, g, torch.zeros_like(met),
                           torch.full_like(n, 0.5),  # so that the first trial is the Newton step
                           torch.full_like(n, self.damping), count, count)

    def step(self, problem, s: NewtonState, k: int, last: bool):
        """One Newton iteration for one task or a ``Batch`` (φ [B, P]): a task that met its
        tolerance or whose line search failed is frozen; the line search tries each task's own
        step until every task has accepted one or run out of halvings."""
        active = ~(s.converged | s.failed)
        single = not isinstance(problem, Batch)  # (a single CG may leave once it is done)
        d, slope, indefinite, negc, dd = _map(
            problem, lambda q, p, g, mu: self.direction(q, p, g, mu, early_stop=single),
            s.phi, s.g, s.mu)
        neg = s.negative_curvature + (active & negc).long()
        t = torch.clamp(2 * s.t_last, max=1.0) if self.warm_start else torch.ones_like(s.t_last)
        searching, t_acc, f_acc, evals = active, torch.zeros_like(t), s.f, s.evaluations
        for _ in range(self.max_backtracks):
            ft = _map(problem, lambda q, p, d, t: q.value(p + t * d).detach(), s.phi, d, t)
            evals = evals + searching.long()
            ok = searching & torch.isfinite(ft) & (ft <= s.f + self.armijo * t * slope)
            t_acc, f_acc = torch.where(ok, t, t_acc), torch.where(ok, ft, f_acc)
            searching = searching & ~ok
            if not bool(searching.any()):
                break
            t = torch.where(searching, t * self.backtrack, t)
        # no decrease along d: the same direction would fail again, so that task stops
        accepted = active & ~searching
        s = s._replace(failed=s.failed | searching, evaluations=evals, negative_curvature=neg,
                       rejected=evals - s.steps)
        if not bool(accepted.any()):
            return s, None
        mu = s.mu
        if self.damping > 0:
            mu = torch.where(accepted, _adapt_damping(mu, f_acc - s.f, t_acc, slope, dd,
                                                      indefinite), mu)
        phi = torch.where(accepted[..., None], s.phi + t_acc[..., None] * d, s.phi)
        taken = s.steps + accepted.long()
        s = s._replace(phi=phi, steps=taken, rejected=evals - taken, mu=mu,
                       t_last=torch.where(accepted, t_acc, s.t_last))
        if last and not (self.tol > 0 or self.report):  # (‖∇G‖ after the last step: not needed)
            return s._replace(grad_norm=torch.where(accepted, math.nan, s.grad_norm)), None
        f, g, n_new, met = self._evaluate(problem, phi)
        n = torch.where(accepted, n_new, s.grad_norm)
        return s._replace(f=f, g=g, grad_norm=n, converged=s.converged | (accepted & met)), n


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
