"""Data-parallel meta-training on PyTorch's own distributed stack (``torch.distributed``).

The outer average over tasks is data-parallel by nature: each rank computes the task
meta-gradients of its share of the meta-batch (tasks ``rank, rank + world, ...`` of the
iteration, drawn from the same seeded sampler on every rank, so no data moves), and one
``all_reduce`` sums gradients, losses, accuracies, task counts and the diagnostics of the inner
and linear solves. Every rank then takes the same
optimizer step from the same state, so the replicas stay identical; rank 0 alone logs, validates
and writes checkpoints. Launch with ``torchrun`` (gloo on CPU, NCCL on GPU):

    torchrun --standalone --nproc_per_node=2 -m imaml.cli train configs/... --out runs/x
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Sequence, Tuple

import torch
import torch.distributed as dist

from .batched import batch_meta_gradient
from .functional import FunctionalModel


def resolve_device(name: str = "auto") -> torch.device:
    """'auto': this process's GPU when CUDA is available (``LOCAL_RANK`` under torchrun), else
    the CPU; 'cpu', 'cuda' (this process's GPU) or 'cuda:N' as given."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: this torch has no CUDA device "
                             "(torch.cuda.is_available() is False); use device=cpu or auto")
        if name == "cuda":
            name = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        if int(name.split(":")[1]) >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif name != "cpu":
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    return torch.device(name)


def init_from_env(device: torch.device = torch.device("cpu")) -> Tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun (WORLD_SIZE > 1):
    NCCL when this process computes on a GPU (its own, ``device``), gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        die_with_the_launcher()
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def die_with_the_launcher() -> None:
    """Under torchrun, end this worker when its launcher (the torchrun agent, the parent) ends.
    Killed with SIGKILL the agent cannot stop its workers, which trained on as orphans: Linux's
    PR_SET_PDEATHSIG has the kernel send this process SIGTERM when its parent dies (elsewhere
    nothing is done). SIGTERM ends a worker at once; its records are whole (atomic writes), and
    ``--resume`` continues from the last checkpoint."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the launcher died before the call: adopted by init already
        os.kill(os.getpid(), signal.SIGTERM)


def peer_failure(error: BaseException) -> bool:
    """Whether ``error`` is a collective of this process failing because another process of the
    group ended (killed, or stopped by its own error): not a bug of this process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return False
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "gloo",
                            "NCCL", "Broken pipe"))


def shard(indices: Sequence[int], rank: int, world: int) -> list:
    """This rank's tasks of a meta-batch: every world-th, starting at rank."""
    return list(indices)[rank::world]


# Per-task figures summed across ranks besides the meta-gradient; their means go to the run
# records (metrics.csv and the progress line).
STATS = ("loss", "accuracy", "tasks", "inner_grad_norm", "inner_evaluated", "inner_converged",
         "cg_residual", "cg_tasks", "negative_curvature")


def _batch_stats(r) -> list:
    """The STATS sums of a BatchMetaGradient."""
    n = len(r.query_loss)
    evaluated = torch.isfinite(r.inner_grad_norm)
    acc = r.query_accuracy.sum() if r.query_accuracy is not None else 0.0
    cg = r.cg_residual is not None
    return [r.query_loss.sum(), acc, n, r.inner_grad_norm[evaluated].sum(), evaluated.sum(),
            r.inner_converged.sum(), r.cg_residual.sum() if cg else 0.0, n if cg else 0,
            r.negative_curvature.sum() if cg else 0]


def learns_lam(method) -> bool:
    """Whether ``method`` has one λ per parameter, whose gradient the meta-batch also sums."""
    return isinstance(getattr(method, "lam", None), torch.Tensor)


def carries_moments(method) -> bool:
    """Whether ``method``'s inner solver is an Adam that carries its moments across
    meta-iterations (their sum over tasks is summed with the meta-gradient)."""
    return bool(getattr(getattr(method, "inner", None), "carry", False))


def local_sums(method, model: FunctionalModel, theta: torch.Tensor, batch, batched: bool):
    """(Σ task meta-gradients, the STATS sums as a float64 vector) for the tasks of ``batch``
    (a TaskBatch, possibly empty: a rank with no task of the meta-batch contributes zeros).
    With one λ per parameter (``learns_lam``) the first is [Σ ∂/∂θ, Σ ∂L_test/∂λ] (2P); with
    carried Adam moments (``carries_moments``) Σ m and Σ v follow (2P more)."""
    p = theta.numel() * (1 + learns_lam(method) + 2 * carries_moments(method))
    if batch is None or len(batch) == 0:
        return (torch.zeros(p, dtype=theta.dtype, device=theta.device),
                torch.zeros(len(STATS), dtype=torch.float64, device=theta.device))
    batch = batch.to(theta.device)  # tasks are sampled on the CPU and moved once
    r = batch_meta_gradient(method, model, theta, batch, vectorised=batched)
    g, stats = r.grads.sum(0), _batch_stats(r)
    lam_grad = r.lam_grads.sum(0) if r.lam_grads is not None else None
    moments = r.inner_moments.sum(0) if r.inner_moments is not None else None
    if lam_grad is not None:
        g = torch.cat([g, lam_grad])
    if moments is not None:
        g = torch.cat([g, moments.flatten()])
    return g.detach(), torch.tensor([float(v) for v in stats], dtype=torch.float64,
                                    device=g.device)


def mean_meta_gradient(method, model: FunctionalModel, theta: torch.Tensor, sampler,
                       indices: Sequence[int], batched: bool = True, rank: int = 0, world: int = 1):
    """(mean meta-gradient, statistics) over the tasks ``indices`` of ``sampler``, computed
    across ranks when a process group is running. The statistics: mean query loss and
    accuracy; mean ‖∇G‖ after the inner solve (over the tasks whose solver evaluated it, NaN if
    none did) and the fraction of tasks whose inner solve met its tolerance; for iMAML, the
    mean relative residual of the linear solve and the number of tasks whose linear solve met
    negative curvature."""
    mine = shard(indices, rank, world)
    g, sums = local_sums(method, model, theta, sampler.batch(mine) if mine else None, batched)
    if world > 1:
        both = torch.cat([g.double(), sums])
        dist.all_reduce(both, op=dist.ReduceOp.SUM)
        g, sums = both[:g.numel()].to(g.dtype), both[g.numel():]
    s = dict(zip(STATS, sums.tolist()))
    n = s["tasks"]
    stats = {"loss": s["loss"] / n, "accuracy": s["accuracy"] / n,
             "inner_grad_norm": (s["inner_grad_norm"] / s["inner_evaluated"]
                                 if s["inner_evaluated"] else float("nan")),
             "inner_converged": s["inner_converged"] / n,
             "cg_residual": s["cg_residual"] / s["cg_tasks"] if s["cg_tasks"] else float("nan"),
             "negative_curvature": int(s["negative_curvature"])}
    return g / n, stats


def broadcast_parameters(module: torch.nn.Module, world: int) -> None:
    """Make every rank start from rank 0's parameters."""
    if world > 1:
        for p in module.parameters():
            dist.broadcast(p.data, src=0)


def from_rank0(value: float, world: int) -> float:
    """Rank 0's value of a float on every rank (for decisions all ranks must share)."""
    if world == 1:
        return value
    on_gpu = dist.get_backend() == "nccl"  # NCCL moves CUDA tensors only
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return float(t)


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()
