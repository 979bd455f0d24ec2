"""Task meta-gradients behind one interface: θ and a task in, the meta-gradient and diagnostics out.

- ``IMAML``: Algorithm 2 of Rajeswaran et al. (2019). Solve the proximal inner problem with any
  inner solver, then solve (I + H/λ) g = ∇L_test(φ) by conjugate gradient with exact
  Hessian-vector products at φ. Nothing of the inner trajectory is kept: memory is one
  gradient's worth whatever the number of inner steps.
- ``MAML``: back-prop through the inner solver's iterations (GD, or Nesterov) (Finn et al. 2017).
- ``TruncatedMAML``: back-prop through the last T of K inner GD steps (Shaban et al. 2019); the
  first K − T steps are treated as the identity map of θ, so T = 0 is first-order MAML and
  T = K is full MAML.
- ``FOMAML``: first-order MAML, g = ∇L_test(φ_K).
- ``Reptile`` (Nichol et al. 2018): g = θ − φ_K, so that θ ← θ − β g moves θ towards φ_K.

All methods take ``lam``: with λ > 0 the inner problem is the proximal G; with λ = 0 it is the
plain support loss L̂ (the standard MAML/FOMAML/Reptile inner loop).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.func import grad_and_value
from torch.utils._pytree import tree_map

from . import checks
from .functional import (DEFAULT_HVP, FunctionalModel, ProximalProblem, check_finite,
                         _no_transform, curvature_product, inner_problem)
from .implicit import adjoint_solve
from .inner import Adam, GradientDescent, InnerResult, Nesterov, NewtonCG, _Solver, run
from .tasks import Task
from .linear import (CG_POLICIES, LINEAR_SOLVERS, LinearSolveResult, NegativeCurvatureError,
                     solve_result)

InnerSolver = Union[GradientDescent, Nesterov, NewtonCG, Adam]


@dataclass
class MetaGradient:
    """Attributes:
        grad: the task meta-gradient (flat, same layout as θ).
        query_loss: L_test at the adapted parameters.
        query_accuracy: fraction of query labels predicted right (integer targets only).
        phi: the adapted parameters (detached).
        inner: what the inner solver reached.
        cg: the result of iMAML's linear solve, CG or MINRES (None for other methods).
        lam_grad: iMAML: ∂L_test/∂λ, a number for a scalar λ, per parameter for a tensor λ.
    """

    grad: Tensor
    query_loss: float
    query_accuracy: Optional[float]
    phi: Tensor
    inner: InnerResult
    cg: Optional[LinearSolveResult] = None
    lam_grad: Optional[Tensor] = None


def _accuracy(logits: Tensor, y: Tensor) -> Tensor:
    """``accuracy_of`` as a tensor (NaN where not defined), for use under ``vmap``."""
    if y.dtype in (torch.int64, torch.int32) and logits.dim() == 2:
        return (logits.argmax(-1) == y).float().mean()
    return logits.detach().new_full((), math.nan)


def accuracy_of(logits: Tensor, y: Tensor) -> Optional[float]:
    """Fraction of right predictions for class scores [n, classes] and integer labels; None
    where accuracy is not defined (regression)."""
    acc = float(_accuracy(logits, y))
    return None if acc != acc else acc


def flat_theta(model: FunctionalModel, theta, task=None) -> Tensor:
    """θ as the flat vector the methods work on: given flat, or as a name -> tensor dict in
    the model's layout (the meta-gradient comes back flat: ``model.unflatten(res.grad)``).
    Checks the arguments of a method's entry points (and ``task``, when given)."""
    checks.instance("model", model, (FunctionalModel,), "an imaml.FunctionalModel (wrap the "
                    "module: FunctionalModel(module))")
    if task is not None:
        checks.instance("task", task, (Task,), "an imaml.Task(x_support, y_support, x_query, "
                        "y_query)")
    if isinstance(theta, dict):
        return model.flatten(theta)
    return checks.tensor("theta", theta, "a flat tensor of the model's parameters (model.theta()) "
                         "or a name -> tensor dict")


def _check_lam(lam, positive: bool) -> None:
    if isinstance(lam, Tensor):  # iMAML: one λ per parameter
        if lam.dim() != 1 or not bool(torch.isfinite(lam).all()) or not bool((lam > 0).all()):
            raise ValueError("a tensor lam must hold one finite λ > 0 per parameter (1-D), got "
                             f"shape {tuple(lam.shape)}, values {lam.flatten()[:4].tolist()}")
        return
    checks.number("lam", lam, **({"positive": True} if positive else {"minimum": 0}))


def _check_inner(inner) -> None:
    checks.instance("inner", inner, (_Solver,),  # any solver of imaml.inner, a new one too
                    "an imaml inner solver (GradientDescent(...), Nesterov(...), NewtonCG(...) or "
                    "Adam(...); not a torch optimizer)")


