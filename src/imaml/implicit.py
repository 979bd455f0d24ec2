"""The implicit layer: the solution of the proximal inner problem as a differentiable function of
θ and λ.

    φ*(θ, λ) = argmin_φ  G(φ) = L̂(φ) + ½ Σᵢ λᵢ (φᵢ − θᵢ)²

Its stationarity condition ∇L̂(φ*) + Λ(φ* − θ) = 0 (Λ = diag λ) defines φ* implicitly; the
implicit function theorem gives, with H = ∇²L̂(φ*),

    dφ*/dθ = (H + Λ)⁻¹ Λ,        ∂φ*/∂λᵢ = −(H + Λ)⁻¹ eᵢ (φ*ᵢ − θᵢ).

So for an upstream gradient v = ∂ℓ/∂φ, with w = (H + Λ)⁻¹ v: ∂ℓ/∂θ = Λ w and
∂ℓ/∂λᵢ = −(φ*ᵢ − θᵢ) wᵢ (summed over a layer for per-layer λ, over all for a scalar λ).
For a scalar λ, Λ w = (I + H/λ)⁻¹ v is exactly iMAML's task meta-gradient (Algorithm 2).

``implicit_solution`` runs any inner solver without a graph (memory independent of its steps)
and returns φ connected to θ and λ by a ``torch.autograd.Function`` whose backward solves the
adjoint system with the chosen linear solver. The system is solved in the symmetric scaling
(I + Λ^{-1/2} H Λ^{-1/2}) z = Λ^{-1/2} v, w = Λ^{-1/2} z, which for a scalar λ is iMAML's own
system, so the layer and ``IMAML.meta_gradient`` agree iterate for iterate.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor

from .functional import FunctionalModel, ProximalProblem, make_hvp, task_loss
from .linear import conjugate_gradient, minres


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


class _Implicit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, theta, lam, setup):
        model, x, y, inner, solve, record, scalar = setup
        theta_d, lam_d = theta.detach(), lam.detach()
        # a scalar λ goes in as a number: the very problem IMAML solves
        lam_p = float(lam_d[0]) if scalar else lam_d
        with torch.no_grad():
            result = inner.solve(ProximalProblem(task_loss(model, x, y), theta_d, lam_p), theta_d)
        phi = result.phi.detach()
        if record is not None:
            record["inner"] = result
        ctx.save_for_backward(theta_d, lam_d, phi)
        ctx.setup = setup
        return phi

    @staticmethod
    def backward(ctx, v):
        theta, lam, phi = ctx.saved_tensors
        model, x, y, inner, solve, record, _ = ctx.setup
        with torch.enable_grad():
            hvp = make_hvp(task_loss(model, x, y), phi, "rev-rev")
            scale = lam.rsqrt()  # Λ^{-1/2}
            res = solve(lambda u: u + scale * hvp(scale * u), scale * v)
        if record is not None:
            record["linear"] = res
        w = scale * res.x.detach()
        return lam * w, -(phi - theta) * w, None


def implicit_solution(model: FunctionalModel, theta: Tensor, lam, x: Tensor, y: Tensor, inner,
                      linear_solver: str = "minres", max_iter: int = 20, rtol: float = 0.0,
                      record: Optional[Dict] = None) -> Tensor:
    """φ*(θ, λ) for the support set (x, y), differentiable with respect to θ and λ.

    Args:
        model: the functional model whose support loss L̂ defines the inner problem.
        theta: flat meta-parameters (may require grad).
        lam: λ > 0 as a number or tensor: a scalar, one value per parameter tensor (per layer)
            or one per parameter; a tensor that requires grad gets ∂ℓ/∂λ.
        inner: any inner solver (``GradientDescent``, ``Nesterov``, ``NewtonCG``); it runs
            without an autograd graph.
        linear_solver, max_iter, rtol: how the backward solves the adjoint system ('minres',
            safe when H + Λ is indefinite, or 'cg').
        record: a dict that receives ``"inner"`` (the InnerResult) in the forward and
            ``"linear"`` (the CGResult of the adjoint solve) in the backward.
    """
    if linear_solver not in ("cg", "minres"):
        raise ValueError(f"linear_solver must be 'cg' or 'minres', got {linear_solver!r}")
    lam = torch.as_tensor(lam, dtype=theta.dtype, device=theta.device)
    if not bool(torch.isfinite(lam).all()) or not bool((lam > 0).all()):
        raise ValueError(f"lam must be > 0 and finite, got {lam.detach().flatten()[:4].tolist()}")
    fn = conjugate_gradient if linear_solver == "cg" else minres
    solve = lambda A, b: fn(A, b, max_iter=max_iter, rtol=rtol)  # noqa: E731
    return _Implicit.apply(theta, expand_lam(model, lam),
                           (model, x, y, inner, solve, record, lam.numel() == 1))
