"""Linear solvers that only see a matvec: ``solve(matvec, b, ...)``.

They do not know they are solving a Hessian system (the idea of jaxopt's ``linear_solve``):
iMAML calls them with ``v -> v + H v / λ``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
from torch import Tensor

Matvec = Callable[[Tensor], Tensor]


@dataclass
class CGResult:
    """What conjugate gradient reached.

    Attributes:
        x: the solution estimate (never NaN: on breakdown it is the last good iterate).
        residual_norms: ‖b − A x_k‖ for k = 0..iterations (recursive residuals).
        iterations: matvecs spent.
        converged: the residual tolerance was met.
        negative_curvature: some search direction p had pᵀAp ≤ 0, so A is not positive
            definite; CG stopped there (the paper's system I + H/λ can be indefinite for
            network Hessians when λ is small).
        breakdown: a non-finite quantity appeared; CG stopped at the last finite iterate.
    """

    x: Tensor
    residual_norms: List[float] = field(default_factory=list)
    iterations: int = 0
    converged: bool = False
    negative_curvature: bool = False
    breakdown: bool = False

    @property
    def residual(self) -> float:
        return self.residual_norms[-1]


def conjugate_gradient(matvec: Matvec, b: Tensor, x0: Optional[Tensor] = None,
                       max_iter: int = 5, rtol: float = 0.0, atol: float = 0.0) -> CGResult:
    """Solve A x = b for symmetric positive-definite A by conjugate gradient (Hestenes-Stiefel).

    Stops when ‖r‖ ≤ max(rtol‖b‖, atol) (the δ′ of Algorithm 2), after ``max_iter`` matvecs, on
    negative curvature, or on breakdown; the result says which. The iterate returned is always
    finite.
    """
    if max_iter < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter}")
    if rtol < 0 or atol < 0:
        raise ValueError("rtol and atol must be >= 0")
    if b.dim() != 1:
        raise ValueError(f"b must be a 1-D vector, got shape {tuple(b.shape)}")
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    if x.shape != b.shape:
        raise ValueError(f"x0 has shape {tuple(x.shape)} but b has {tuple(b.shape)}")
    r = b - matvec(x) if x0 is not None else b.clone()
    p = r.clone()
    rs = torch.dot(r, r)
    threshold = max(rtol * float(torch.linalg.vector_norm(b)), atol)
    result = CGResult(x=x, residual_norms=[float(rs.sqrt())])
    if not torch.isfinite(rs):
        result.breakdown = True
        return result
    for _ in range(max_iter):
        if result.residual_norms[-1] <= threshold:
            break
        Ap = matvec(p)
        result.iterations += 1
        pAp = torch.dot(p, Ap)
        if not torch.isfinite(pAp):
            result.breakdown = True
            break
        if pAp <= 0:
            result.negative_curvature = True
            break
        alpha = rs / pAp
        x_new = x + alpha * p
        r_new = r - alpha * Ap
        rs_new = torch.dot(r_new, r_new)
        if not torch.isfinite(rs_new):
            result.breakdown = True
            break
        x, r = x_new, r_new
        result.residual_norms.append(float(rs_new.sqrt()))
        p = r + (rs_new / rs) * p
        rs = rs_new
    result.x = x
    result.converged = result.residual_norms[-1] <= threshold
    return result


def neumann_series(matvec: Matvec, b: Tensor, num_terms: int = 20, alpha: float = 1.0) -> Tensor:
    """Approximate A⁻¹ b by the truncated Neumann series α Σ_{k<num_terms} (I − αA)^k b.

    Converges when the spectral radius of I − αA is below one (0 < α < 2/λ_max for SPD A).
    Used by some implicit-gradient papers (Lorraine et al. 2020); here a second method to
    compare CG against.
    """
    if num_terms < 1:
        raise ValueError(f"num_terms must be >= 1, got {num_terms}")
    term = alpha * b
    total = term.clone()
    for _ in range(num_terms - 1):
        term = term - alpha * matvec(term)
        total = total + term
    return total


def dense_matrix(matvec: Matvec, n: int, dtype=torch.float64, device=None) -> Tensor:
    """Materialise the n x n matrix of a linear map column by column (small problems only)."""
    eye = torch.eye(n, dtype=dtype, device=device)
    return torch.stack([matvec(eye[i]) for i in range(n)], dim=1)


def dense_solve(matvec: Matvec, b: Tensor) -> Tensor:
    """Exact solve of A x = b by building A densely and calling ``torch.linalg.solve``."""
    A = dense_matrix(matvec, b.numel(), dtype=b.dtype, device=b.device)
    return torch.linalg.solve(A, b)
