"""The record every layer shares: a task (support and query sets) and a stacked batch of tasks.

At the bottom of the package: data loaders produce these, methods consume them, and neither
imports the other.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Task:
    """One few-shot task: a support (training) set and a query (test) set."""

    x_support: Tensor
    y_support: Tensor
    x_query: Tensor
    y_query: Tensor

    def to(self, device) -> "Task":
        """The same task with its tensors on ``device`` (itself when they are there already)."""
        if device is None or self.x_support.device == torch.device(device):
            return self
        return type(self)(*(t.to(device) for t in (self.x_support, self.y_support,
                                                    self.x_query, self.y_query)))

    def __post_init__(self):
        for x, y, name in ((self.x_support, self.y_support, "support"),
                           (self.x_query, self.y_query, "query")):
            if x.shape[0] != y.shape[0]:
                raise ValueError(f"{name} set has {x.shape[0]} inputs but {y.shape[0]} targets")


@dataclass
class TaskBatch(Task):
    """A batch of tasks as stacked tensors, task index first: x_* [tasks, examples, ...],
    y_* [tasks, examples, ...]. ``batch[i]`` is the i-th ``Task``."""

    def __post_init__(self):
        if not (self.x_support.shape[0] == self.y_support.shape[0] == self.x_query.shape[0]
                == self.y_query.shape[0]):
            raise ValueError("a task batch needs the same number of tasks in all four tensors")

    def __len__(self) -> int:
        return self.x_support.shape[0]

    def __getitem__(self, i: int) -> Task:
        return Task(self.x_support[i], self.y_support[i], self.x_query[i], self.y_query[i])

    def tasks(self):
        return [self[i] for i in range(len(self))]
