"""The evaluation protocol: adapt on each test task's support set, score its query set, report the
mean accuracy with a 95% confidence interval (1.96·std/√n) over at least 600 tasks.

Tasks come from a ``TaskSampler`` with a fixed seed, so every method evaluated with the same seed
sees exactly the same tasks. Select models on meta-validation; run this on meta-test once.

For a method with a proximal inner problem (λ > 0: iMAML), the evaluation also records how well
that problem was solved on each task: ‖∇G‖ at θ, where the solve starts, and at the φ it returns
(one extra gradient per task). An inner step too long for the curvature of G makes gradient
descent oscillate or diverge, and then ‖∇G(φ)‖ ends larger than ‖∇G(θ)‖ on some tasks;
``EvalResult.inner_warning`` says so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from .functional import FunctionalModel
from .meta import Task

MIN_TEST_TASKS = 600


@dataclass
class EvalResult:
    """Mean accuracy, its 95% CI half-width, the per-task accuracies and, for a proximal
    inner problem, ‖∇G‖ per task at θ (``inner_start``) and at the adapted φ (``inner_end``)."""

    mean: float
    ci95: float
    accuracies: List[float] = field(repr=False)
    inner_start: Optional[List[float]] = field(default=None, repr=False)
    inner_end: Optional[List[float]] = field(default=None, repr=False)
    inner_met_tol: Optional[List[bool]] = field(default=None, repr=False)

    @property
    def num_tasks(self) -> int:
        return len(self.accuracies)

    @property
    def inner_grad_norm(self) -> Optional[float]:
        """Mean ‖∇G(φ)‖ over the tasks at the end of the inner solve (None if not recorded)."""
        return sum(self.inner_end) / len(self.inner_end) if self.inner_end else None

    @property
    def inner_converged(self) -> Optional[float]:
        """Fraction of the tasks whose inner solve met its tolerance ‖∇G‖ ≤ λ·tol (None if
        not recorded; 0 for a solver without tolerance)."""
        if not self.inner_met_tol:
            return None
        return sum(self.inner_met_tol) / len(self.inner_met_tol)

    @property
    def inner_grew(self) -> Optional[int]:
        """Tasks on which the inner solve ended with a larger ‖∇G‖ than it started with."""
        if not self.inner_end:
            return None
        return sum(e > s for s, e in zip(self.inner_start, self.inner_end))

    def inner_summary(self) -> Optional[str]:
        if not self.inner_end:
            return None
        start = sum(self.inner_start) / len(self.inner_start)
        return (f"inner problem: mean ||grad G|| {start:.3g} at theta -> {self.inner_grad_norm:.3g} "
                f"at the adapted phi; larger at phi than at theta on {self.inner_grew} of "
                f"{len(self.inner_end)} tasks; tolerance met on "
                f"{100 * (self.inner_converged or 0.0):.1f}%")

    @property
    def inner_warning(self) -> Optional[str]:
        """A warning when the inner solve made ‖∇G‖ grow on at least 1% of the tasks."""
        grew = self.inner_grew
        if not grew or grew < 0.01 * len(self.inner_end):
            return None
        return (f"warning: the inner solver ended with a larger ||grad G|| than it started with on "
                f"{grew} of {len(self.inner_end)} tasks: the proximal problem is not being solved "
                "(for gradient descent: the step is too long for the model's curvature plus "
                "lambda; try a smaller inner_lr or lambda, chosen on meta-validation)")

    def __str__(self) -> str:
        return (f"{100 * self.mean:.2f}% ± {100 * self.ci95:.2f}% "
                f"(95% CI over {self.num_tasks} tasks)")


def confidence_interval(accs: List[float]) -> EvalResult:
    n = len(accs)
    if n == 0:
        raise ValueError("no tasks were evaluated")
    t = torch.tensor(accs, dtype=torch.float64)
    std = float(t.std(unbiased=True)) if n > 1 else 0.0
    return EvalResult(float(t.mean()), 1.96 * std / math.sqrt(n), list(accs))


def _grad_norm(method, model: FunctionalModel, theta: torch.Tensor, task: Task, phi) -> float:
    problem = method.support_problem(model, theta, task.x_support, task.y_support)
    with torch.no_grad():
        return float(torch.linalg.vector_norm(problem.grad(phi)))


def evaluate(method, model: FunctionalModel, theta: torch.Tensor, sampler, num_tasks: int = 600,
             batch_size: int = 20, progress: bool = True, desc: str = "eval",
             inner_stats: Optional[bool] = None) -> EvalResult:
    """Adapt ``theta`` with ``method.adapt`` on tasks 0..num_tasks-1 of ``sampler``.

    ``inner_stats`` (default: when the method's λ > 0) records ‖∇G‖ at θ and at φ per task.
    """
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    if inner_stats is None:
        inner_stats = getattr(method, "lam", 0.0) > 0
    from tqdm import tqdm
    theta = theta.detach()
    accs: List[float] = []
    at_theta: List[float] = []
    at_phi: List[float] = []
    met: List[bool] = []
    bar = tqdm(total=num_tasks, desc=desc, disable=None if progress else True, leave=False)
    for start in range(0, num_tasks, batch_size):
        batch = sampler.batch(range(start, min(start + batch_size, num_tasks)))
        for task in batch.tasks():
            inner = method.adapt(model, theta, task.x_support, task.y_support)
            phi = inner.phi
            if inner_stats:  # the solvers' first gradient is taken at θ
                at_theta.append(inner.grad_norms[0] if inner.grad_norms else
                                _grad_norm(method, model, theta, task, theta))
                at_phi.append(inner.grad_norm if inner.grad_norm is not None else
                              _grad_norm(method, model, theta, task, phi))
                met.append(inner.converged)
            with torch.no_grad():
                pred = model.forward(phi, task.x_query).argmax(-1)
            accs.append(float((pred == task.y_query).float().mean()))
            bar.update(1)
            if len(accs) > 1:
                bar.set_postfix(acc=f"{100 * sum(accs) / len(accs):.2f}%")
    bar.close()
    res = confidence_interval(accs)
    if inner_stats:
        res.inner_start, res.inner_end, res.inner_met_tol = at_theta, at_phi, met
    return res
