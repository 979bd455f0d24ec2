"""Table 1 of Rajeswaran et al. (2019), measured: the compute, memory and error of each
meta-gradient algorithm against the condition number κ of the inner problem
(``imaml synthetic --table1 --out DIR``).

**The task family.** Quadratic tasks with an exact meta-gradient, in float64. The support loss
is L̂(φ) = ½(φ − a)ᵀA(φ − a), the query loss ½‖φ − b‖², the inner objective the proximal
G(φ) = L̂(φ) + (λ/2)‖φ − θ‖² with λ = 1, so ∇²G = A + λI = M and

    φ* = M⁻¹(A a + λθ),    g* = dL_test(φ*)/dθ = λ M⁻¹ (φ* − b).

M's d eigenvalues lie at the Chebyshev–Lobatto points of [2λ, 2λκ] (the arcsine density, the
worst case for Krylov methods), so κ(G) = κ exactly, A's eigenvalues are M's less λ (in
[λ, (2κ − 1)λ]) and a, θ, b are standard normal. Every algorithm here (gradient descent,
Nesterov, CG, back-prop through them) commutes with rotations, so A is taken diagonal without
loss of generality: the library sees a linear model φ ↦ x ⊙ φ with x = √diag(A) on the support
set and x = 1 on the query set, under the loss ½‖out − y‖² (``library_problem``).

**Which κ governs.** Every solver here runs on G or on iMAML's system I + A/λ = M/λ, whose
condition number is also κ. Gradient descent with step 1/L contracts the eigen-mode of M's
eigenvalue m by 1 − m/L per step, Nesterov with the optimal momentum (√κ − 1)/(√κ + 1) the
slowest mode by about 1 − 1/√κ, and CG converges at the Chebyshev rate of κ. The error of
MAML's Jacobian in mode m is (α/m)(1 − m/L)^k, α = m − λ the loss's curvature there: where L̂ is
flat (α = 0) a mode carries no error, and the κ that governs would be L/(λ + the smallest
nonzero α). In this family A's smallest eigenvalue equals λ, so the slowest mode of G carries
error (α/m = ½) and κ(G) itself governs every algorithm.

**Two sizes.** Gradient descent and Nesterov act on each eigen-mode separately, so their
counts depend on the extreme eigenvalues, not on d. CG does not: it needs at most d matvecs,
so its √κ log(1/δ) cost shows only while that is well below d (at κ = 10⁴, δ = 10⁻⁶, about 700
steps). The study runs every algorithm at d = 64 and at d = 4096.

**Two instruments.** (1) The model: the recurrences each algorithm defines, in the eigenbasis
(numpy; closed forms for gradient descent, the iterations themselves for Nesterov and CG),
independent of the library, give every algorithm's error after any number of steps, and so
the least compute after which the error stays at most δ. (2) The library: ``imaml.meta``'s
MAML, TruncatedMAML, FOMAML and IMAML with the library's GradientDescent, Nesterov and
NewtonCG inner solvers and its CG, run at the model's step counts on the same task; each run
is checked against the closed form (its error ≤ δ) and against the model (their meta-gradients
agree), and its autograd graph is measured. A cell is run through the library when its
estimated graph fits ``max_graph_bytes`` (and its iterations ``max_library_steps``), else it is
reported from the model alone, marked so.

**Compute** counts gradient-equivalents: one per gradient of L̂ or G, per Hessian-vector
product, per step back-propagated through, per loss value (Newton-CG's line search), plus the
query gradient and, for iMAML, the gradient whose graph its HVPs reuse ('rev-rev'). MAML over k
steps: 2k + 1; truncated back-prop (K steps, the last T back-propagated): K + T + 1; iMAML with
a first-order inner solver (K steps) and c CG steps: K + c + 2; iMAML with CG inner (one Newton
step of c₁ CG iterations, its line search accepting the full step) and c CG steps: c₁ + c + 5.

**Memory** is measured: the bytes of the tensors the autograd graph holds for the backward pass
(unique storages, found by walking the graph of the query loss when ``imaml.meta`` calls
``torch.autograd.grad``; ``GraphProbe``). It is what grows with the number of unrolled steps.
Not included: the solvers' working vectors (a few d-vectors, independent of k and κ) and the
transient graph of iMAML's Hessian-vector products, built once at φ in the backward.

**How the step counts are chosen.** MAML and truncated back-prop with T chosen for δ: the least
k (least T with terminal error ≤ δ/2, then the least K ≥ T) after which the error stays ≤ δ.
iMAML: the least inner steps with the exact linear solve at error ≤ δ/2 and the least CG steps
with the exact φ* at error ≤ δ/2, then CG steps (and if need be inner steps) added until the
combination reaches δ (an even split of the error budget, not the optimal one). Step sizes come
from the known spectrum: 1/L for gradient descent and Nesterov, Nesterov's momentum
(√κ − 1)/(√κ + 1).

**Terminal errors** (K → ∞, closed form or model, checked by the library at a K where the
model is within 1% of the limit): truncated back-prop with T ∈ {10, 100, 1000},
ε(T) = ‖(A/λ)(I − M/L)^T g*‖/‖g*‖; iMAML with c ∈ {1, 2, 5, 10, 20} CG steps at the exact φ*;
first-order MAML, ‖(A/λ) g*‖/‖g*‖.
"""
from __future__ import annotations

import math
import os
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

KAPPAS = (10.0, 100.0, 1000.0, 10000.0)
DELTAS = (1e-2, 1e-4, 1e-6)
SIZES = (64, 4096)
TRUNCATIONS = (10, 100, 1000)
FEW_CG = (1, 2, 5, 10, 20)
LAM = 1.0

ALGORITHMS = {  # name: (label, the paper's compute exponent in κ, the paper's memory)
    "maml_gd": ("MAML through GD", 1.0, "Mem·κ log(D/δ)"),
    "maml_nesterov": ("MAML through Nesterov", 0.5, "Mem·√κ log(D/δ)"),
    "truncated": ("truncated back-prop (T for δ)", 1.0, "Mem·κ log(1/ε)"),
    "imaml_gd": ("iMAML, GD inner + CG", 1.0, "Mem"),
    "imaml_nesterov": ("iMAML, Nesterov inner + CG", 0.5, "Mem"),
    "imaml_cg": ("iMAML, CG inner + CG", 0.5, "Mem"),
}


# ---------------------------------------------------------------------------------------------
# The task family and the model (the algorithms' own recurrences in the eigenbasis)

class Family:
    """One task of the family: M's eigenvalues ``m`` (Chebyshev–Lobatto on [2λ, 2λκ]), A's
    ``alpha`` = m − λ, the task vectors ``a``, ``theta``, ``b`` and the closed form
    (``phi_star``, ``g_star``)."""

    def __init__(self, d: int, kappa: float, lam: float = LAM, seed: int = 0):
        if d < 2 or not kappa > 1:
            raise ValueError(f"need d >= 2 and kappa > 1, got d={d}, kappa={kappa}")
        self.d, self.kappa, self.lam, self.seed = d, float(kappa), float(lam), seed
        lo, hi = 2 * lam, 2 * lam * kappa
        m = 0.5 * (hi + lo) - 0.5 * (hi - lo) * np.cos(np.pi * np.arange(d) / (d - 1))
        m[0], m[-1] = lo, hi
        self.m, self.alpha = m, m - lam
        rng = np.random.default_rng(seed)
        self.a, self.theta, self.b = rng.standard_normal((3, d))
        self.L = hi
        self.lr = 1.0 / hi
        self.r = 1.0 - m / hi  # gradient descent's contraction of each mode
        self.r[-1] = 0.0
        s = math.sqrt(hi / lo)
        self.momentum = (s - 1) / (s + 1)
        self.phi_star = (self.alpha * self.a + lam * self.theta) / m
        self.v_star = self.phi_star - self.b
        self.g_star = lam * self.v_star / m
        self.e0 = self.theta - self.phi_star
        self.g_norm = float(np.linalg.norm(self.g_star))

    def rel(self, g) -> float:
        """‖g − g*‖/‖g*‖."""
        return float(np.linalg.norm(np.asarray(g) - self.g_star) / self.g_norm)

    def inner_rel(self, phi) -> float:
        """The meta-gradient error of φ with the linear system solved exactly: ‖λM⁻¹(φ − φ*)‖/‖g*‖."""
        return float(np.linalg.norm(self.lam * (phi - self.phi_star) / self.m) / self.g_norm)


