"""The evaluation protocol: adapt on each test task's support set, score its query set, report the
mean accuracy with a 95% confidence interval (1.96·std/√n) over at least 600 tasks.

Tasks come from a ``TaskSampler`` with a fixed seed, so every method evaluated with the same seed
sees exactly the same tasks. Select models on meta-validation; run this on meta-test once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List

import torch

from .functional import FunctionalModel

MIN_TEST_TASKS = 600


@dataclass
class EvalResult:
    mean: float
    ci95: float
    accuracies: List[float] = field(repr=False)

    @property
    def num_tasks(self) -> int:
        return len(self.accuracies)

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


def evaluate(method, model: FunctionalModel, theta: torch.Tensor, sampler, num_tasks: int = 600,
             batch_size: int = 20, progress: bool = True, desc: str = "eval") -> EvalResult:
    """Adapt ``theta`` with ``method.adapt`` on tasks 0..num_tasks-1 of ``sampler``."""
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    from tqdm import tqdm
    accs: List[float] = []
    bar = tqdm(total=num_tasks, desc=desc, disable=None if progress else True, leave=False)
    for start in range(0, num_tasks, batch_size):
        batch = sampler.batch(range(start, min(start + batch_size, num_tasks)))
        for task in batch.tasks():
            phi = method.adapt(model, theta, task.x_support, task.y_support).phi
            with torch.no_grad():
                pred = model.forward(phi, task.x_query).argmax(-1)
            accs.append(float((pred == task.y_query).float().mean()))
            bar.update(1)
            if len(accs) > 1:
                bar.set_postfix(acc=f"{100 * sum(accs) / len(accs):.2f}%")
    bar.close()
    return confidence_interval(accs)