class TaskTerms(NamedTuple):
    """One task's meta-gradient and what was measured on the way, as tensors (stacked over the
    tasks on the batch path, ``imaml.batched``).

    Attributes:
        grad: the task meta-gradient (flat, θ's layout).
        loss: L_test at the adapted parameters.
        accuracy: fraction of query labels predicted right; NaN where not defined (``accuracy_of``).
        inner: the inner solver's final state (``imaml.inner``: ``phi``, ``grad_norm``,
            ``converged``, ``steps``, ...).
        linear: iMAML: ``solve`` (the linear solver's ``SolveState``), ``residual`` (its final
            residual relative to ‖b‖), ``negative_curvature`` and ``lam_grad`` (∂L_test/∂λ, a
            number for a scalar λ, per parameter for a tensor λ); empty for the other methods.
    """

    grad: Tensor
    loss: Tensor
    accuracy: Tensor
    inner: NamedTuple
    linear: dict


def _query(model: FunctionalModel, phi: Tensor, xq, yq: Tensor):
    """(L_test(φ), accuracy): accuracy where ``accuracy_of`` defines it, NaN elsewhere."""
    logits = model.forward(phi, xq)
    return model.loss_fn(logits, yq), _accuracy(logits, yq)


def _grad_and_aux(f, x: Tensor):
    """(∇f(x), f(x), aux) for ``f(x) -> (scalar, aux)``: by plain autograd where no function
    transform is active (it skips functorch's per-operation wrapping:
    benchmarks/maml_autograd.py), by ``torch.func`` under ``vmap``."""
    if not _no_transform():
        g, (value, aux) = grad_and_value(f, has_aux=True)(x)
        return g, value, aux
    leaf = x.detach().requires_grad_(True)
    with torch.enable_grad():
        value, aux = f(leaf)
        (g,) = torch.autograd.grad(value, leaf)
    return g, value.detach(), tree_map(lambda t: t.detach(), aux)


class _Method:
    """What every method shares: the inner problem, the inner solve, and ``terms``, the one
    per-task computation that ``meta_gradient`` (one task) and ``imaml.batched`` (a loop over
    tasks, or ``vmap`` of it) both run. A method overrides ``_outer`` (what it makes of the
    solved inner problem) or, when it differentiates through the solve (``unrolls``), ``terms``."""

    inner: InnerSolver
    lam: float
    curvature: str = "hessian"
    unrolls = False  # the inner solve is part of what is differentiated (MAML)

    def problem(self, model: FunctionalModel, theta: Tensor, task: Task) -> ProximalProblem:
        return self.support_problem(model, theta, task.x_support, task.y_support)

    def support_problem(self, model: FunctionalModel, theta: Tensor, x, y: Tensor
                        ) -> ProximalProblem:
        """The inner problem of a support set (over the parameters ``model`` adapts)."""
        return inner_problem(model, x, y, theta, self.lam, self.curvature)

    def adapt(self, model: FunctionalModel, theta: Tensor, x: Tensor, y: Tensor) -> InnerResult:
        """Adapt θ (flat, or a name -> tensor dict) to a support set (no meta-gradient): the
        inner solve alone."""
        theta = flat_theta(model, theta).detach()
        with torch.no_grad():
            return self.inner.solve(self.support_problem(model, theta, x, y), theta)

    def adapted_module(self, module: torch.nn.Module, x: Tensor, y: Tensor,
                       loss_fn=torch.nn.functional.cross_entropy) -> torch.nn.Module:
        """A copy of the user's ``module`` adapted to the support set (x, y): its parameters
        are φ from this method's inner solve started at the module's own. The module itself
        is left as it was, bit for bit (the learn2learn ``clone(); adapt()`` idiom)."""
        import copy
        model = FunctionalModel(module, loss_fn)
        phi = self.adapt(model, model.theta(), x, y).phi
        clone = copy.deepcopy(module)
        FunctionalModel(clone, loss_fn).load_(phi)
        return clone

    def terms(self, model: FunctionalModel, theta: Tensor, xs, ys: Tensor, xq, yq: Tensor,
              inner=None, sync: bool = True) -> Tuple[TaskTerms, Tensor]:
        """(this task's ``TaskTerms``, the inner solve's history of ‖∇G‖) at a detached θ.

        ``inner``: the inner solve's (final state, history) when it was run already (the batch
        path solves every task's inner problem together); ``sync``: whether the solves may ask
        the host when to stop (False under ``vmap``, where every iteration then runs)."""
        if inner is None:
            with torch.no_grad():
                inner = run(self.inner, self.support_problem(model, theta, xs, ys), theta,
                            sync=sync)
        return self._outer(model, theta, inner[0], xs, ys, xq, yq, sync), inner[1]

    def _outer(self, model, theta, s, xs, ys, xq, yq, sync) -> TaskTerms:
        raise NotImplementedError

    def check(self, t: TaskTerms) -> None:
        """Raise where a result must not be used (iMAML's CG policy 'raise')."""

    def meta_gradient(self, model: FunctionalModel, theta, task: Task) -> MetaGradient:
        """The task meta-gradient at θ (flat, or a name -> tensor dict) and its diagnostics."""
        theta = flat_theta(model, theta, task).detach()
        t, history = self.terms(model, theta, task.x_support, task.y_support, task.x_query,
                                task.y_query)
        inner = self.inner.result(t.inner, history)  # (raises on a non-finite inner gradient)
        check_finite(t.loss, "query loss")
        self.check(t)
        acc = float(t.accuracy)
        solve = t.linear.get("solve")
        return MetaGradient(t.grad.detach(), float(t.loss), None if acc != acc else acc,
                            inner.phi, inner,
                            None if solve is None else solve_result(
                                solve, self.linear_solver, self.cg_rtol, self.cg_atol),
                            t.linear.get("lam_grad"))


