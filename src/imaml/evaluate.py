"""The evaluation protocol: adapt on each test task's support set, score its query set, report the
mean accuracy (classification) or query loss (any other task, e.g. regression) with a 95%
confidence interval (1.96·std/√n) over at least 600 tasks.

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
from .meta import accuracy_of
from .tasks import Task

MIN_TEST_TASKS = 600


@dataclass
class EvalResult:
    """The mean of the task metric (``metric``: query accuracy for classification, query loss
    otherwise, e.g. the MSE of a regression) with its 95% CI half-width; per task, the
    accuracies (classification only), the query losses and, for a proximal inner problem,
    ‖∇G‖ at θ (``inner_start``) and at the adapted φ (``inner_end``)."""

    mean: float
    ci95: float
    accuracies: List[float] = field(repr=False)
    losses: List[float] = field(default_factory=list, repr=False)
    metric: str = "accuracy"
    inner_start: Optional[List[float]] = field(default=None, repr=False)
    inner_end: Optional[List[float]] = field(default=None, repr=False)
    inner_met_tol: Optional[List[bool]] = field(default=None, repr=False)

    @property
    def num_tasks(self) -> int:
        return len(self.accuracies) if self.metric == "accuracy" else len(self.losses)

    @property
    def loss(self) -> Optional[float]:
        """Mean query loss over the tasks (None if not recorded)."""
        return sum(self.losses) / len(self.losses) if self.losses else None

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
        if self.num_tasks == 1:  # no spread to estimate: say so instead of "± 0"
            value = f"query loss {self.mean:.4g}" if self.metric == "loss" else f"{100 * self.mean:.2f}%"
            return f"{value} (one task: no confidence interval)"
        if self.metric == "loss":
            return (f"query loss {self.mean:.4g} ± {self.ci95:.2g} "
                    f"(95% CI over {self.num_tasks} tasks)")
        return (f"{100 * self.mean:.2f}% ± {100 * self.ci95:.2f}% "
                f"(95% CI over {self.num_tasks} tasks)")


def confidence_interval(values: List[float], losses: Optional[List[float]] = None,
                        metric: str = "accuracy") -> EvalResult:
    """Mean and 95% CI half-width 1.96·std/√n of per-task values (accuracies, or losses with
    ``metric='loss'``)."""
    n = len(values)
    if n == 0:
        raise ValueError("no tasks were evaluated")
    t = torch.tensor(values, dtype=torch.float64)
    std = float(t.std(unbiased=True)) if n > 1 else 0.0
    accs = list(values) if metric == "accuracy" else []
    return EvalResult(float(t.mean()), 1.96 * std / math.sqrt(n), accs,
                      list(losses if losses is not None else (values if metric == "loss" else [])),
                      metric)


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
        inner_stats = bool((torch.as_tensor(getattr(method, "lam", 0.0)) > 0).all())
    from tqdm import tqdm
    theta = theta.detach()
    accs: List[float] = []
    losses: List[float] = []
    at_theta: List[float] = []
    at_phi: List[float] = []
    met: List[bool] = []
    bar = tqdm(total=num_tasks, desc=desc, disable=None if progress else True, leave=False)
    for start in range(0, num_tasks, batch_size):
        batch = sampler.batch(range(start, min(start + batch_size, num_tasks)))
        for task in batch.tasks():
            task = task.to(theta.device)  # sampled on the CPU, moved once
            inner = method.adapt(model, theta, task.x_support, task.y_support)
            phi = inner.phi
            if inner_stats:  # the solvers' first gradient is taken at θ
                at_theta.append(inner.grad_norms[0] if inner.grad_norms else
                                _grad_norm(method, model, theta, task, theta))
                at_phi.append(inner.grad_norm if inner.grad_norm is not None else
                              _grad_norm(method, model, theta, task, phi))
                met.append(inner.converged)
            with torch.no_grad():
                out = model.forward(phi, task.x_query)
                losses.append(float(model.loss_fn(out, task.y_query)))
            acc = accuracy_of(out, task.y_query)  # None unless class scores and integer labels
            if acc is not None:
                accs.append(acc)
            bar.update(1)
            if len(accs) > 1:
                bar.set_postfix(acc=f"{100 * sum(accs) / len(accs):.2f}%")
            elif len(losses) > 1:
                bar.set_postfix(loss=f"{sum(losses) / len(losses):.4g}")
    bar.close()
    res = (confidence_interval(accs, losses) if len(accs) == len(losses)
           else confidence_interval(losses, metric="loss"))
    if inner_stats:
        res.inner_start, res.inner_end, res.inner_met_tol = at_theta, at_phi, met
    return res
