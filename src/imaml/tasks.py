"""The record every layer shares: a task (support and query sets) and a stacked batch of tasks.

At the bottom of the package: data loaders produce these, methods consume them, and neither
imports the other.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import checks


def _leaves(x):
    """The tensors of an input: a tensor, a tuple/list of tensors or a dict of tensors."""
    if isinstance(x, dict):
        return list(x.values())
    return list(x) if isinstance(x, (tuple, list)) else [x]


def _map(fn, x):
    if isinstance(x, dict):
        return {k: fn(v) for k, v in x.items()}
    return type(x)(fn(v) for v in x) if isinstance(x, (tuple, list)) else fn(x)


def _count(x, name: str) -> int:
    for t in _leaves(x):
        checks.tensor(f"the inputs of the {name} set", t, "torch tensors (a tensor, or a tuple or "
                      "dict of tensors)")
        if t.dim() == 0:
            raise ValueError(f"the inputs of the {name} set need a first dimension of examples, "
                             "got a 0-d tensor")
    sizes = {int(t.shape[0]) for t in _leaves(x)}
    if len(sizes) != 1:
        raise ValueError(f"the inputs of the {name} set disagree on the number of examples "
                         f"(first dimensions {sorted(sizes)})")
    return sizes.pop()


@dataclass
class Task:
    """One few-shot task: a support (training) set and a query (test) set. Inputs may be a
    tensor, a tuple of tensors (a model with several positional inputs) or a dict of tensors
    (keyword inputs), examples along the first dimension of each."""

    x_support: Tensor
    y_support: Tensor
    x_query: Tensor
    y_query: Tensor

    def to(self, device) -> "Task":
        """The same task with its tensors on ``device`` (itself when they are there already)."""
        if device is None or self.y_support.device == torch.device(device):
            return self
        move = lambda t: t.to(device)  # noqa: E731
        return type(self)(*(_map(move, x) for x in (self.x_support, self.y_support,
                                                    self.x_query, self.y_query)))

    def __post_init__(self):
        for x, y, name in ((self.x_support, self.y_support, "support"),
                           (self.x_query, self.y_query, "query")):
            n = _count(x, name)
            checks.tensor(f"the targets of the {name} set", y)
            if n == 0:
                raise ValueError(f"the {name} set is empty: a task needs at least one {name} "
                                 "example")
            if n != y.shape[0]:
                raise ValueError(f"{name} set has {n} inputs but {y.shape[0]} targets")


@dataclass
class TaskBatch(Task):
    """A batch of tasks as stacked tensors, task index first: x_* [tasks, examples, ...],
    y_* [tasks, examples, ...]. ``batch[i]`` is the i-th ``Task``."""

    def __post_init__(self):
        if not (_count(self.x_support, "support") == self.y_support.shape[0]
                == _count(self.x_query, "query") == self.y_query.shape[0]):
            raise ValueError("a task batch needs the same number of tasks in all four tensors")

    def __len__(self) -> int:
        return self.y_support.shape[0]

    def __getitem__(self, i: int) -> Task:
        pick = lambda t: t[i]  # noqa: E731
        return Task(*(_map(pick, x) for x in (self.x_support, self.y_support, self.x_query,
                                              self.y_query)))

    def tasks(self):
        return [self[i] for i in range(len(self))]