@dataclass
class _Baseline(_Method):
    """A method whose inner loop is on L̂ by default (``lam`` = 0) or on G (``lam`` > 0)."""

    inner: InnerSolver = field(default_factory=GradientDescent)
    lam: float = 0.0

    def __post_init__(self):
        _check_lam(self.lam, positive=False)
        _check_inner(self.inner)


@dataclass
class IMAML(_Method):
    """Implicit MAML (Algorithm 2).

    Args:
        lam: λ > 0, the proximal regularisation strength: a number, or a 1-D tensor of one λ
            per parameter (per-layer λ expanded, as the trainer's ``learn_lam`` does).
        inner: any inner solver (GradientDescent, Nesterov, NewtonCG).
        cg_max_iter: iterations of the linear solver for (I + H/λ) g = v (5 CG steps in the
            paper).
        cg_rtol, cg_atol: its residual tolerance δ′ (0 = run all iterations).
        linear_solver: 'cg' (the paper's conjugate gradient) or 'minres', which is safe when
            I + H/λ is indefinite (an inner problem stopped short of a minimum of G).
        on_negative_curvature: CG's policy when it meets negative curvature: 'stop' (return
            the last iterate, flagged in ``cg.negative_curvature``) or 'raise'
            (``imaml.linear.NegativeCurvatureError``). See ``imaml.linear``.
        hvp_mode: 'rev-rev' (double back-prop) or 'fwd-rev' (forward-over-reverse).
        curvature: 'hessian' (default: the exact system of the paper) or 'ggn', the
            generalised Gauss-Newton matrix of the support loss in place of its Hessian. The
            Hessian of a network far from the inner optimum is indefinite, and then CG meets
            negative curvature (reported in ``cg.negative_curvature``); the GGN is positive
            semi-definite, so the system stays positive definite. An approximation, opt-in.
    """

    lam: Union[float, Tensor] = 2.0
    inner: InnerSolver = field(default_factory=GradientDescent)
    cg_max_iter: int = 5
    cg_rtol: float = 0.0
    cg_atol: float = 0.0
    hvp_mode: str = DEFAULT_HVP
    curvature: str = "hessian"
    linear_solver: str = "cg"
    on_negative_curvature: str = "stop"

    def __post_init__(self):
        _check_lam(self.lam, positive=True)
        _check_inner(self.inner)
        checks.whole("cg_max_iter", self.cg_max_iter)
        checks.number("cg_rtol", self.cg_rtol, minimum=0)
        checks.number("cg_atol", self.cg_atol, minimum=0)
        if self.curvature not in ("hessian", "ggn"):
            raise ValueError(f"curvature must be 'hessian' or 'ggn', got {self.curvature!r}")
        if self.linear_solver not in LINEAR_SOLVERS:
            raise ValueError(f"linear_solver must be one of {sorted(LINEAR_SOLVERS)}, "
                             f"got {self.linear_solver!r}")
        if self.on_negative_curvature not in CG_POLICIES:
            raise ValueError(f"on_negative_curvature must be one of {CG_POLICIES}, "
                             f"got {self.on_negative_curvature!r}")
        if self.cg_max_iter < 1:
            raise ValueError(f"cg_max_iter must be >= 1 (0 would return a zero meta-gradient), "
                             f"got {self.cg_max_iter}")

    def curvature_product(self, model: FunctionalModel, x: Tensor, y: Tensor, phi: Tensor):
        """v -> H v (or G v) of the support loss at φ."""
        return curvature_product(model, x, y, phi, self.curvature, self.hvp_mode)

    def _outer(self, model, theta, s, xs, ys, xq, yq, sync) -> TaskTerms:
        """Algorithm 2 at the solved φ: g = (I + H/λ)⁻¹ ∇L_test(φ) by the linear solver (the
        adjoint of ``imaml.implicit``, which also gives ∂L_test/∂λ)."""
        phi = s.phi
        v, loss, acc = _grad_and_aux(lambda p: _query(model, p, xq, yq), phi)
        curv = self.curvature_product(model, xs, ys, phi)
        solve = lambda A, b: LINEAR_SOLVERS[self.linear_solver](  # noqa: E731
            A, b, max_iter=self.cg_max_iter, rtol=self.cg_rtol, atol=self.cg_atol,
            early_stop=sync)
        g, w, lin = adjoint_solve(curv, v, self.lam, model.adapt_mask, solve)
        lam_grad = -(phi - theta) * w
        rel = lin.residual / lin.history[0].clamp_min(torch.finfo(v.dtype).tiny)  # ‖r₀‖ = ‖b‖
        return TaskTerms(g, loss, acc, s, {
            "solve": lin, "residual": rel, "negative_curvature": lin.negative_curvature,
            "lam_grad": lam_grad if isinstance(self.lam, Tensor) else lam_grad.sum()})

    def check(self, t: TaskTerms) -> None:
        neg = t.linear["negative_curvature"]
        if self.linear_solver == "cg" and self.on_negative_curvature == "raise" and bool(neg.any()):
            raise NegativeCurvatureError(
                f"CG met negative curvature on {int(neg.sum())} of {neg.numel()} task(s): the "
                "system is not positive definite (the inner problem is not at a minimum of G); "
                "use minres, the Gauss-Newton curvature, a larger lam or a better-solved inner "
                "problem")