def _gd_errors(fam: Family, ks, c0=None, c1=None, c2=None) -> np.ndarray:
    """‖c0 + r^k c1 + r^{2k} c2‖/‖g*‖ for each k in ks: the error of every gradient-descent
    based meta-gradient after k steps is of this form (``_gd_terms``)."""
    ks = np.asarray(ks, dtype=np.int64)
    out = np.empty(len(ks))
    step = max(1, 4_000_000 // fam.d)
    for i in range(0, len(ks), step):
        R = fam.r[None, :] ** ks[i:i + step, None].astype(float)
        E = np.zeros_like(R)
        if c1 is not None:
            E += R * c1
        if c2 is not None:
            E += R * R * c2
        if c0 is not None:
            E += c0
        out[i:i + step] = np.linalg.norm(E, axis=1) / fam.g_norm
    return out


def _gd_terms(fam: Family, what: str, T: int = 0):
    """(c0, c1, c2) of ``_gd_errors`` for: 'maml' (MAML through k GD steps), 'inner' (iMAML's
    error with an exact linear solve after k GD steps), 'fomaml', 'terminal' (truncated
    back-prop's K → ∞ error against T) and 'truncated' (K steps, the last T back-propagated)."""
    lam, m, al, v, e0 = fam.lam, fam.m, fam.alpha, fam.v_star, fam.e0
    # φ_k = φ* + r^k e0 and MAML's Jacobian J_k = λ/m + (α/m) r^k (J_0 = I, J_{k+1} = r J_k + λ/L)
    if what == "maml":
        return None, al / m * v + lam / m * e0, al / m * e0
    if what == "inner":
        return None, lam / m * e0, None
    if what == "fomaml":
        return al / m * v, e0, None
    if what == "terminal":
        return None, al / m * v, None
    if what == "truncated":
        rT = fam.r ** T
        return al / m * rT * v, (lam / m + al / m * rT) * e0, None
    raise ValueError(what)


def _settle_gd(fam: Family, terms, delta: float, start: int = 0) -> int:
    """The least k ≥ start after which the error of ``terms`` stays ≤ δ: found on a geometric
    grid up to past the crossing, then exactly between the grid points that bracket it."""
    err = lambda ks: _gd_errors(fam, ks, *terms)  # noqa: E731
    hi = max(start + 1, 8)
    while err([hi])[0] > delta:
        hi *= 2
        if hi > 1 << 30:
            raise RuntimeError(f"error does not reach {delta}")
    top = int(hi * 1.5) + 16
    grid = np.unique(np.concatenate([[start], np.geomspace(start + 1, top, 800).astype(np.int64),
                                     [top]]))
    e = err(grid)
    above = np.nonzero(e > delta)[0]
    if above.size == 0:
        return start
    i = int(above[-1])
    if i == len(grid) - 1:
        return _settle_gd(fam, terms, delta, int(grid[i]))
    ks = np.arange(grid[i], grid[i + 1] + 1)
    e = err(ks)
    return int(ks[np.nonzero(e > delta)[0][-1]] + 1)


def _settle(errors: Sequence[float], delta: float) -> int:
    """The least index after which a computed error curve stays ≤ δ."""
    e = np.asarray(errors)
    if e[-1] > delta:
        raise RuntimeError(f"the curve ends above {delta} ({e[-1]:.3g}); extend it")
    above = np.nonzero(e > delta)[0]
    return 0 if above.size == 0 else int(above[-1] + 1)


def phi_gd(fam: Family, K: int) -> np.ndarray:
    return fam.phi_star + fam.r ** K * fam.e0


def g_maml_gd(fam: Family, k: int) -> np.ndarray:
    J = fam.lam / fam.m + fam.alpha / fam.m * fam.r ** k
    return J * (phi_gd(fam, k) - fam.b)


def g_truncated(fam: Family, K: int, T: int) -> np.ndarray:
    J = fam.lam / fam.m + fam.alpha / fam.m * fam.r ** T
    return J * (phi_gd(fam, K) - fam.b)


def nesterov(fam: Family, steps: int, curve: bool = False):
    """Nesterov on G from θ (the library's iteration: y = φ + μ(φ − φ_prev), φ ← y − ∇G(y)/L)
    with its Jacobian dφ/dθ (diagonal in the eigenbasis). Returns (φ_K, J_K) or, with
    ``curve``, the errors after k = 0..steps of iMAML with an exact linear solve and of MAML."""
    lam, m, lr, mu = fam.lam, fam.m, fam.lr, fam.momentum
    c = fam.alpha * fam.a + lam * fam.theta
    phi = prev = fam.theta.copy()
    J = Jp = np.ones(fam.d)
    inner, maml = [fam.inner_rel(phi)], [fam.rel(J * (phi - fam.b))]
    for _ in range(steps):
        y = phi + mu * (phi - prev)
        Jy = J + mu * (J - Jp)
        prev, phi = phi, y - lr * (m * y - c)
        Jp, J = J, Jy - lr * (m * Jy - lam)
        if curve:
            inner.append(fam.inner_rel(phi))
            maml.append(fam.rel(J * (phi - fam.b)))
    return (np.array(inner), np.array(maml)) if curve else (phi, J)


def cg(diag: np.ndarray, rhs: np.ndarray, steps: int, x0: Optional[np.ndarray] = None,
       error: Optional[Callable[[np.ndarray], float]] = None):
    """Conjugate gradient (Hestenes–Stiefel) on diag(diag) x = rhs from x0 (default 0): the
    final x, and with ``error`` the error of every iterate."""
    x = np.zeros_like(rhs) if x0 is None else x0.copy()
    r = rhs - diag * x
    p, rs = r.copy(), float(r @ r)
    errs = [error(x)] if error else None
    for _ in range(steps):
        Ap = diag * p
        pAp = float(p @ Ap)
        if not pAp > 0 or rs == 0:
            break
        alpha = rs / pAp
        x = x + alpha * p
        r = r - alpha * Ap
        rs_new = float(r @ r)
        p = r + (rs_new / rs) * p
        rs = rs_new
        if error:
            errs.append(error(x))
    return x, (np.array(errs) if error else None)


def _cg_curve(fam: Family, diag, rhs, error, stop: float, x0=None) -> np.ndarray:
    """CG's error curve, run until it is ≤ ``stop`` (and a fifth further), at most 6d steps."""
    n = 64
    while True:
        _, errs = cg(diag, rhs, n, x0, error)
        below = np.nonzero(errs <= stop)[0]
        if below.size and len(errs) >= 1.2 * below[0] + 8:
            return errs
        if n >= 6 * fam.d or len(errs) < n + 1:  # capped, or CG stopped (exact solution)
            return errs
        n *= 2


def linear_diag(fam: Family) -> np.ndarray:
    """iMAML's system I + A/λ (= M/λ), as the library forms it."""
    return 1.0 + fam.alpha / fam.lam


def phi_cg_inner(fam: Family, c1: int) -> np.ndarray:
    """One Newton step of c₁ CG iterations from θ (the library's NewtonCG, steps=1): CG on
    M d = −∇G(θ), φ = θ + d."""
    d, _ = cg(fam.alpha + fam.lam, -(fam.alpha * (fam.theta - fam.a)), c1)
    return fam.theta + d


def inner_phi(fam: Family, inner: str, K: int) -> np.ndarray:
    if inner == "gd":
        return phi_gd(fam, K)
    if inner == "nesterov":
        return nesterov(fam, K)[0]
    if inner == "cg":
        return phi_cg_inner(fam, K)
    raise ValueError(inner)


def g_imaml(fam: Family, inner: str, K: int, c: int) -> np.ndarray:
    """iMAML's meta-gradient: c CG steps on (I + A/λ) g = φ_K − b."""
    return cg(linear_diag(fam), inner_phi(fam, inner, K) - fam.b, c)[0]


def model_g(fam: Family, alg: str, p: Dict) -> np.ndarray:
    """The model's meta-gradient for a cell (what the library's run is compared with)."""
    if alg == "maml_gd":
        return g_maml_gd(fam, p["k"])
    if alg == "maml_nesterov":
        phi, J = nesterov(fam, p["k"])
        return J * (phi - fam.b)
    if alg.startswith("truncated"):
        return g_truncated(fam, p["K"], p["T"])
    if alg == "fomaml":
        return nesterov(fam, p["K"])[0] - fam.b
    if alg.startswith("imaml"):
        return g_imaml(fam, p["inner"], p["K"], p["c"])
    raise ValueError(alg)


def compute_of(alg: str, p: Dict) -> int:
    """Gradient-equivalents of a cell (module docstring)."""
    if alg in ("maml_gd", "maml_nesterov"):
        return 2 * p["k"] + 1
    if alg.startswith("truncated"):
        return p["K"] + p["T"] + 1
    if alg == "fomaml":
        return p["K"] + 1
    if alg.startswith("imaml"):
        return p["K"] + p["c"] + (5 if p["inner"] == "cg" else 2)
    raise ValueError(alg)


def unrolled_steps(alg: str, p: Dict) -> int:
    """Steps whose graph back-prop keeps."""
    if alg in ("maml_gd", "maml_nesterov"):
        return p["k"]
    if alg.startswith("truncated"):
        return p["T"]
    return 0


def library_steps(alg: str, p: Dict) -> int:
    """Iterations the library runs for a cell (what its time is proportional to)."""
    if alg in ("maml_gd", "maml_nesterov"):
        return p["k"]
    if alg.startswith("truncated") or alg == "fomaml":
        return p["K"]
    return p["K"] + p["c"]


# ---------------------------------------------------------------------------------------------
# Planning: the step counts at which each algorithm reaches δ, from the model

def _row(fam: Family, alg: str, params: Dict, kind: str, delta=None, **extra) -> Dict:
    return {"d": fam.d, "kappa": fam.kappa, "algorithm": alg, "kind": kind, "delta": delta,
            "params": params, "compute": compute_of(alg, params),
            "unrolled_steps": unrolled_steps(alg, params),
            "model_error": fam.rel(model_g(fam, alg, params)), **extra}


def _imaml_steps(fam: Family, inner: str, K0: int, c0: int, delta: float):
    """(K, c) for iMAML from the even split of the error budget (K0 inner steps reach δ/2 with
    an exact linear solve, c0 CG steps reach δ/2 at φ*): CG steps (and, if that is not enough,
    inner steps) are added until the pair reaches δ."""
    K0, c = (max(K0, 1) if inner == "cg" else K0), max(c0, 1)
    c0, K = c, K0
    diag = linear_diag(fam)
    phi = inner_phi(fam, inner, K)
    while fam.rel(cg(diag, phi - fam.b, c)[0]) > delta:
        c += max(1, c // 50)
        if c > 2 * c0 + 10:
            K, c = K + max(1, K // 50), c0
            phi = inner_phi(fam, inner, K)
    return K, c


def plan(fam: Family, deltas=DELTAS, truncations=TRUNCATIONS, few_cg=FEW_CG) -> List[Dict]:
    """Every row of one (d, κ): the step counts from the model and the model's errors."""
    rows = []
    dmin = min(deltas)
    # gradient descent: closed forms
    for dl in deltas:
        k = _settle_gd(fam, _gd_terms(fam, "maml"), dl)
        prev = float(_gd_errors(fam, [k - 1], *_gd_terms(fam, "maml"))[0]) if k else None
        rows.append(_row(fam, "maml_gd", {"k": k}, "to_delta", dl, model_error_previous=prev))
        T = max(_settle_gd(fam, _gd_terms(fam, "terminal"), dl / 2), 1)
        K = _settle_gd(fam, _gd_terms(fam, "truncated", T), dl, start=T)
        rows.append(_row(fam, "truncated", {"K": K, "T": T}, "to_delta", dl,
                         terminal_error=float(_gd_errors(fam, [T], *_gd_terms(fam, "terminal"))[0])))
    for T in truncations:
        eps = float(_gd_errors(fam, [T], *_gd_terms(fam, "terminal"))[0])
        c0, c1, _ = _gd_terms(fam, "truncated", T)
        # the least K at which the error is within 1% of its limit ε(T) (and stays there)
        near = lambda ks: np.abs(_gd_errors(fam, ks, c0, c1) - eps) / max(eps, 1e-300)  # noqa
        K_term = T
        while near([K_term])[0] > 0.01 and eps > 1e-13:
            K_term = int(K_term * 1.25) + 1
        if eps <= 1e-13:  # the limit is at rounding level: converge φ to 1e-13 instead
            K_term = _settle_gd(fam, (c0, c1, None), 1e-13, start=T)
        rows.append(_row(fam, f"truncated_T{T}", {"K": K_term, "T": T}, "terminal",
                         terminal_error=eps))
        for dl in deltas:
            if eps < dl:
                K = _settle_gd(fam, (c0, c1, None), dl, start=T)
                rows.append(_row(fam, f"truncated_T{T}", {"K": K, "T": T}, "to_delta", dl,
                                 terminal_error=eps))
    # Nesterov: the iteration itself, to past the smallest δ (and 1e-10, for the terminal rows)
    stop = min(dmin / 100, 1e-10)
    n = 256
    while True:
        inner_n, maml_n = nesterov(fam, n, curve=True)
        if max(inner_n[-n // 6:].max(), maml_n[-n // 6:].max()) <= stop:
            break
        n *= 2
    # CG on iMAML's system at the exact φ* (the linear solve alone), and CG as the inner solver
    lin = _cg_curve(fam, linear_diag(fam), fam.v_star, fam.rel, dmin / 100)
    inner_cg = _cg_curve(fam, fam.alpha + fam.lam, -(fam.alpha * (fam.theta - fam.a)),
                         lambda x: fam.inner_rel(fam.theta + x), stop)
    inner_gd = _gd_terms(fam, "inner")
    for dl in deltas:
        k = _settle(maml_n, dl)
        rows.append(_row(fam, "maml_nesterov", {"k": k}, "to_delta", dl,
                         model_error_previous=float(maml_n[k - 1]) if k else None))
        c_half = _settle(lin, dl / 2)
        for inner, K0 in (("gd", _settle_gd(fam, inner_gd, dl / 2)),
                          ("nesterov", _settle(inner_n, dl / 2)), ("cg", _settle(inner_cg, dl / 2))):
            K, c = _imaml_steps(fam, inner, K0, c_half, dl)
            rows.append(_row(fam, f"imaml_{inner}", {"inner": inner, "K": K, "c": c}, "to_delta",
                             dl, split={"K_half": K0, "c_half": c_half}))
    # iMAML with too few CG steps, at an inner problem solved by CG to 1e-10
    K_exact = max(_settle(inner_cg, stop), 1)
    for c in few_cg:
        rows.append(_row(fam, f"imaml_cg{c}", {"inner": "cg", "K": K_exact, "c": c}, "terminal",
                         terminal_error=float(lin[min(c, len(lin) - 1)])))
    # first-order MAML, at φ from Nesterov converged to 1e-10
    K_fo = max(_settle(inner_n, stop), 1)
    eps_fo = float(np.linalg.norm(fam.alpha / fam.m * fam.v_star) / fam.g_norm)
    rows.append(_row(fam, "fomaml", {"K": K_fo}, "terminal", terminal_error=eps_fo))
    return rows


# ---------------------------------------------------------------------------------------------
# The library: the same cells through imaml.meta, with the autograd graph measured

class DiagonalQuadratic(nn.Module):
    """out = x ⊙ w: with x = √diag(A), y = x ⊙ a and the loss ½‖out − y‖², L̂(w) = ½(w − a)ᵀA(w − a)."""

    def __init__(self, d: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(d, dtype=torch.float64))

    def forward(self, x):
        return x * self.w


def half_sse(out, y):
    return 0.5 * ((out - y) ** 2).sum()


def library_problem(fam: Family):
    """(FunctionalModel, θ, Task) of a family member, for the library's methods."""
    from .functional import FunctionalModel
    from .tasks import Task
    t = lambda x: torch.as_tensor(x, dtype=torch.float64)  # noqa: E731
    xs = t(np.sqrt(fam.alpha))
    task = Task(xs, xs * t(fam.a), torch.ones(fam.d, dtype=torch.float64), t(fam.b))
    return FunctionalModel(DiagonalQuadratic(fam.d), loss_fn=half_sse), t(fam.theta), task


def library_method(fam: Family, alg: str, p: Dict):
    """The library's method for a cell, its step sizes from the known spectrum."""
    from .inner import GradientDescent, Nesterov, NewtonCG
    from .meta import FOMAML, IMAML, MAML, TruncatedMAML
    lam, lr, mu = fam.lam, fam.lr, fam.momentum
    if alg == "maml_gd":
        return MAML(inner=GradientDescent(lr=lr, steps=p["k"]), lam=lam)
    if alg == "maml_nesterov":
        return MAML(inner=Nesterov(lr=lr, momentum=mu, steps=p["k"]), lam=lam)
    if alg.startswith("truncated"):
        return TruncatedMAML(inner=GradientDescent(lr=lr, steps=p["K"]), truncate=p["T"], lam=lam)
    if alg == "fomaml":
        return FOMAML(inner=Nesterov(lr=lr, momentum=mu, steps=p["K"]), lam=lam)
    if alg.startswith("imaml"):
        inner = {"gd": lambda: GradientDescent(lr=lr, steps=p["K"]),
                 "nesterov": lambda: Nesterov(lr=lr, momentum=mu, steps=p["K"]),
                 "cg": lambda: NewtonCG(steps=1, cg_iters=p["K"])}[p["inner"]]()
        return IMAML(lam=lam, inner=inner, cg_max_iter=p["c"])
    raise ValueError(alg)


_META = os.path.join("imaml", "meta.py")


def graph_bytes(outputs) -> Dict[str, int]:
    """Bytes of the unique tensor storages that the autograd graph of ``outputs`` saves for
    its backward pass, with the number of nodes and of storages."""
    outs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    stack = [o.grad_fn for o in outs if o.grad_fn is not None]
    seen, storages, names = set(), {}, {}
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        attrs = names.get(type(node))
        if attrs is None:
            attrs = names[type(node)] = [a for a in dir(node) if a.startswith("_saved_")]
        values = [getattr(node, a) for a in attrs]
        if not attrs and hasattr(node, "saved_tensors"):  # a custom autograd.Function
            try:
                values.append(tuple(node.saved_tensors))
            except RuntimeError:
                pass
        for v in values:
            for x in (v if isinstance(v, (tuple, list)) else (v,)):
                if isinstance(x, torch.Tensor):
                    st = x.untyped_storage()
                    storages[st.data_ptr()] = st.nbytes()
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return {"bytes": int(sum(storages.values())), "nodes": len(seen), "storages": len(storages)}


class GraphProbe:
    """While active, the first ``torch.autograd.grad`` called from ``imaml/meta.py`` (the
    meta-gradient's backward pass) has the graph of its outputs measured (``graph_bytes``)
    before it runs; ``result`` stays None for a method that calls none (first-order MAML)."""

    def __init__(self):
        self.result: Optional[Dict[str, int]] = None

    def __enter__(self):
        self._real = real = torch.autograd.grad

        def grad(outputs, inputs, *args, **kwargs):
            if self.result is None and sys._getframe(1).f_code.co_filename.endswith(_META):
                self.result = graph_bytes(outputs)
            return real(outputs, inputs, *args, **kwargs)

        torch.autograd.grad = grad
        return self

    def __exit__(self, *exc):
        torch.autograd.grad = self._real
        return False


def run_library_cell(cell: Dict) -> Dict:
    """Run one cell through the library: its error against the closed form, its agreement with
    the model, its graph bytes, the steps the library reports and the seconds it took."""
    torch.set_num_threads(1)
    fam = Family(cell["d"], cell["kappa"], seed=cell["seed"])
    model, theta, task = library_problem(fam)
    method = library_method(fam, cell["algorithm"], cell["params"])
    t0 = time.perf_counter()
    with GraphProbe() as probe:
        res = method.meta_gradient(model, theta, task)
    seconds = time.perf_counter() - t0
    g = res.grad.detach().numpy()
    ref = model_g(fam, cell["algorithm"], cell["params"])
    graph = probe.result or {"bytes": 0, "nodes": 0, "storages": 0}
    return {"error": fam.rel(g), "agreement": float(np.linalg.norm(g - ref) / fam.g_norm),
            "graph_bytes": graph["bytes"], "graph_nodes": graph["nodes"],
            "inner_steps": int(res.inner.steps),
            "cg_iterations": int(res.cg.iterations) if res.cg is not None else None,
            "seconds": round(seconds, 3)}


def run_cell(cell: Dict) -> Dict:
    """``run_library_cell`` on a thread with a 4 GiB stack: releasing a graph of 10⁵ unrolled
    steps whose nodes the probe has visited from Python recurses deeper than the main
    thread's 8 MiB stack allows (it segfaults there)."""
    out: Dict = {}

    def work():
        try:
            out["result"] = run_library_cell(cell)
        except BaseException as e:  # re-raised in the caller's thread
            out["error"] = e

    old = threading.stack_size(1 << 32)
    try:
        t = threading.Thread(target=work, name="table1-cell")
        t.start()
        t.join()
    finally:
        threading.stack_size(old)
    if "error" in out:
        raise out["error"]
    return out["result"]


def _init_worker():
    torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------
# The study

def fit_exponent(kappas, values) -> Optional[float]:
    """The least-squares slope of log(value) against log(κ) (None with fewer than two points)."""
    pts = [(math.log(k), math.log(v)) for k, v in zip(kappas, values) if v and v > 0]
    if len(pts) < 2:
        return None
    x, y = np.array(pts).T
    return round(float(np.polyfit(x, y, 1)[0]), 4) + 0.0  # (+ 0.0: no "-0.0")


def exponents(rows: List[Dict], kappas) -> Dict:
    """Fitted exponents of compute (and of measured memory) against κ, per size, algorithm, δ."""
    out: Dict = {}
    for d in sorted({r["d"] for r in rows}):
        out[str(d)] = {}
        for alg in ALGORITHMS:
            per = {}
            for dl in sorted({r["delta"] for r in rows if r["delta"] is not None}, reverse=True):
                cells = {r["kappa"]: r for r in rows if r["d"] == d and r["algorithm"] == alg
                         and r["delta"] == dl}
                if sorted(cells) != sorted(kappas):
                    continue
                ks = sorted(cells)
                measured = [k for k in ks if cells[k].get("library")]
                mem = [cells[k]["library"]["graph_bytes"] for k in measured]
                per[f"{dl:g}"] = {
                    "compute": fit_exponent(ks, [cells[k]["compute"] for k in ks]),
                    "memory": fit_exponent(measured, mem) if len(measured) >= 3 else None,
                    "memory_kappas": measured,
                    "library_verified": len(measured) == len(ks)}
            out[str(d)][alg] = per
    return out


def study(kappas=KAPPAS, deltas=DELTAS, sizes=SIZES, truncations=TRUNCATIONS, few_cg=FEW_CG,
          seed: int = 0, max_graph_bytes: float = 2 << 30, max_library_steps: Optional[int] = 25000,
          workers: int = 1, progress: Callable = print) -> Dict:
    """Plan every cell with the model, run those that fit through the library, fit exponents."""
    t0 = time.time()
    rows: List[Dict] = []
    for d in sizes:
        for kappa in kappas:
            t = time.time()
            rows.extend(plan(Family(d, kappa, seed=seed), deltas, truncations, few_cg))
            progress(f"  model d={d} κ={kappa:g}: planned in {time.time() - t:.1f}s")
    model_seconds = time.time() - t0
    cells = []
    for i, r in enumerate(rows):
        r["library_steps"] = library_steps(r["algorithm"], r["params"])
        # saved vectors and the graph's own bookkeeping: about 29 KiB of resident memory per
        # unrolled step of the library's MAML (functorch's gradient graph), measured at d = 64
        est = r["unrolled_steps"] * (8 * r["d"] * 1.05 + 32 * 1024)
        if est > max_graph_bytes:
            r["library"] = None
            r["library_skipped"] = f"estimated graph {est / 2**20:.0f} MiB > {max_graph_bytes / 2**20:.0f} MiB"
        elif max_library_steps is not None and r["library_steps"] > max_library_steps:
            r["library"] = None
            r["library_skipped"] = f"{r['library_steps']} library steps > {max_library_steps}"
        else:
            cells.append((i, {"d": r["d"], "kappa": r["kappa"], "seed": seed,
                              "algorithm": r["algorithm"], "params": r["params"]}))
    cells.sort(key=lambda c: -rows[c[0]]["library_steps"])  # longest first
    progress(f"  library: {len(cells)} of {len(rows)} cells, "
             f"{sum(rows[i]['library_steps'] for i, _ in cells)} iterations in all")
    t1 = time.time()
    if workers > 1 and len(cells) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(workers, mp.get_context("spawn"), initializer=_init_worker) as ex:
            for (i, _), res in zip(cells, ex.map(run_cell, [c for _, c in cells])):
                rows[i]["library"] = res
    else:
        for i, c in cells:
            rows[i]["library"] = run_cell(c)
    library_seconds = time.time() - t1
    return {"settings": settings(kappas, deltas, sizes, truncations, few_cg, seed,
                                 max_graph_bytes, max_library_steps),
            "rows": rows, "exponents": exponents(rows, kappas),
            "model_seconds": round(model_seconds, 1), "library_seconds": round(library_seconds, 1)}


def settings(kappas, deltas, sizes, truncations, few_cg, seed, max_graph_bytes, max_library_steps):
    return {
        "kappas": list(kappas), "deltas": list(deltas), "sizes": list(sizes),
        "truncations": list(truncations), "few_cg_steps": list(few_cg), "seed": seed,
        "lam": LAM, "dtype": "float64",
        "family": "L̂(φ) = ½(φ−a)ᵀA(φ−a), L_test = ½‖φ−b‖², G = L̂ + (λ/2)‖φ−θ‖²; eigenvalues of "
                  "∇²G = A + λI at the d Chebyshev–Lobatto points of [2λ, 2λκ]; a, θ, b standard "
                  "normal; A diagonal (every algorithm commutes with rotations)",
        "step_sizes": "GD and Nesterov: lr = 1/L, L = 2λκ the largest eigenvalue of ∇²G; Nesterov "
                      "momentum (√κ − 1)/(√κ + 1); CG and Newton-CG have no step size",
        "error": "relative meta-gradient error ‖g − g*‖/‖g*‖ against the closed form "
                 "g* = λ(A + λI)⁻¹(φ* − b)",
        "compute": "gradient-equivalents: gradients, Hessian-vector products, back-prop steps, "
                   "loss values, the query gradient (module docstring of imaml.table1)",
        "memory": "bytes of the tensors the autograd graph saves for the backward pass (unique "
                  "storages), measured by walking the graph of the query loss; solver working "
                  "vectors not included",
        "steps_to_delta": "the least steps after which the error stays <= δ (iMAML: inner steps "
                          "for δ/2 with an exact linear solve and CG steps for δ/2 at φ*, then "
                          "more until the pair reaches δ; truncated: least T with terminal error "
                          "<= δ/2, then least K >= T)",
        "library_cells": f"run through imaml.meta where the estimated graph is at most "
                         f"{max_graph_bytes / 2**20:.0f} MiB"
                         + (f" and the iterations at most {max_library_steps}"
                            if max_library_steps is not None else ""),
    }


# ---------------------------------------------------------------------------------------------
# Reports

def _fmt(x, digits=2) -> str:
    if x is None:
        return "–"
    if isinstance(x, str):
        return x
    if x == 0:
        return "0"
    if abs(x) >= 1e4 or abs(x) < 1e-2:
        return f"{x:.{digits - 1}e}".replace("e+0", "e").replace("e-0", "e-").replace("e+", "e")
    return f"{x:.{digits}g}" if abs(x) < 100 else f"{x:.0f}"


def _exp(e) -> str:
    return "–" if e is None else f"{e:.2f}"


def _bytes(b) -> str:
    if b is None:
        return "–"
    for unit, s in (("MiB", 2**20), ("KiB", 2**10)):
        if b >= s:
            return f"{b / s:.3g} {unit}"
    return f"{b} B"


def _cell(rows, d, alg, kappa, delta=None, kind="to_delta"):
    for r in rows:
        if (r["d"] == d and r["algorithm"] == alg and r["kappa"] == kappa and r["kind"] == kind
                and (delta is None or r["delta"] == delta)):
            return r
    return None


PAPER = {  # the paper's Table 1 rows (compute, memory, error)
    "maml_gd": ("κ log(D/δ)", "Mem·κ log(D/δ)", "δ"),
    "maml_nesterov": ("√κ log(D/δ)", "Mem·√κ log(D/δ)", "δ"),
    "truncated": ("κ log(D/δ)", "Mem·κ log(1/ε)", "ε"),
    "imaml_gd": ("not a row (√κ assumes an accelerated inner solver)", "Mem", "δ"),
    "imaml_nesterov": ("√κ log(D/δ)", "Mem", "δ"),
    "imaml_cg": ("√κ log(D/δ)", "Mem", "δ"),
}


def markdown(res: Dict) -> str:
    s, rows, ex = res["settings"], res["rows"], res["exponents"]
    kappas, deltas, sizes = s["kappas"], s["deltas"], s["sizes"]
    out = ["# Table 1 measured: compute, memory and error against κ", "",
           f"Family: {s['family']}; λ = {s['lam']}, {s['dtype']}, seed {s['seed']}.",
           f"Step sizes: {s['step_sizes']}.", f"Error: {s['error']}.",
           f"Compute: {s['compute']}.", f"Memory: {s['memory']}.",
           f"Steps to δ: {s['steps_to_delta']}.", f"Library: {s['library_cells']}.", ""]
    out += paper_table(res)
    out += ["## Fitted exponent of compute against κ", "",
            "Least-squares slope of log(compute) on log(κ) over κ = "
            + ", ".join(f"{k:g}" for k in kappas) + ". "
            "A * marks a fit with some cells from the model alone (not run through the library).", ""]
    head = "| algorithm | paper | " + " | ".join(
        f"d={d}, δ={dl:g}" for d in sizes for dl in deltas) + " |"
    out += [head, "|" + "---|" * (2 + len(sizes) * len(deltas))]
    for alg, (label, p, _) in ALGORITHMS.items():
        cells = []
        for d in sizes:
            for dl in deltas:
                e = ex.get(str(d), {}).get(alg, {}).get(f"{dl:g}")
                cells.append("–" if not e or e["compute"] is None else
                             f"{e['compute']:.2f}" + ("" if e["library_verified"] else "*"))
        out.append(f"| {label} | {p:g} | " + " | ".join(cells) + " |")
    out += ["", "## Compute (gradient-equivalents) to reach δ", ""]
    for d in sizes:
        out += [f"d = {d}:", "", "| algorithm | δ | " + " | ".join(f"κ={k:g}" for k in kappas)
                + " | exponent |", "|" + "---|" * (3 + len(kappas))]
        for alg, (label, _, _) in ALGORITHMS.items():
            for dl in deltas:
                vals = []
                for k in kappas:
                    r = _cell(rows, d, alg, k, dl)
                    vals.append("–" if r is None else
                                f"{r['compute']}" + ("" if r.get("library") else "*"))
                e = ex.get(str(d), {}).get(alg, {}).get(f"{dl:g}", {}).get("compute")
                out.append(f"| {label} | {dl:g} | " + " | ".join(vals) + f" | {_exp(e)} |")
        out.append("")
    out += ["## Memory: autograd graph bytes at the δ = "
            f"{min(deltas):g} step counts", "",
            "| algorithm | d | " + " | ".join(f"κ={k:g}" for k in kappas) + " | exponent |",
            "|" + "---|" * (3 + len(kappas))]
    for d in sizes:
        for alg, (label, _, _) in ALGORITHMS.items():
            vals = []
            for k in kappas:
                r = _cell(rows, d, alg, k, min(deltas))
                vals.append(_bytes(r["library"]["graph_bytes"]) if r and r.get("library") else "–")
            e = ex.get(str(d), {}).get(alg, {}).get(f"{min(deltas):g}", {}).get("memory")
            out.append(f"| {label} | {d} | " + " | ".join(vals) + f" | {_exp(e)} |")
    out += ["", "## Terminal errors (K → ∞)", "",
            "Model (closed form for truncated back-prop and first-order MAML); in brackets the "
            "library's error at the K where the model is within 1% of its limit.", "",
            "| algorithm | d | " + " | ".join(f"κ={k:g}" for k in kappas) + " |",
            "|" + "---|" * (2 + len(kappas))]
    terms = ([f"truncated_T{T}" for T in s["truncations"]] + [f"imaml_cg{c}" for c in s["few_cg_steps"]]
             + ["fomaml"])
    labels = {**{f"truncated_T{T}": f"truncated back-prop, T = {T}" for T in s["truncations"]},
              **{f"imaml_cg{c}": f"iMAML, {c} CG step{'s' if c > 1 else ''}" for c in s["few_cg_steps"]},
              "fomaml": "first-order MAML"}
    for d in sizes:
        for alg in terms:
            vals = []
            for k in kappas:
                r = _cell(rows, d, alg, k, kind="terminal")
                if r is None:
                    vals.append("–")
                    continue
                lib = r.get("library")
                vals.append(_fmt(r["terminal_error"]) + (f" ({_fmt(lib['error'])})" if lib else ""))
            out.append(f"| {labels[alg]} | {d} | " + " | ".join(vals) + " |")
    lib = [r for r in rows if r.get("library")]
    bad = [r for r in lib if r["kind"] == "to_delta" and r["library"]["error"] > r["delta"]]
    skipped = [r for r in rows if not r.get("library")]
    by_graph = sum(1 for r in skipped if r.get("library_skipped", "").startswith("estimated graph"))
    out += ["", "## Library against model and closed form", "",
            f"{len(lib)} of {len(rows)} cells run through the library "
            f"({res['library_seconds']:.0f} s of {res.get('workers', 1)} process(es)); "
            f"{len(skipped)} from the model alone ({by_graph} whose estimated graph exceeds the "
            f"cap, {len(skipped) - by_graph} over the iteration cap). Largest difference between "
            f"the library's and the model's meta-gradient, relative to ‖g*‖: "
            f"{max((r['library']['agreement'] for r in lib), default=0):.1e}. Cells where the "
            f"library's error exceeded δ at the model's step count: {len(bad)}.", ""]
    return "\n".join(out) + "\n"


def paper_table(res: Dict) -> List[str]:
    """The paper's Table 1 rows beside the measured exponents, memory and terminal errors."""
    s, rows, ex = res["settings"], res["rows"], res["exponents"]
    kappas, deltas, sizes = s["kappas"], s["deltas"], sorted(s["sizes"])
    dmin, big, small = min(deltas), max(sizes), min(sizes)

    def fits(d, alg, what="compute"):
        e = [ex.get(str(d), {}).get(alg, {}).get(f"{dl:g}", {}) for dl in deltas]
        return "/".join(_exp(x.get(what)) + ("" if x.get("library_verified", True) else "*")
                        for x in e)

    def memory(alg):
        parts = []
        for d in sizes:
            cells = [_cell(rows, d, alg, k, dmin) for k in kappas]
            cells = [r for r in cells if r and r.get("library")]
            b = [r["library"]["graph_bytes"] for r in cells]
            if b:
                e = ex.get(str(d), {}).get(alg, {}).get(f"{dmin:g}", {}).get("memory")
                if min(b) == max(b):
                    span = f"{_bytes(b[0])} = {b[0] / (8 * d):.1f} d-vectors at every κ"
                else:
                    lo = min(cells, key=lambda r: r["unrolled_steps"])
                    hi = max(cells, key=lambda r: r["unrolled_steps"])
                    per = ((hi["library"]["graph_bytes"] - lo["library"]["graph_bytes"])
                           / (8 * d * max(hi["unrolled_steps"] - lo["unrolled_steps"], 1)))
                    span = (f"{_bytes(min(b))}–{_bytes(max(b))} "
                            f"(+{per:.2f} d-vectors per unrolled step)")
                ek = ex.get(str(d), {}).get(alg, {}).get(f"{dmin:g}", {}).get("memory_kappas", [])
                part = "" if len(ek) == len(kappas) else f" over κ ≤ {max(ek):g}"
                parts.append(f"d={d}: {span}"
                             + (f", exponent {_exp(e)}{part}" if e is not None else ""))
        return "; ".join(parts)

    T = 100 if 100 in s["truncations"] else s["truncations"][0]
    eps = [_cell(rows, big, f"truncated_T{T}", k, kind="terminal") for k in kappas]
    eps = ", ".join(_fmt(r["terminal_error"]) for r in eps if r)
    out = ["## Beside the paper's Table 1", "",
           f"Measured compute exponents: d = {big} and d = {small}, for δ = "
           + "/".join(f"{dl:g}" for dl in deltas) + " (* some cells from the model alone). "
           f"Memory: the measured autograd graph over κ = {kappas[0]:g}…{kappas[-1]:g} at the "
           f"δ = {dmin:g} step counts, with its exponent in κ where at least three κ were run "
           "through the library.", "",
           "| algorithm | paper: compute | measured exponent (paper) | paper: memory | measured "
           "memory | paper: error | measured error |", "|---|---|---|---|---|---|---|"]
    few = 5 if 5 in s["few_cg_steps"] else s["few_cg_steps"][0]
    floor = [_cell(rows, big, f"imaml_cg{few}", k, kind="terminal") for k in kappas]
    floor = ", ".join(_fmt(r["terminal_error"]) for r in floor if r)
    for alg, (label, p, _) in ALGORITHMS.items():
        comp, mem, err = PAPER[alg]
        cells = [r for r in rows if r["algorithm"] == alg and r["kind"] == "to_delta"]
        ran = [r for r in cells if r.get("library")]
        ok = sum(r["library"]["error"] <= r["delta"] for r in ran)
        merr = (f"δ in all {len(cells)} cells" if len(cells) == len(kappas) * len(deltas) * len(sizes)
                else f"δ in {len(cells)} cells") + f" (library ≤ δ in {ok} of {len(ran)} run)"
        if alg == "truncated":
            merr += (f", with T ∝ κ log(1/δ); a fixed T = {T} leaves ε(T) = {eps} (κ = "
                     + ", ".join(f"{k:g}" for k in kappas) + ")")
        if alg == "imaml_cg":
            merr += (f"; a fixed {few} CG steps leaves {floor} (κ = "
                     + ", ".join(f"{k:g}" for k in kappas) + ")")
        out.append(f"| {label} | {comp} | {fits(big, alg)}; {fits(small, alg)} ({p:g}) | {mem} | "
                   f"{memory(alg)} | {err} | {merr} |")
    return out + [""]


def plot(res: Dict, out_dir: str) -> List[str]:
    from .records import plt as pyplot
    plt = pyplot()
    s, rows = res["settings"], res["rows"]
    kappas, deltas, sizes = s["kappas"], s["deltas"], s["sizes"]
    colors = dict(zip(ALGORITHMS, ["C0", "C1", "C2", "C3", "C4", "C5"]))
    styles = dict(zip(sorted(sizes), ("--", "-", ":", "-.")))
    from matplotlib.lines import Line2D
    paths = []
    fig, axes = plt.subplots(1, len(deltas), figsize=(4.6 * len(deltas) + 2.6, 4.6), squeeze=False)
    for ax, dl in zip(axes[0], deltas):
        for d in sizes:
            for alg in ALGORITHMS:
                pts = [(k, _cell(rows, d, alg, k, dl)) for k in kappas]
                pts = [(k, r["compute"]) for k, r in pts if r]
                if pts:
                    ax.loglog(*zip(*pts), ls=styles[d], marker="o", ms=3, color=colors[alg])
        k0 = np.array(kappas, dtype=float)
        ax.loglog(k0, 30 * k0 / k0[0], color="0.6", lw=0.8, ls=":")
        ax.loglog(k0, 30 * np.sqrt(k0 / k0[0]), color="0.6", lw=0.8, ls=":")
        ax.set_title(f"δ = {dl:g}")
        ax.set_xlabel("κ (condition number of G)")
        ax.set_ylabel("gradient-equivalents to reach δ")
        ax.grid(True, which="both", alpha=0.3)
    handles = []
    for alg, (label, p, _) in ALGORITHMS.items():
        fits = ", ".join(_exp(res["exponents"][str(d)][alg].get(f"{min(deltas):g}", {}).get("compute"))
                         for d in sorted(sizes))
        handles.append(Line2D([], [], color=colors[alg], marker="o", ms=3,
                              label=f"{label}\n  paper {p:g}, fit {fits}"))
    handles += [Line2D([], [], color="k", ls=styles[d], label=f"d = {d}") for d in sorted(sizes)]
    handles.append(Line2D([], [], color="0.6", ls=":", label="slopes 1 and 1/2"))
    fig.legend(handles=handles, loc="center right", fontsize=7,
               title=f"exponent fits at δ = {min(deltas):g}\n(d = " + ", ".join(map(str, sorted(sizes))) + ")",
               title_fontsize=7)
    fig.suptitle("Table 1 measured: compute to reach meta-gradient error δ")
    fig.tight_layout(rect=(0, 0, 1 - 2.5 / (4.6 * len(deltas) + 2.6), 1))
    paths.append(os.path.join(out_dir, "table1_compute.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9.2, 4.6))
    dl = min(deltas)
    for d in sizes:
        ls = styles[d]
        for alg, (label, _, _) in ALGORITHMS.items():
            pts = [(k, _cell(rows, d, alg, k, dl)) for k in kappas]
            pts = [(k, r["library"]["graph_bytes"]) for k, r in pts if r and r.get("library")]
            if pts:
                ax.loglog(*zip(*pts), ls=ls, marker="o", ms=3, color=colors[alg],
                          label=f"{label}, d={d}")
    ax.set_xlabel("κ (condition number of G)")
    ax.set_ylabel("autograd graph bytes (measured)")
    ax.set_title(f"Memory at the step counts for δ = {dl:g} (iMAML's three lines coincide)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "table1_memory.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    d = max(sizes)
    names = ([(f"truncated_T{T}", f"truncated, T={T}") for T in s["truncations"]]
             + [(f"imaml_cg{c}", f"iMAML, {c} CG") for c in s["few_cg_steps"]]
             + [("fomaml", "first-order MAML")])
    for i, (alg, label) in enumerate(names):
        pts = [(k, _cell(rows, d, alg, k, kind="terminal")) for k in kappas]
        pts = [(k, max(r["terminal_error"], 1e-16)) for k, r in pts if r]
        ax.loglog(*zip(*pts), marker="o", ms=3, label=label,
                  ls="--" if alg.startswith("imaml") else "-")
    for dl in deltas:
        ax.axhline(dl, color="0.7", lw=0.7, ls=":")
    ax.set_xlabel("κ (condition number of G)")
    ax.set_ylabel("terminal relative error (K → ∞; clipped at 1e-16)")
    ax.set_ylim(bottom=5e-17)
    ax.set_title(f"Error floors, d = {d} (dotted: δ)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "table1_terminal.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def run(out_dir: str, workers: Optional[int] = None, progress: Callable = print, **kwargs) -> Dict:
    """The study with the defaults (``imaml synthetic --table1``): writes ``table1.json``,
    ``table1.md`` and the PNG plots into ``out_dir``."""
    from .bench import machine
    from .records import write_json_atomic, write_text_atomic
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    workers = workers or min(2, os.cpu_count() or 1)
    progress(f"Table 1 study: model for every cell, then the library ({workers} process(es)) ...")
    res = study(workers=workers, progress=progress, **kwargs)
    res["machine"] = machine()
    res["workers"] = workers
    res["seconds"] = round(time.time() - t0, 1)
    write_json_atomic(res, os.path.join(out_dir, "table1.json"))
    write_text_atomic(markdown(res), os.path.join(out_dir, "table1.md"))
    paths = plot(res, out_dir)
    for alg, (label, p, _) in ALGORITHMS.items():
        fits = [f"d={d}: " + "/".join(_exp(res["exponents"][str(d)][alg].get(f"{dl:g}", {}).get("compute"))
                                      for dl in res["settings"]["deltas"])
                for d in res["settings"]["sizes"]]
        progress(f"  {label:<32} paper {p:g}   measured {'   '.join(fits)}")
    progress(f"wrote {out_dir}/table1.json, table1.md, " + ", ".join(os.path.basename(p) for p in paths)
             + f" in {res['seconds']:.0f}s")
    return res


# ---------------------------------------------------------------------------------------------
# The network: κ of the inner problem of a meta-trained Conv-4 (the optional part of issue 27)

def lanczos_extremes(matvec: Callable, n: int, iters: int = 60, dtype=torch.float32,
                     seed: int = 0) -> Dict[str, float]:
    """The largest and smallest eigenvalues of a symmetric operator by Lanczos with full
    reorthogonalisation (the Krylov refinement of power iteration): Ritz values of ``iters``
    steps from a random start, each with its residual bound β_m |s_m| (an eigenvalue of the
    operator lies within it)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, generator=g, dtype=torch.float64)
    q /= torch.linalg.vector_norm(q)
    Q, alphas, betas = [q], [], []
    prev, beta = torch.zeros_like(q), 0.0
    for _ in range(iters):
        w = matvec(q.to(dtype)).detach().to(torch.float64)
        a = float(w @ q)
        w = w - a * q - beta * prev
        B = torch.stack(Q)
        for _ in range(2):
            w = w - B.T @ (B @ w)
        alphas.append(a)
        beta = float(torch.linalg.vector_norm(w))
        betas.append(beta)
        if beta < 1e-12:
            break
        prev, q = q, w / beta
        Q.append(q)
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    off = torch.tensor(betas[:len(alphas) - 1], dtype=torch.float64)
    T = T + torch.diag(off, 1) + torch.diag(off, -1)
    ev, S = torch.linalg.eigh(T)
    res = betas[-1] * S[-1].abs()
    return {"max": float(ev[-1]), "min": float(ev[0]), "max_residual": float(res[-1]),
            "min_residual": float(res[0]), "iterations": len(alphas)}


def network_kappa(checkpoint: str, lams=(2.0, 5.0, 20.0), tasks: int = 4, iters: int = 60,
                  split: str = "meta_val", data_dir: Optional[str] = None, seed: int = 0,
                  decoded: Optional[str] = None, progress: Callable = print) -> Dict:
    """κ(G) = (h_max + λ)/(h_min + λ) of the inner problem of a meta-trained network on
    ``tasks`` tasks of ``split``, at each λ: φ from the checkpoint's own inner solver run with
    that λ, h_max and h_min the extreme eigenvalues of the support loss's Hessian at φ
    (``lanczos_extremes``); None where h_min + λ ≤ 0 (G not convex at φ). ``decoded``: an
    Omniglot cache file written by the loader (``~/.cache/imaml/omniglot-*.pt``), read directly
    where the source zips are not at hand."""
    from .checkpoint import MetaModel
    from .data import TaskSampler, load_split
    from .functional import curvature_product
    from .registry import build_method
    mm = MetaModel.load(checkpoint)
    info, model = mm.info, mm.model
    theta = model.theta()
    kind = (info.get("config") or {}).get("omniglot_split")
    kw = {"kind": kind} if info["dataset"] == "omniglot" and kind else {}
    if decoded:
        from .data.common import ImageClasses
        from .data.omniglot import split_names
        obj = torch.load(decoded, map_location="cpu", weights_only=True)
        classes = ImageClasses(obj["images"], obj["offsets"], list(obj["names"]))
        classes = classes.subset(split_names(kw.get("kind", "random"))[split])
    else:
        classes = load_split(info["dataset"], split, data_dir, **kw)
    sampler = TaskSampler(classes, info["ways"], info["shots"], info["queries"], seed=seed)
    out = {"checkpoint": str(checkpoint), "data": decoded or data_dir or "the loader's default",
           "dataset": info["dataset"], "ways": info["ways"],
           "shots": info["shots"], "split": split, "method": info["method"],
           "lanczos_iterations": iters, "rows": []}
    for lam in lams:
        method = build_method({**info["method"], "lam": lam})
        for i in range(tasks):
            task = sampler.sample(i)
            t0 = time.time()
            inner = method.adapt(model, theta, task.x_support, task.y_support)
            hvp = curvature_product(model, task.x_support, task.y_support, inner.phi.detach())
            e = lanczos_extremes(hvp, model.num_params, iters, dtype=theta.dtype, seed=i)
            ok = e["min"] + lam > 0
            row = {"lam": lam, "task": i, "inner_steps": inner.steps,
                   "inner_grad_norm": inner.grad_norm, **{f"h_{k}": v for k, v in e.items()},
                   "kappa": (e["max"] + lam) / (e["min"] + lam) if ok else None,
                   "seconds": round(time.time() - t0, 2)}
            out["rows"].append(row)
            progress(f"  λ={lam:g} task {i}: h in [{e['min']:.3g}, {e['max']:.3g}] "
                     f"(±{e['min_residual']:.1g}, ±{e['max_residual']:.1g}), κ(G) = "
                     + (f"{row['kappa']:.3g}" if ok else "undefined (h_min + λ ≤ 0)"))
    return out


def verify_more(json_path: str, out_path: str, max_library_steps: Optional[int] = 60000,
                max_graph_bytes: float = 2.5 * 2**30, progress: Callable = print) -> Dict:
    """Run through the library the cells of a finished study (``json_path``) that it left to the
    model and that fit the given caps, one after another; writes (after each cell, and run again
    it goes on from there) and returns {"cells": [row with its "library" result]} (the study's
    own file is left as it was)."""
    import json
    from .records import write_json_atomic
    with open(json_path) as fh:
        res = json.load(fh)
    out = {"source": json_path, "max_library_steps": max_library_steps,
           "max_graph_bytes": max_graph_bytes, "cells": []}
    if os.path.exists(out_path):  # a run that was interrupted: keep the cells it finished
        with open(out_path) as fh:
            out["cells"] = json.load(fh)["cells"]
    done = {(c["d"], c["kappa"], c["algorithm"], c["kind"], c["delta"]) for c in out["cells"]}
    seed = res["settings"]["seed"]
    for r in res["rows"]:
        if r.get("library") or (r["d"], r["kappa"], r["algorithm"], r["kind"], r["delta"]) in done:
            continue
        est = r["unrolled_steps"] * (8 * r["d"] * 1.05 + 32 * 1024)
        if est > max_graph_bytes or (max_library_steps and r["library_steps"] > max_library_steps):
            continue
        t0 = time.time()
        lib = run_cell({"d": r["d"], "kappa": r["kappa"], "seed": seed,
                        "algorithm": r["algorithm"], "params": r["params"]})
        out["cells"].append({**{k: v for k, v in r.items() if k != "library_skipped"},
                             "library": lib})
        progress(f"  d={r['d']} κ={r['kappa']:g} {r['algorithm']} δ={r['delta']}: library error "
                 f"{lib['error']:.3g} (model {r['model_error']:.3g}), agreement "
                 f"{lib['agreement']:.1e}, graph {_bytes(lib['graph_bytes'])}, "
                 f"{time.time() - t0:.0f}s")
        write_json_atomic(out, out_path)
    return out


def main(argv=None) -> int:
    """python -m imaml.table1 OUT_DIR [--library-steps N] [--graph-gib G] [--workers W]
    (the study; N = 0 lifts the cap on the iterations of a library cell), or
    python -m imaml.table1 OUT_DIR --verify-more --library-steps N --graph-gib G (the cells a
    finished study left to the model, through the library: OUT_DIR/verify_more.json), or
    python -m imaml.table1 OUT_DIR --network CHECKPOINT (κ of a meta-trained network's inner
    problem at λ = 2, 5, 20: OUT_DIR/network_kappa.json)."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m imaml.table1", description=main.__doc__)
    p.add_argument("out")
    p.add_argument("--library-steps", type=int, default=25000)
    p.add_argument("--graph-gib", type=float, default=2.0)
    p.add_argument("--workers", type=int)
    p.add_argument("--network", metavar="CHECKPOINT")
    p.add_argument("--decoded", metavar="FILE", help="--network: read Omniglot from a decoded "
                   "cache file (~/.cache/imaml/omniglot-*.pt) instead of the loader")
    p.add_argument("--verify-more", action="store_true", help="run the cells that OUT/table1.json "
                   "left to the model and that fit --library-steps and --graph-gib through the "
                   "library, one by one, into OUT/verify_more.json")
    a = p.parse_args(argv)
    if a.verify_more:
        verify_more(os.path.join(a.out, "table1.json"), os.path.join(a.out, "verify_more.json"),
                    a.library_steps or None, a.graph_gib * 2**30)
        return 0
    if a.network:
        from .records import write_json_atomic
        os.makedirs(a.out, exist_ok=True)
        write_json_atomic(network_kappa(a.network, decoded=a.decoded),
                          os.path.join(a.out, "network_kappa.json"))
        return 0
    run(a.out, workers=a.workers, max_library_steps=a.library_steps or None,
        max_graph_bytes=a.graph_gib * 2**30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
