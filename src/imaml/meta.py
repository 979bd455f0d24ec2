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

from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import Tensor
from torch.func import grad_and_value

from . import checks
from .functional import (DEFAULT_HVP, FunctionalModel, ProximalProblem, check_finite,
                         curvature_product, inner_problem)
from .implicit import implicit_solution
from .inner import Adam, GradientDescent, InnerResult, Nesterov, NewtonCG
from .tasks import Task
from .linear import CG_POLICIES, LINEAR_SOLVERS, CGResult

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
    cg: Optional[CGResult] = None
    lam_grad: Optional[Tensor] = None


def accuracy_of(logits: Tensor, y: Tensor) -> Optional[float]:
    """Fraction of right predictions for class scores [n, classes] and integer labels; None
    where accuracy is not defined (regression)."""
    if y.dtype in (torch.int64, torch.int32) and logits.dim() == 2:
        return float((logits.argmax(-1) == y).float().mean())
    return None


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
    checks.instance("inner", inner, (GradientDescent, Nesterov, NewtonCG, Adam),
                    "an imaml inner solver (GradientDescent(...), Nesterov(...), NewtonCG(...) or "
                    "Adam(...); not a torch optimizer)")


class _Method:
    inner: InnerSolver
    lam: float
    curvature: str = "hessian"

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

    def _query(self, model: FunctionalModel, phi: Tensor, task: Task):
        """(∇L_test(φ), L_test(φ), accuracy) at a detached φ, in one forward/backward."""
        def f(p):
            logits = model.forward(p, task.x_query)
            return model.loss_fn(logits, task.y_query), logits

        g, (loss, logits) = grad_and_value(f, has_aux=True)(phi.detach())
        check_finite(loss, "query loss")
        return g, float(loss), accuracy_of(logits, task.y_query)


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

    def meta_gradient(self, model: FunctionalModel, theta: Tensor, task: Task) -> MetaGradient:
        """The task meta-gradient, through the implicit layer (``imaml.implicit_solution``): φ
        from the inner solver, the query loss at φ, and its gradient with respect to θ by the
        layer's linear solve (I + H/λ) g = ∇L_test(φ)."""
        theta = flat_theta(model, theta, task).detach().requires_grad_(True)
        lam = torch.as_tensor(self.lam, dtype=theta.dtype, device=theta.device)
        lam = lam.detach().clone().requires_grad_(True)
        record = {}
        with torch.enable_grad():
            phi = implicit_solution(
                model, theta, lam, task.x_support, task.y_support, self.inner,
                linear_solver=self.linear_solver, max_iter=self.cg_max_iter, rtol=self.cg_rtol,
                atol=self.cg_atol, curvature=self.curvature, hvp_mode=self.hvp_mode,
                on_negative_curvature=self.on_negative_curvature, record=record)
            logits = model.forward(phi, task.x_query)
            loss = model.loss_fn(logits, task.y_query)
            check_finite(loss, "query loss")
            g, lam_grad = torch.autograd.grad(loss, (theta, lam))
        return MetaGradient(g.detach(), float(loss.detach()),
                            accuracy_of(logits.detach(), task.y_query), phi.detach(),
                            record["inner"], record["linear"], lam_grad.detach())


@dataclass
class MAML(_Baseline):
    """MAML by full back-prop through the inner solver (GradientDescent or Nesterov).

    With ``lam`` > 0 it differentiates through the iterations on the proximal G instead of L̂.
    Memory grows linearly with the number of inner steps.
    """

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.inner, (GradientDescent, Nesterov)):
            raise ValueError("MAML back-propagates through GradientDescent or Nesterov only")

    def meta_gradient(self, model: FunctionalModel, theta: Tensor, task: Task) -> MetaGradient:
        theta = flat_theta(model, theta, task).detach().requires_grad_(True)
        with torch.enable_grad():
            inner = self.inner.solve(self.problem(model, theta, task), theta)
            logits = model.forward(inner.phi, task.x_query)
            loss = model.loss_fn(logits, task.y_query)
            check_finite(loss, "query loss")
            (g,) = torch.autograd.grad(loss, theta)
        inner.phi = inner.phi.detach()
        return MetaGradient(g, float(loss.detach()), accuracy_of(logits.detach(), task.y_query),
                            inner.phi, inner)


@dataclass
class TruncatedMAML(_Baseline):
    """Back-prop through the last ``truncate`` of the inner GD steps only."""

    truncate: int = 5

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.inner, GradientDescent):
            raise ValueError("TruncatedMAML unrolls GradientDescent only")
        if not 0 <= checks.whole("truncate", self.truncate) <= self.inner.steps:
            raise ValueError(f"truncate must be in [0, inner.steps={self.inner.steps}], "
                             f"got {self.truncate}")

    def meta_gradient(self, model: FunctionalModel, theta: Tensor, task: Task) -> MetaGradient:
        theta = flat_theta(model, theta, task).detach().requires_grad_(True)
        problem = self.problem(model, theta, task)
        head = self.inner.steps - self.truncate
        with torch.no_grad():
            first = self.inner.solve(self.problem(model, theta.detach(), task),
                                     theta.detach(), steps=head)
        with torch.enable_grad():
            # Straight-through: φ_{K-T} = θ + const, so dφ_{K-T}/dθ = I.
            start = theta + (first.phi - theta).detach()
            inner = self.inner.solve(problem, start, steps=self.truncate)
            logits = model.forward(inner.phi, task.x_query)
            loss = model.loss_fn(logits, task.y_query)
            check_finite(loss, "query loss")
            (g,) = torch.autograd.grad(loss, theta)
        inner.steps += first.steps
        inner.grad_norms = first.grad_norms + inner.grad_norms
        inner.phi = inner.phi.detach()
        return MetaGradient(g, float(loss.detach()), accuracy_of(logits.detach(), task.y_query),
                            inner.phi, inner)


@dataclass
class FOMAML(_Baseline):
    """First-order MAML: the query gradient at the adapted parameters."""

    def meta_gradient(self, model: FunctionalModel, theta: Tensor, task: Task) -> MetaGradient:
        inner = self.adapt(model, flat_theta(model, theta, task), task.x_support, task.y_support)
        g, loss, acc = self._query(model, inner.phi, task)
        return MetaGradient(g, loss, acc, inner.phi.detach(), inner)


@dataclass
class Reptile(_Baseline):
    """Reptile: g = θ − φ_K after inner steps on the support set."""

    def meta_gradient(self, model: FunctionalModel, theta: Tensor, task: Task) -> MetaGradient:
        theta = flat_theta(model, theta, task)
        inner = self.adapt(model, theta, task.x_support, task.y_support)
        with torch.no_grad():
            logits = model.forward(inner.phi, task.x_query)
            loss = model.loss_fn(logits, task.y_query)
        check_finite(loss, "query loss")
        return MetaGradient((theta.detach() - inner.phi).detach(), float(loss),
                            accuracy_of(logits, task.y_query), inner.phi.detach(), inner)