@dataclass
class MAML(_Baseline):
    """MAML by full back-prop through the inner solver (GradientDescent, Nesterov: ``unrollable``).

    With ``lam`` > 0 it differentiates through the iterations on the proximal G instead of L̂.
    Memory grows linearly with the number of inner steps.
    """

    unrolls = True

    def __post_init__(self):
        super().__post_init__()
        if not self.inner.unrollable:
            raise ValueError("MAML back-propagates through an inner solver whose iterations "
                             "autograd can unroll (GradientDescent, Nesterov, or a solver with "
                             f"unrollable = True); {type(self.inner).__name__} is not one")

    def _unrolled(self, model, theta, xs, ys, sync):
        """The inner solve from θ as a differentiable function of θ: (state, history)."""
        return run(self.inner, self.support_problem(model, theta, xs, ys), theta, sync=sync)

    def terms(self, model, theta, xs, ys, xq, yq, inner=None, sync=True):
        def outer(th):
            s, history = self._unrolled(model, th, xs, ys, sync)
            loss, acc = _query(model, s.phi, xq, yq)
            return loss, (acc, tree_map(lambda t: t.detach(), (s, history)))

        g, loss, (acc, (s, history)) = _grad_and_aux(outer, theta)
        return TaskTerms(g, loss, acc, s, {}), history


@dataclass
class TruncatedMAML(MAML):
    """Back-prop through the last ``truncate`` of the inner GD steps only."""

    truncate: int = 5

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.inner, GradientDescent):
            raise ValueError("TruncatedMAML unrolls GradientDescent only")
        if not 0 <= checks.whole("truncate", self.truncate) <= self.inner.steps:
            raise ValueError(f"truncate must be in [0, inner.steps={self.inner.steps}], "
                             f"got {self.truncate}")

    def _unrolled(self, model, theta, xs, ys, sync):
        head = self.inner.steps - self.truncate
        th = theta.detach()
        with torch.no_grad():
            first, h1 = run(self.inner, self.support_problem(model, th, xs, ys), th, head, sync)
        # straight-through: φ_{K-T} = θ + const, so dφ_{K-T}/dθ = I
        start = theta + (first.phi - theta).detach()
        s, h2 = run(self.inner, self.support_problem(model, theta, xs, ys), start,
                    self.truncate, sync)
        return s._replace(steps=s.steps + first.steps), torch.cat([h1, h2], -1)


@dataclass
class FOMAML(_Baseline):
    """First-order MAML: the query gradient at the adapted parameters."""

    def _outer(self, model, theta, s, xs, ys, xq, yq, sync) -> TaskTerms:
        g, loss, acc = _grad_and_aux(lambda p: _query(model, p, xq, yq), s.phi)
        return TaskTerms(g, loss, acc, s, {})


@dataclass
class Reptile(_Baseline):
    """Reptile: g = θ − φ_K after inner steps on the support set."""

    def _outer(self, model, theta, s, xs, ys, xq, yq, sync) -> TaskTerms:
        with torch.no_grad():
            loss, acc = _query(model, s.phi, xq, yq)
        return TaskTerms(theta - s.phi, loss, acc, s, {})
