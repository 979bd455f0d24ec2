"""MAML's sinusoid regression (Finn, Abbeel, Levine 2017, section 5.1) as a task family.

Task i: y = A sin(x − b) with amplitude A ~ U[0.1, 5] and phase b ~ U[0, π]; support and query
inputs x ~ U[−5, 5]. Like ``TaskSampler``, task i depends only on (seed, i).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..tasks import Task, TaskBatch
from .sampler import _mix


class SinusoidTasks:
    """Sinusoid regression tasks with ``shots`` support and ``queries`` query points.

    Inputs and targets are float tensors of shape [points, 1] (for an MLP 1 → ... → 1 and
    ``torch.nn.functional.mse_loss``).
    """

    def __init__(self, shots: int = 10, queries: int = 10, seed: int = 0,
                 dtype: torch.dtype = torch.float32):
        if shots < 1 or queries < 1:
            raise ValueError(f"shots and queries must be at least 1, got {shots} and {queries}")
        self.shots, self.queries, self.seed, self.dtype = shots, queries, seed, dtype

    def _draw(self, index: int):
        g = torch.Generator().manual_seed(_mix(self.seed, index))
        amplitude = 0.1 + 4.9 * torch.rand((), generator=g, dtype=torch.float64)
        phase = math.pi * torch.rand((), generator=g, dtype=torch.float64)
        return amplitude, phase, g

    def parameters(self, index: int):
        """(amplitude A, phase b) of task number ``index``."""
        amplitude, phase, _ = self._draw(index)
        return float(amplitude), float(phase)

    def sample(self, index: int) -> Task:
        """Task number ``index``."""
        amplitude, phase, g = self._draw(index)
        x = 10 * torch.rand(self.shots + self.queries, 1, generator=g, dtype=torch.float64) - 5
        y = amplitude * torch.sin(x - phase)
        x, y = x.to(self.dtype), y.to(self.dtype)
        k = self.shots
        return Task(x[:k], y[:k], x[k:], y[k:])

    def batch(self, indices: Sequence[int]) -> TaskBatch:
        tasks = [self.sample(i) for i in indices]
        return TaskBatch(*(torch.stack([getattr(t, f) for t in tasks])
                           for f in ("x_support", "y_support", "x_query", "y_query")))
