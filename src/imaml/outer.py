"""The outer loop of Algorithm 1: average the task meta-gradients of a batch, step θ.

One outer step serves the trainer (``imaml train``, across processes) and a user's own loop
(``meta_step``): ``outer_update`` applies the batch means to θ (through any torch optimizer),
to a learned λ (``LearnedLam``) and to the Adam moments an inner solver carries, and returns
the new ``OuterState``. The state is explicit: a method object is never changed; the step
computes with ``state.apply(method)``, a copy that uses the state's λ and moments.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from . import checks
from .functional import FunctionalModel, check_finite
from .implicit import expand_lam
from .meta import MetaGradient
from .tasks import Task


class OuterState(NamedTuple):
    """What Algorithm 1 carries from one meta-iteration to the next besides θ and its optimizer.

    Attributes:
        lam: one λ per parameter (flat, θ's layout) that the method uses in place of its own:
            the learned λ (``LearnedLam``); None: the method's own λ.
        moments: the Adam moments [m, v] ([2, P]) an inner ``Adam(carry=True)`` carries over
            meta-iterations (config ``inner_carry``); None: none carried yet.
        inner_t: the inner steps those moments have seen.
    """

    lam: Optional[Tensor] = None
    moments: Optional[Tensor] = None
    inner_t: int = 0

    def apply(self, method):
        """``method`` with this state's λ and carried moments: a copy (``method`` is kept as
        it is), or ``method`` itself where the state holds neither."""
        changes: Dict[str, Any] = {}
        if self.lam is not None:
            changes["lam"] = self.lam
        if self.moments is not None:
            changes["inner"] = method.inner.with_moments(self.moments[0], self.moments[1],
                                                         self.inner_t)
        return replace(method, **changes) if changes else method


class LearnedLam:
    """One λ per parameter tensor, learned in the outer loop (config ``learn_lam``): λ = exp(s),
    Adam on s with ∂L/∂s_l = λ_l Σ_{i in tensor l} ∂L_test/∂λ_i, the gradient the implicit
    layer gives (``imaml.implicit``; iMAML's ``MetaGradient.lam_grad`` with a tensor λ).
    ``state`` (from ``state()``) restores a saved one."""

    def __init__(self, model: FunctionalModel, lam: float, lr: float, device=None,
                 state: Optional[Dict[str, Any]] = None):
        self.model = model
        self.log_lam = torch.nn.Parameter(torch.full((len(model.numels),), math.log(lam),
                                                     device=device))
        self.opt = torch.optim.Adam([self.log_lam], lr=lr)
        if state is not None:
            with torch.no_grad():
                self.log_lam.copy_(state["log_lam"])
            self.opt.load_state_dict(state["optimizer"])

    def per_parameter(self) -> Tensor:
        """λ expanded to one value per parameter (what ``IMAML(lam=...)`` takes)."""
        return expand_lam(self.model, self.log_lam.detach().exp())

    def step(self, lam_grad: Tensor) -> Tensor:
        """An Adam step on s from the batch-mean ∂L_test/∂λ per parameter; the new λ per
        parameter."""
        per_tensor = torch.stack([c.sum() for c in torch.split(lam_grad, self.model.numels)])
        self.log_lam.grad = (per_tensor * self.log_lam.detach().exp()).to(self.log_lam.dtype)
        self.opt.step()
        return self.per_parameter()

    def values(self) -> Dict[str, float]:
        return dict(zip(self.model.names, self.log_lam.detach().exp().tolist()))

    def state(self) -> Dict[str, Any]:
        return {"log_lam": self.log_lam.detach().clone(), "optimizer": self.opt.state_dict()}


@dataclass
class StepSummary:
    """Batch means of what the task meta-gradients reported, and the state for the next step."""

    query_loss: float
    query_accuracy: Optional[float]
    grad_norm: float
    results: List[MetaGradient]
    state: OuterState = OuterState()


def mean_task_meta_gradient(method, model: FunctionalModel, theta: Tensor, tasks: Sequence[Task]):
    """(mean task meta-gradient, per-task ``MetaGradient`` results) for a batch of tasks at θ,
    task by task (``imaml.batch_meta_gradient`` computes the same per-task terms stacked,
    looped or vmapped, which is what the trainer uses)."""
    if len(tasks) == 0:
        raise ValueError("a meta-batch needs at least one task")
    results = [method.meta_gradient(model, theta, t) for t in tasks]
    return torch.stack([r.grad for r in results]).sum(0) / len(results), results


def apply_meta_gradient(model: FunctionalModel, optimizer: torch.optim.Optimizer, g: Tensor) -> None:
    """Write the flat meta-gradient ``g`` into the module's ``.grad`` fields and step."""
    checks.instance("optimizer", optimizer, (torch.optim.Optimizer,), "a torch optimizer over "
                    "model.module.parameters(), e.g. torch.optim.Adam(module.parameters())")
    mine = {id(model.module.get_parameter(n)) for n in model.names}
    theirs = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not mine <= theirs:
        raise ValueError(f"the optimizer does not step {len(mine - theirs)} of the "
                         f"{len(mine)} parameter tensors of the model's module (θ would not "
                         "move there): build it over model.module.parameters()")
    check_finite(g, "meta-gradient")
    optimizer.zero_grad(set_to_none=False)
    for name, gi in model.unflatten(g).items():
        p = model.module.get_parameter(name)
        if p.grad is None:
            p.grad = gi.detach().clone()
        else:
            p.grad.copy_(gi)
    optimizer.step()


def outer_update(model: FunctionalModel, optimizer: torch.optim.Optimizer,
                 means: Dict[str, Tensor], state: OuterState,
                 learned_lam: Optional[LearnedLam] = None, inner_steps: int = 0) -> OuterState:
    """Step θ with the batch-mean meta-gradient ``means['grad']``, the learned λ (if any) with
    ``means['lam_grad']``, and carry ``means['moments']`` (if any: the mean final Adam moments
    of the batch's inner solves, ``inner_steps`` steps each): the state of the next step."""
    apply_meta_gradient(model, optimizer, means["grad"])
    lam = state.lam if learned_lam is None else learned_lam.step(means["lam_grad"])
    if means.get("moments") is None:
        return state._replace(lam=lam)
    return OuterState(lam, means["moments"], state.inner_t + inner_steps)


def meta_step(method, model: FunctionalModel, optimizer: torch.optim.Optimizer,
              tasks: Sequence[Task], state: Optional[OuterState] = None,
              learned_lam: Optional[LearnedLam] = None) -> StepSummary:
    """One step of Algorithm 1: θ ← optimizer step with the batch-mean task meta-gradient.

    ``optimizer`` must optimise ``model.module.parameters()`` (any torch optimizer: SGD, Adam).
    ``state``: what the last step returned (``summary.state``): the λ and the Adam moments
    carried from it (None: the method's own). ``learned_lam``: learn iMAML's λ per parameter
    tensor (the trainer's ``learn_lam``; the method then needs a per-parameter λ, which the
    first step takes from ``learned_lam``). An ``Adam(carry=True)`` inner solver carries its
    batch-mean final moments into the next step (the trainer's ``inner_carry``).
    """
    state = OuterState() if state is None else state
    if learned_lam is not None and state.lam is None:
        state = state._replace(lam=learned_lam.per_parameter())
    configured = state.apply(method)
    g, results = mean_task_meta_gradient(configured, model, model.theta(), tasks)
    means = {"grad": g}
    if learned_lam is not None:
        if results[0].lam_grad is None:
            raise ValueError(f"learned_lam learns iMAML's λ; {type(method).__name__} gives no "
                             "gradient in λ")
        means["lam_grad"] = torch.stack([r.lam_grad for r in results]).mean(0)
    moments = [r.inner.moments for r in results]
    if moments[0] is not None:
        means["moments"] = torch.stack(moments).mean(0)
    state = outer_update(model, optimizer, means, state, learned_lam, configured.inner.steps)
    accs = [r.query_accuracy for r in results]
    return StepSummary(
        query_loss=sum(r.query_loss for r in results) / len(results),
        query_accuracy=None if None in accs else sum(accs) / len(accs),
        grad_norm=float(torch.linalg.vector_norm(g)),
        results=results,
        state=state,
    )
