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
from typing import Dict, Sequence, Tuple

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
    """The STATS sums of a BatchMetaGradient (in float64)."""
    n = len(r.query_loss)
    evaluated = torch.isfinite(r.inner_grad_norm)
    cg = r.cg_residual is not None
    total = lambda t: float(t.double().sum()) if t is not None else 0.0  # noqa: E731
    return [total(r.query_loss), total(r.query_accuracy), n, total(r.inner_grad_norm[evaluated]),
            int(evaluated.sum()), int(r.inner_converged.sum()), total(r.cg_residual),
            n if cg else 0, int(r.negative_curvature.sum()) if cg else 0]


def learns_lam(method) -> bool:
    """Whether ``method`` has one λ per parameter, whose gradient the meta-batch also sums."""
    return isinstance(getattr(method, "lam", None), torch.Tensor)


def carries_moments(method) -> bool:
    """Whether ``method``'s inner solver is an Adam that carries its moments across
    meta-iterations (their sum over tasks is summed with the meta-gradient)."""
    return bool(getattr(getattr(method, "inner", None), "carry", False))


def local_sums(method, model: FunctionalModel, theta: torch.Tensor, batch, batched: bool
               ) -> Dict[str, torch.Tensor]:
    """The sums over the tasks of ``batch`` (a TaskBatch, possibly empty: a rank with no task of
    the meta-batch contributes zeros) that a meta-batch adds up across ranks, field by field:
    ``grad`` (Σ task meta-gradients), ``lam_grad`` (Σ ∂L_test/∂λ, with one λ per parameter:
    ``learns_lam``), ``moments`` (Σ of the final Adam moments [2, P], ``carries_moments``) and
    ``stats`` (the STATS sums, float64)."""
    zeros = lambda *shape, dtype=theta.dtype: torch.zeros(*shape, dtype=dtype,  # noqa: E731
                                                          device=theta.device)
    if batch is None or len(batch) == 0:
        sums = {"grad": zeros(theta.numel()), "stats": zeros(len(STATS), dtype=torch.float64)}
        if learns_lam(method):
            sums["lam_grad"] = zeros(theta.numel())
        if carries_moments(method):
            sums["moments"] = zeros(2, theta.numel())
        return sums
    batch = batch.to(theta.device)  # tasks are sampled on the CPU and moved once
    r = batch_meta_gradient(method, model, theta, batch, vectorised=batched)
    sums = {"grad": r.grads.sum(0), "stats": torch.tensor(
        [float(v) for v in _batch_stats(r)], dtype=torch.float64, device=theta.device)}
    if r.lam_grads is not None:
        sums["lam_grad"] = r.lam_grads.sum(0)
    if r.inner_moments is not None:
        sums["moments"] = r.inner_moments.sum(0)
    return {k: v.detach() for k, v in sums.items()}


def all_reduce_fields(sums: Dict[str, torch.Tensor], world: int) -> Dict[str, torch.Tensor]:
    """Each tensor of ``sums`` summed over the ranks (one all-reduce, in float64)."""
    if world == 1:
        return sums
    keys = sorted(sums)
    flat = torch.cat([sums[k].double().flatten() for k in keys])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    parts = flat.split([sums[k].numel() for k in keys])
    return {k: p.reshape(sums[k].shape).to(sums[k].dtype) for k, p in zip(keys, parts)}


def mean_meta_gradient(method, model: FunctionalModel, theta: torch.Tensor, sampler,
                       indices: Sequence[int], batched: bool = True, rank: int = 0, world: int = 1):
    """(means, statistics) over the tasks ``indices`` of ``sampler``, computed across ranks
    when a process group is running. The means: the meta-gradient ``grad``, and ``lam_grad``
    and ``moments`` where the method has them (``local_sums``). The statistics: mean query loss and
    accuracy; mean ‖∇G‖ after the inner solve (over the tasks whose solver evaluated it, NaN if
    none did) and the fraction of tasks whose inner solve met its tolerance; for iMAML, the
    mean relative residual of the linear solve and the number of tasks whose linear solve met
    negative curvature."""
    mine = shard(indices, rank, world)
    sums = all_reduce_fields(
        local_sums(method, model, theta, sampler.batch(mine) if mine else None, batched), world)
    s = dict(zip(STATS, sums.pop("stats").tolist()))
    n = s["tasks"]
    stats = {"loss": s["loss"] / n, "accuracy": s["accuracy"] / n,
             "inner_grad_norm": (s["inner_grad_norm"] / s["inner_evaluated"]
                                 if s["inner_evaluated"] else float("nan")),
             "inner_converged": s["inner_converged"] / n,
             "cg_residual": s["cg_residual"] / s["cg_tasks"] if s["cg_tasks"] else float("nan"),
             "negative_curvature": int(s["negative_curvature"])}
    return {k: v / n for k, v in sums.items()}, stats


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
