"""imaml: implicit model-agnostic meta-learning (Rajeswaran, Finn, Kakade, Levine, NeurIPS 2019)."""
import os as _os
import sys as _sys

# Thread policy (README, "Threads"): torch's OpenMP threads that wait for work sleep instead of
# spinning, so that one busy process beside a training run costs it 22% of its throughput
# instead of 69% (benchmarks/threads.py). It can only take effect before torch is loaded, and a
# value the user set is kept (OMP_WAIT_POLICY=ACTIVE is faster on a machine of one's own).
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from .functional import (FunctionalModel, NonFiniteError, ProximalProblem, make_hvp,
                         hvp_fwd_rev, hvp_rev_rev, task_loss)
from .implicit import implicit_solution
from .inner import Adam, GradientDescent, InnerResult, Nesterov, NewtonCG
from .linear import (CGResult, LinearSolveResult, conjugate_gradient, dense_solve, minres,  # noqa: F401
                     neumann_series)
from .meta import FOMAML, IMAML, MAML, MetaGradient, Reptile, TruncatedMAML
from .tasks import Task, TaskBatch
from .models import conv4, miniimagenet_conv4, omniglot_conv4
from .batched import BatchMetaGradient, batch_meta_gradient
from .outer import meta_step
from .checkpoint import MetaModel

__version__ = "0.1.0"

__all__ = [
    "FunctionalModel", "NonFiniteError", "ProximalProblem", "make_hvp", "hvp_fwd_rev",
    "hvp_rev_rev", "task_loss", "Adam", "GradientDescent", "Nesterov", "NewtonCG", "InnerResult",
    "LinearSolveResult", "conjugate_gradient", "minres", "dense_solve", "neumann_series", "IMAML",
    "MAML",
    "TruncatedMAML", "FOMAML", "Reptile", "Task", "TaskBatch", "MetaGradient", "conv4", "omniglot_conv4",
    "miniimagenet_conv4", "batch_meta_gradient", "BatchMetaGradient", "meta_step", "MetaModel", "implicit_solution",
]
