"""Functional core: a user ``nn.Module`` seen as a pure function of a flat parameter vector.

Everything above this module (linear solvers, inner solvers, meta-gradients) works on flat 1-D
tensors: linear algebra on them is plain ``dot``/``axpy``, and ``torch.func.vmap`` batches them
over tasks. ``FunctionalModel`` turns a flat vector into the module's parameter dict (views, no
copies) and evaluates the module with ``torch.func.functional_call``.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Dict, Iterable, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value, jvp, vjp

from . import checks
from .tasks import _map

LossFn = Callable[[Tensor, Tensor], Tensor]


class NonFiniteError(FloatingPointError):
    """A loss, gradient or solver quantity became NaN or infinite."""


def check_finite(value: Tensor, what: str) -> None:
    """Raise ``NonFiniteError`` naming ``what`` if ``value`` holds a NaN or an infinity."""
    if not bool(torch.isfinite(value).all()):
        raise NonFiniteError(
            f"{what} is not finite ({value.detach().flatten()[:4].tolist()}...); "
            "lower the learning rate, check the inputs for NaN, or raise lam")


class FunctionalModel:
    """A module evaluated at any flat parameter vector.

    Args:
        module: any ``nn.Module``. Its parameters define the layout of the flat vector; its
            buffers are passed unchanged to every call. Batch norm should be built with
            ``track_running_stats=False`` (transductive, as in MAML): running statistics are
            state that a pure function cannot update.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``; cross-entropy by default.
        adapt: which parameters the inner problem adapts: names or name prefixes (``"13."``
            or ``"head"`` adapts a head, as in ANIL, Raghu et al. 2020); None adapts all. The
            others are meta-only: learned by the outer loop, held at θ in the inner problem
            (``adapt_mask``; the meta-gradient methods and ``implicit_solution`` use it).

    Inputs ``x`` may be a tensor, a tuple of tensors (the module's positional arguments) or a
    dict of tensors (its keyword arguments); the examples are indexed by the first dimension
    of each.

    The invariant: ``self.forward(self.theta(), x) == module(x)``.
    """

    def __init__(self, module: nn.Module, loss_fn: LossFn = nn.functional.cross_entropy,
                 adapt: Optional[Iterable[str]] = None):
        checks.instance("module", module, (nn.Module,), "a torch.nn.Module")
        checks.function("loss_fn", loss_fn, "a function loss_fn(outputs, targets) -> scalar "
                        "tensor")
        tracking = [n for n, m in module.named_modules()
                    if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]
        if tracking:
            raise ValueError(
                f"batch norm {tracking[0]!r} tracks running statistics: they are state that a "
                "pure function of the parameters cannot update, and they would leak between "
                "tasks and between support and query sets. Build it with "
                "track_running_stats=False (transductive batch norm, as in MAML)")
        self.module = module
        self.loss_fn = checks.checked_loss(loss_fn)  # a tensor of one value, no broadcasting
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the module has no trainable parameters")
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.num_params = sum(self.numels)
        self.buffers = {n: b for n, b in module.named_buffers()}
        self.adapt_mask = None if adapt is None else self._mask(list(adapt))

    def _mask(self, adapt) -> Tensor:
        if isinstance(adapt, str):
            adapt = [adapt]
        chosen = [any(n == a or n.startswith(a.rstrip(".") + ".") for a in adapt)
                  for n in self.names]
        unknown = [a for a in adapt if not any(n == a or n.startswith(a.rstrip(".") + ".")
                                               for n in self.names)]
        if unknown or not any(chosen):
            raise ValueError(f"adapt names no parameter of the module ({unknown or adapt}); "
                             f"its parameters: {', '.join(self.names)}")
        flat = dict(self.module.named_parameters())[self.names[0]]
        return torch.cat([torch.full((k,), float(c), dtype=flat.dtype, device=flat.device)
                          for k, c in zip(self.numels, chosen)])

    def adapted_names(self):
        """The names of the parameters the inner problem adapts."""
        if self.adapt_mask is None:
            return list(self.names)
        return [n for n, c in zip(self.names, torch.split(self.adapt_mask, self.numels))
                if bool(c[0])]

    # -- layout -------------------------------------------------------------------------
    def unflatten(self, flat: Tensor) -> Dict[str, Tensor]:
        """Split a flat vector into the module's parameter dict (views into ``flat``)."""
        if flat.shape[-1] != self.num_params or flat.dim() != 1:
            raise ValueError(f"expected a flat parameter vector of shape ({self.num_params},), "
                             f"got {tuple(flat.shape)}")
        chunks = torch.split(flat, self.numels)
        return {n: c.view(s) for n, c, s in zip(self.names, chunks, self.shapes)}

    def flatten(self, params: Dict[str, Tensor] | Iterable[Tensor]) -> Tensor:
        """Concatenate a parameter dict (or the module's parameter order) into one vector."""
        if isinstance(params, dict):
            missing = set(self.names) - set(params)
            if missing:
                raise ValueError(f"parameter dict lacks {sorted(missing)}")
            tensors = [params[n] for n in self.names]
        else:
            tensors = list(params)
        for t, s, n in zip(tensors, self.shapes, self.names):
            if t.shape != s:
                raise ValueError(f"parameter {n!r} has shape {tuple(t.shape)}, expected {tuple(s)}")
        return torch.cat([t.reshape(-1) for t in tensors])

    def theta(self) -> Tensor:
        """The module's current parameters as a detached flat copy."""
        return self.flatten(dict(self.module.named_parameters())).detach().clone()

    def load_(self, flat: Tensor) -> None:
        """Copy a flat vector into the module's parameters in place."""
        with torch.no_grad():
            for n, t in self.unflatten(flat).items():
                self.module.get_parameter(n).copy_(t)

    # -- evaluation ---------------------------------------------------------------------
    def forward(self, flat: Tensor, x) -> Tensor:
        params = (self.unflatten(flat), self.buffers)
        if isinstance(x, dict):
            return functional_call(self.module, params, (), x)
        return functional_call(self.module, params, tuple(x) if isinstance(x, (tuple, list)) else (x,))

    def loss(self, flat: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return self.loss_fn(self.forward(flat, x), y)


def hvp_fwd_rev(f: Callable[[Tensor], Tensor], x: Tensor) -> Callable[[Tensor], Tensor]:
    """Hessian-vector products of scalar ``f`` at ``x`` by forward-over-reverse:
    ``H v = d/dt ∇f(x + t v)`` at t=0, one forward-mode pass through the gradient per product."""
    g = grad(f)
    return lambda v: jvp(g, (x,), (v,))[1]


def hvp_rev_rev(f: Callable[[Tensor], Tensor], x: Tensor) -> Callable[[Tensor], Tensor]:
    """Hessian-vector products by reverse-over-reverse (double back-prop): the graph of ∇f(x)
    is built once and each product is one vector-Jacobian product through it (H is symmetric)."""
    _, vjp_fn = vjp(grad(f), x)
    return lambda v: vjp_fn(v)[0]


HVP_MODES = {"fwd-rev": hvp_fwd_rev, "rev-rev": hvp_rev_rev}
# Chosen by benchmarks/hvp.py: reusing the gradient graph (rev-rev) is faster on the Conv-4
# networks on CPU; see the README's table. Both are tested against a dense Hessian.
DEFAULT_HVP = "rev-rev"


def make_hvp(f: Callable[[Tensor], Tensor], x: Tensor, mode: str = DEFAULT_HVP):
    """Return ``v -> ∇²f(x) v`` using the named mode ('fwd-rev' or 'rev-rev')."""
    try:
        return HVP_MODES[mode](f, x)
    except KeyError:
        raise ValueError(f"unknown hvp mode {mode!r}; choose one of {sorted(HVP_MODES)}") from None


def make_ggn(model: "FunctionalModel", x: Tensor, y: Tensor, phi: Tensor) -> Callable[[Tensor], Tensor]:
    """Generalised Gauss-Newton products of the loss at φ: v -> Jᵀ ∇²_z ℓ(z) J v, with
    z = model.forward(φ, x) and J = ∂z/∂φ (Schraudolph 2002; Martens 2010).

    For a loss convex in the outputs (cross-entropy, squared error) the GGN is positive
    semi-definite, so I + G/λ is positive definite and CG never meets negative curvature. It
    drops the term Σ ∂ℓ/∂z ∇²z, which vanishes where the model fits its data; for a model linear
    in φ with squared loss it equals the Hessian exactly (tested).
    """
    f = lambda p: model.forward(p, x)  # noqa: E731
    z, vjp_fn = vjp(f, phi)
    # reverse-over-reverse on the loss of the outputs: forward-over-reverse through
    # torch.nn.functional.mse_loss fails inside torch ("ZeroTensors are immutable")
    out_hvp = make_hvp(lambda out: model.loss_fn(out, y), z.detach(), "rev-rev")
    return lambda v: vjp_fn(out_hvp(jvp(f, (phi,), (v,))[1]))[0]


class ProximalProblem:
    """The iMAML inner objective G(φ) = L̂(φ) + (λ/2)‖φ − θ‖² (Rajeswaran et al. 2019, eq. 4).

    Args:
        loss: L̂ as a function of the flat parameters φ.
        theta: the meta-parameters θ (flat). May require grad (MAML unrolls through it).
        lam: λ > 0 (λ = 0 gives the plain loss L̂, for MAML/Reptile baselines): a number, or a
            tensor of one λ per parameter (the shape of θ), for G(φ) = L̂(φ) + ½ Σᵢ λᵢ(φᵢ − θᵢ)².
        curvature: optional ``phi -> (v -> C v)`` replacing the Hessian of L̂ in ``hvp`` (for
            example the Gauss-Newton matrix, ``make_ggn``); None means the exact Hessian.
        mask: optional 0/1 tensor of θ's shape (``FunctionalModel.adapt_mask``): G is then
            minimised over the coordinates marked 1 only, the others held at θ (its gradient
            and Hessian products are those of G restricted to the adapted coordinates; a
            solver started at θ never moves the others).

    G is λ-strongly convex whenever L̂ is convex (λ the smallest λᵢ: ``lam_min``), so
    ‖φ − φ*‖ ≤ ‖∇G(φ)‖/λ; the inner solvers use that bound to stop at accuracy δ (with one λ
    per parameter they test ‖Λ⁻¹∇G(φ)‖ ≤ δ, ``imaml.inner``).
    """

    def __init__(self, loss: Callable[[Tensor], Tensor], theta: Tensor, lam,
                 curvature: Optional[Callable[[Tensor], Callable[[Tensor], Tensor]]] = None,
                 mask: Optional[Tensor] = None, subset=None, examples: int = 0):
        if isinstance(lam, Tensor) and lam.dim() > 0:
            if lam.shape != theta.shape:
                raise ValueError(f"a per-parameter lam must have θ's shape {tuple(theta.shape)}, "
                                 f"got {tuple(lam.shape)}")
            lam = lam.detach()
            self.lam_min = float(lam.min())
            finite = bool(torch.isfinite(lam).all())
        else:
            lam = self.lam_min = float(lam)
            finite = math.isfinite(lam)
        if not finite or self.lam_min < 0:
            raise ValueError(f"lam must be finite and >= 0, got {lam}")
        if mask is not None and mask.shape != theta.shape:
            raise ValueError(f"mask must have θ's shape {tuple(theta.shape)}, got {tuple(mask.shape)}")
        self.loss, self.theta, self.lam, self.curvature = loss, theta, lam, curvature
        self.mask = mask
        self.subset, self.examples = subset, examples

    def _restrict(self, v: Tensor) -> Tensor:
        return v if self.mask is None else self.mask * v

    def value(self, phi: Tensor) -> Tensor:
        if isinstance(self.lam, Tensor):
            d = phi - self.theta
            return self.loss(phi) + 0.5 * torch.dot(self.lam * d, d)
        if self.lam == 0:  # the baselines' plain inner loss: no proximal term to evaluate
            return self.loss(phi)
        d = phi - self.theta
        return self.loss(phi) + 0.5 * self.lam * torch.dot(d, d)

    def grad(self, phi: Tensor) -> Tensor:
        return self._grad_with(self.loss, phi)

    def _grad_with(self, loss: Callable[[Tensor], Tensor], phi: Tensor) -> Tensor:
        """∇ of loss(φ) + the proximal term, restricted to the adapted coordinates."""
        g, _ = _grad_and_value(loss, phi)
        if isinstance(self.lam, Tensor) or self.lam != 0:
            g = g + self.lam * (phi - self.theta)
        return self._restrict(g)

    def value_and_grad(self, phi: Tensor):
        """(G(φ), ∇G(φ)) from one forward and one backward pass."""
        g, value = _grad_and_value(self.value, phi)
        return value, self._restrict(g)

    def batch_grad(self, phi: Tensor, k: int, size: int) -> Tensor:
        """∇G on the k-th mini-batch of ``size`` support examples: consecutive slices of one
        fixed shuffled order of the examples, cycling through it (the full gradient when the
        problem was built without its examples, or ``size`` covers them all)."""
        n = self.examples
        if self.subset is None or size >= n:
            return self.grad(phi)
        idx = _example_order(n)[torch.arange(k * size, (k + 1) * size) % n].to(phi.device)
        return self._grad_with(self.subset(idx), phi)

    def hvp(self, phi: Tensor, mode: str = DEFAULT_HVP) -> Callable[[Tensor], Tensor]:
        """v -> ∇²G(φ) v = H v + λ v (H replaced by ``curvature(φ)`` when given)."""
        h = self.curvature(phi) if self.curvature is not None else make_hvp(self.loss, phi, mode)
        r = self._restrict
        return lambda v: r(h(r(v)) + self.lam * v)


_PEEK = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)


def _no_transform() -> bool:
    """Whether no torch.func transform (vmap, grad, jvp) is active around the caller; False
    where this torch cannot tell (its private hook missing), so ``torch.func`` is used."""
    return _PEEK is not None and _PEEK() is None


def _grad_and_value(f: Callable[[Tensor], Tensor], phi: Tensor):
    """(∇f(φ), f(φ)) for a scalar f of a flat φ, as ``torch.func.grad_and_value`` gives them,
    by plain autograd where no function transform (vmap, grad) is active: with a graph when φ is
    part of one (MAML's unrolled steps), without one under ``torch.no_grad``. Plain autograd
    skips functorch's per-operation wrapping (benchmarks/maml_autograd.py)."""
    if _no_transform():
        if not torch.is_grad_enabled():
            leaf = phi.detach().requires_grad_(True)
            with torch.enable_grad():
                value = f(leaf)
                (g,) = torch.autograd.grad(value, leaf)
            return g, value.detach()
        if phi.requires_grad:
            value = f(phi)
            (g,) = torch.autograd.grad(value, phi, create_graph=True)
            return g, value
    return grad_and_value(f)(phi)


@functools.lru_cache(maxsize=None)
def _example_order(n: int) -> Tensor:
    """A fixed pseudo-random order of n examples (Knuth's multiplicative hash: no random op,
    so it runs under vmap and is the same for every task), computed once per n."""
    return ((torch.arange(n) * 2654435761) % 2 ** 32).argsort()


def task_loss(model: FunctionalModel, x: Tensor, y: Tensor) -> Callable[[Tensor], Tensor]:
    """φ -> model.loss(φ, x, y)."""
    return lambda flat: model.loss(flat, x, y)


def inner_problem(model: FunctionalModel, x, y: Tensor, theta: Tensor, lam,
                  curvature: str = "hessian") -> ProximalProblem:
    """The proximal inner problem of the support set (x, y): G over the parameters ``model``
    adapts (its ``adapt_mask``), with the exact Hessian or, for ``curvature='ggn'``, the
    Gauss-Newton matrix in its curvature products (what Newton-CG uses)."""
    if curvature not in ("hessian", "ggn"):
        raise ValueError(f"curvature must be 'hessian' or 'ggn', got {curvature!r}")
    ggn = (lambda phi: make_ggn(model, x, y, phi)) if curvature == "ggn" else None
    subset = lambda idx: task_loss(model, _map(lambda t: t[idx], x), y[idx])  # noqa: E731
    return ProximalProblem(task_loss(model, x, y), theta, lam, curvature=ggn,
                           mask=model.adapt_mask, subset=subset, examples=y.shape[0])


def curvature_product(model: FunctionalModel, x, y: Tensor, phi: Tensor,
                      curvature: str = "hessian", hvp_mode: str = DEFAULT_HVP):
    """v -> H v, the support loss's Hessian at φ (or its Gauss-Newton matrix for 'ggn')."""
    if curvature == "ggn":
        return make_ggn(model, x, y, phi)
    return make_hvp(task_loss(model, x, y), phi, hvp_mode)
