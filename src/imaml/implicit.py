"""The implicit layer: the solution of the proximal inner problem as a differentiable function of
θ and λ.

    φ*(θ, λ) = argmin_φ  G(φ) = L̂(φ) + ½ Σᵢ λᵢ (φᵢ − θᵢ)²

Its stationarity condition ∇L̂(φ*) + Λ(φ* − θ) = 0 (Λ = diag λ) defines φ* implicitly; the
implicit function theorem gives, with H = ∇²L̂(φ*),

    dφ*/dθ = (H + Λ)⁻¹ Λ,        ∂φ*/∂λᵢ = −(H + Λ)⁻¹ eᵢ (φ*ᵢ − θᵢ).

So for an upstream gradient v = ∂ℓ/∂φ, with w = (H + Λ)⁻¹ v: ∂ℓ/∂θ = Λ w and
∂ℓ/∂λᵢ = −(φ*ᵢ − θᵢ) wᵢ (summed over a layer for per-layer λ, over all for a scalar λ).
For a scalar λ, Λ w = (I + H/λ)⁻¹ v is exactly iMAML's task meta-gradient (Algorithm 2), which
``IMAML`` computes with the same ``adjoint_solve``, without autograd's backward.

**Adapting part of the network** (``FunctionalModel(adapt=...)``, ANIL): with the adapted
coordinates h and the meta-only ones b held at θ_b, the inner problem is over φ_h alone and
    w_h = (H_hh + Λ_h)⁻¹ v_h,   ∂ℓ/∂θ_h = Λ_h w_h,   ∂ℓ/∂θ_b = v_b − H_bh w_h,
the last term being how the adapted head moves when the body changes (one more Hessian product).

``implicit_solution`` runs any inner solver without a graph (memory independent of its steps)
and returns φ connected to θ and λ by a ``torch.autograd.Function`` whose backward solves the
adjoint system with the chosen linear solver. For a scalar λ the system is iMAML's own,
(I + H/λ) z = v; for λ per layer or per parameter it is solved in the symmetric scaling
(I + Λ^{-1/2} H Λ^{-1/2}) z = Λ^{-1/2} v, w = Λ^{-1/2} z.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from .functional import FunctionalModel, curvature_product, inner_problem
from .linear import CG_POLICIES, LinearSolveResult, conjugate_gradient, minres

Lam = Union[float, Tensor]


def expand_lam(model: FunctionalModel, lam: Tensor) -> Tensor:
    """λ as one value per parameter (differentiably): from a scalar, from one value per
    parameter tensor of the model (per layer, in ``model.names`` order) or as given."""
    if lam.dim() == 0 or lam.numel() == 1:
        return lam.reshape(()).expand(model.num_params)
    if lam.numel() == len(model.numels):
        return torch.repeat_interleave(lam, torch.tensor(model.numels, device=lam.device))
    if lam.numel() == model.num_params:
        return lam.reshape(-1)
    raise ValueError(f"lam must be a scalar, one value per parameter tensor ({len(model.numels)}: "
                     f"{', '.join(model.names)}) or one per parameter ({model.num_params}); got "
                     f"{lam.numel()} values")


def adjoint_solve(curv: Callable[[Tensor], Tensor], v: Tensor, lam: Lam, mask: Optional[Tensor],
                  solve: Callable) -> Tuple[Tensor, Tensor, LinearSolveResult]:
    """(∂ℓ/∂θ, w, the linear solver's result) for the upstream gradient v = ∂ℓ/∂φ at a solved
    inner problem, where w = (H + Λ)⁻¹ v on the adapted coordinates (module docstring).

    ``curv`` is v -> H v at φ; ``lam`` a number (iMAML's system, unscaled) or one λ per
    parameter; ``mask`` the adapted coordinates (None: all); ``solve(A, b)`` any of the linear
    solvers. Plain tensor arithmetic: it runs per task and under ``vmap``."""
    r = (lambda u: u) if mask is None else (lambda u: mask * u)  # noqa: E731
    if isinstance(lam, Tensor):
        s = lam.rsqrt()
        lin = solve(lambda u: u + r(s * curv(s * r(u))), r(s * v))
        w = s * lin.x
        g = lam * w
    else:
        lin = solve(lambda u: u + r(curv(r(u))) / lam, r(v))
        w = lin.x / lam
        g = lin.x
    if mask is not None:  # the meta-only coordinates: v_b − H_bh w_h
        g = mask * g + (1 - mask) * (v - curv(w))
    return g, w, lin


class _Implicit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, theta, lam, setup):
        model, x, y, inner, solve, record, scalar, curvature, hvp_mode = setup
        theta_d, lam_d = theta.detach(), lam.detach()
        # a scalar λ goes in as a number: the very problem IMAML solves
        lam_p = float(lam_d[0]) if scalar else lam_d
        with torch.no_grad():
            result = inner.solve(inner_problem(model, x, y, theta_d, lam_p, curvature), theta_d)
        phi = result.phi.detach()
        if record is not None:
            record["inner"] = result
        ctx.save_for_backward(theta_d, lam_d, phi)
        ctx.setup = setup
        return phi

    @staticmethod
    def backward(ctx, v):
        theta, lam, phi = ctx.saved_tensors
        model, x, y, inner, solve, record, scalar, curvature, hvp_mode = ctx.setup
        curv = curvature_product(model, x, y, phi, curvature, hvp_mode)
        g, w, res = adjoint_solve(curv, v, float(lam[0]) if scalar else lam, model.adapt_mask,
                                  solve)
        if record is not None:
            record["linear"] = res
        return g.detach(), -(phi - theta) * w.detach(), None


def implicit_solution(model: FunctionalModel, theta, lam, x, y: Tensor, inner,
                      linear_solver: str = "minres", max_iter: int = 20, rtol: float = 0.0,
                      atol: float = 0.0, curvature: str = "hessian", hvp_mode: str = "rev-rev",
                      on_negative_curvature: str = "stop", record: Optional[Dict] = None):
    """φ*(θ, λ) for the support set (x, y), differentiable with respect to θ and λ.

    Args:
        model: the functional model whose support loss L̂ defines the inner problem (with
            ``adapt=...``, only those parameters are adapted; the rest get the meta-only
            gradient of the module docstring).
        theta: the meta-parameters, flat (may require grad), or a dict name -> tensor in the
            model's layout; φ is returned in the same form.
        lam: λ > 0 as a number or tensor: a scalar, one value per parameter tensor (per layer)
            or one per parameter; a tensor that requires grad gets ∂ℓ/∂λ.
        x, y: the support set (x a tensor, a tuple or a dict of the module's inputs).
        inner: any inner solver (``GradientDescent``, ``Nesterov``, ``NewtonCG``); it runs
            without an autograd graph.
        linear_solver, max_iter, rtol, atol, on_negative_curvature: how the backward solves the
            adjoint system ('minres', safe when H + Λ is indefinite, or 'cg' with its policy on
            negative curvature, 'stop' or 'raise').
        curvature: 'hessian' (exact) or 'ggn' (Gauss-Newton) in the adjoint system and in
            Newton-CG's inner steps; hvp_mode: 'rev-rev' or 'fwd-rev' Hessian products.
        record: a dict that receives ``"inner"`` (the InnerResult) in the forward and
            ``"linear"`` (the LinearSolveResult of the adjoint solve) in the backward.
    """
    if linear_solver not in ("cg", "minres"):
        raise ValueError(f"linear_solver must be 'cg' or 'minres', got {linear_solver!r}")
    if on_negative_curvature not in CG_POLICIES:
        raise ValueError(f"on_negative_curvature must be one of {CG_POLICIES}, "
                         f"got {on_negative_curvature!r}")
    as_dict = isinstance(theta, dict)
    flat = model.flatten(theta) if as_dict else theta
    lam = torch.as_tensor(lam, dtype=flat.dtype, device=flat.device)
    if not bool(torch.isfinite(lam).all()) or not bool((lam > 0).all()):
        raise ValueError(f"lam must be > 0 and finite, got {lam.detach().flatten()[:4].tolist()}")
    if linear_solver == "cg":
        solve = lambda A, b: conjugate_gradient(  # noqa: E731
            A, b, max_iter=max_iter, rtol=rtol, atol=atol,
            on_negative_curvature=on_negative_curvature)
    else:
        solve = lambda A, b: minres(A, b, max_iter=max_iter, rtol=rtol, atol=atol)  # noqa: E731
    phi = _Implicit.apply(flat, expand_lam(model, lam),
                          (model, x, y, inner, solve, record, lam.numel() == 1, curvature,
                           hvp_mode))
    return model.unflatten(phi) if as_dict else phi
