"""Few-shot datasets (Omniglot, Mini-ImageNet), the N-way K-shot task sampler and errors."""
from .common import DataError, ImageClasses
from .miniimagenet import load_miniimagenet
from .omniglot import load_omniglot, omniglot_split, split_names
from .sampler import TaskBatch, TaskSampler, load_split
from .sinusoid import SinusoidTasks

__all__ = ["DataError", "ImageClasses", "load_miniimagenet", "load_omniglot", "omniglot_split",
           "split_names", "SinusoidTasks", "TaskBatch", "TaskSampler", "load_split"]
