"""N-way K-shot task sampling, reproducible from (seed, task index) alone."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..tasks import Task, TaskBatch
from .common import ImageClasses

DATASETS = ("omniglot", "miniimagenet")


def _mix(seed: int, index: int) -> int:
    """A 63-bit generator seed from (seed, index) (splitmix64 finaliser)."""
    z = (seed * 0x9E3779B97F4A7C15 + index + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


class TaskSampler:
    """N-way K-shot tasks with Q queries per class from a set of classes.

    Task ``i`` depends only on (``seed``, ``i``): the same seed gives the same tasks in any
    process, on any method, in any order. Within a task, classes get labels 0..N-1 in a random
    order (labels are permuted per task); support and query images of a class are distinct.
    Pixels are scaled to [0, 1].
    """

    def __init__(self, classes: ImageClasses, ways: int, shots: int, queries: int, seed: int = 0):
        if ways < 2:
            raise ValueError(f"ways must be at least 2, got {ways}")
        if shots < 1 or queries < 1:
            raise ValueError(f"shots and queries must be at least 1, got {shots} and {queries}")
        if ways > classes.num_classes:
            raise ValueError(f"{ways}-way tasks need {ways} classes but this split has only "
                             f"{classes.num_classes}; lower the number of ways")
        need = shots + queries
        counts = classes.counts
        short = (counts < need).nonzero().flatten().tolist()
        if short:
            c = short[0]
            raise ValueError(f"{len(short)} classes have fewer than shots + queries = {need} images "
                             f"(e.g. {classes.names[c]!r} has {int(counts[c])}); lower shots or queries")
        self.classes, self.ways, self.shots, self.queries, self.seed = classes, ways, shots, queries, seed
        self._counts = counts.to(torch.float32)
        self._ragged = bool((counts != counts[0]).any())
        self._max = int(counts.max())

    def _indices(self, index: int):
        g = torch.Generator().manual_seed(_mix(self.seed, index))
        cls = torch.randperm(self.classes.num_classes, generator=g)[: self.ways]
        r = torch.rand(self.ways, self._max, generator=g)
        if self._ragged:
            r = r.masked_fill(torch.arange(self._max) >= self._counts[cls, None], 2.0)
        pick = r.argsort(dim=1)[:, : self.shots + self.queries]
        return self.classes.offsets[cls, None] + pick  # [ways, shots + queries]

    def sample(self, index: int) -> Task:
        """Task number ``index``."""
        b = self.batch([index])
        return b[0]

    def batch(self, indices: Sequence[int]) -> TaskBatch:
        """The tasks at ``indices`` stacked: [len(indices), N*K, C, H, W] etc."""
        idx = torch.stack([self._indices(i) for i in indices])  # [B, N, K+Q]
        x = self.classes.images[idx].float().div_(255.0)  # [B, N, K+Q, C, H, W]
        B, N, K = len(indices), self.ways, self.shots
        shape = x.shape[3:]
        labels = torch.arange(N)
        return TaskBatch(x[:, :, :K].reshape(B, N * K, *shape),
                         labels.repeat_interleave(K).expand(B, -1).contiguous(),
                         x[:, :, K:].reshape(B, N * self.queries, *shape),
                         labels.repeat_interleave(self.queries).expand(B, -1).contiguous())


def load_split(dataset: str, split: str, data_dir: Optional[str] = None, **kwargs) -> ImageClasses:
    """The classes of ``split`` of ``dataset`` ('omniglot' or 'miniimagenet')."""
    if dataset == "omniglot":
        from .omniglot import omniglot_split
        return omniglot_split(split, data_dir, **kwargs)
    if dataset == "miniimagenet":
        from .miniimagenet import load_miniimagenet
        return load_miniimagenet(split, data_dir, **kwargs)
    raise ValueError(f"unknown dataset {dataset!r}; choose one of {DATASETS}")
