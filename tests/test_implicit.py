"""The implicit layer φ*(θ, λ): gradients with respect to θ and λ against dense linear algebra
(a dense Hessian, the Krylov iterates of truncated solves), central finite differences and the
closed form of a linear model."""
import pytest
import torch
from torch import nn

from imaml import FunctionalModel, GradientDescent, NewtonCG, Task
from imaml.implicit import expand_lam, implicit_solution
from imaml.synthetic import half_mse


def rel(a, b):
    return float((a - b).norm() / b.norm())


def mlp_setup(seed=0):
    torch.manual_seed(seed)
    fm = FunctionalModel(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double())
    g = torch.Generator().manual_seed(seed + 1)
    task = Task(torch.randn(9, 4, generator=g, dtype=torch.float64), torch.arange(3).repeat(3),
                torch.randn(12, 4, generator=g, dtype=torch.float64), torch.arange(3).repeat(4))
    return fm, fm.theta(), task


def query_loss_through_layer(fm, theta, lam, task, inner, **kw):
    phi = implicit_solution(fm, theta, lam, task.x_support, task.y_support, inner, **kw)
    return fm.loss(phi, task.x_query, task.y_query)


def dense_system(fm, task, phi, lam):
    """I + H/λ at φ, H the support loss's Hessian from ``torch.func.hessian`` (dense), and
    v = ∇L_test(φ)."""
    from torch.func import grad, hessian
    H = hessian(lambda p: fm.loss(p, task.x_support, task.y_support))(phi)
    v = grad(lambda p: fm.loss(p, task.x_query, task.y_query))(phi)
    return torch.eye(len(phi), dtype=phi.dtype) + H / lam, v


def krylov_optimum(A, b, k, solver):
    """The k-th iterate of CG or MINRES on A x = b from x₀ = 0, by dense linear algebra over
    an orthonormal basis V of the Krylov space span{b, Ab, ..., A^{k-1}b}: CG's iterate meets
    the Galerkin condition Vᵀ(b − A x) = 0, MINRES's minimises ‖b − A x‖ over the space."""
    cols = [b / b.norm()]
    for _ in range(k - 1):
        cols.append(A @ cols[-1])
        cols[-1] = cols[-1] / cols[-1].norm()
    V, _ = torch.linalg.qr(torch.stack(cols, 1))
    if solver == "cg":
        return V @ torch.linalg.solve(V.T @ A @ V, V.T @ b)
    return V @ torch.linalg.lstsq(A @ V, b.unsqueeze(1)).solution[:, 0]


@pytest.mark.parametrize("solver", ["cg", "minres"])
@pytest.mark.parametrize("lam", [0.5, 0.3], ids=["definite", "indefinite"])
def test_truncated_layer_gradient_is_the_krylov_iterate(solver, lam):
    """Five linear-solver iterations at an inner solve stopped short (40 GD steps), with λ small
    enough that five do not solve the system (at λ 0.3 I + H/λ is indefinite there, its least
    eigenvalue −0.03): the θ-gradient is the fifth Krylov iterate of (I + H/λ) g = ∇L_test(φ)
    at the φ the layer returned."""
    fm, theta, task = mlp_setup()
    th = theta.clone().requires_grad_(True)
    record = {}
    query_loss_through_layer(fm, th, lam, task, GradientDescent(lr=0.1, steps=40),
                             linear_solver=solver, max_iter=5, record=record).backward()
    assert record["linear"].iterations == 5
    A, v = dense_system(fm, task, record["inner"].phi, lam)
    assert rel(th.grad, krylov_optimum(A, v, 5, solver)) < 1e-10
    assert rel(th.grad, torch.linalg.solve(A, v)) > 1e-2  # not the solution: the check can tell


def inner_exact():
    return NewtonCG(steps=60, cg_iters=80, tol=1e-14)


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["cg", "minres"])
def test_layer_gradient_matches_dense_solve_and_finite_differences(solver):
    """Inner problem and linear system solved to float64 precision: the θ-gradient equals
    λ(H + λI)⁻¹∇L_test(φ*) from a dense Hessian, and the derivative of θ -> L_test(φ*(θ)) along
    random directions by central differences of exact inner solves."""
    fm, theta, task = mlp_setup(seed=3)
    th = theta.clone().requires_grad_(True)
    record = {}
    query_loss_through_layer(fm, th, 2.0, task, inner_exact(), linear_solver=solver,
                             max_iter=300, record=record).backward()
    assert record["inner"].converged
    A, v = dense_system(fm, task, record["inner"].phi, 2.0)
    assert rel(th.grad, torch.linalg.solve(A, v)) < 1e-10
    g = torch.Generator().manual_seed(4)
    eps = 1e-5
    for _ in range(3):
        u = torch.randn(len(theta), generator=g, dtype=torch.float64)
        up = query_loss_through_layer(fm, theta + eps * u, 2.0, task, inner_exact())
        down = query_loss_through_layer(fm, theta - eps * u, 2.0, task, inner_exact())
        fd = float((up - down) / (2 * eps))
        assert abs(float(th.grad @ u) - fd) < 1e-6 * abs(fd)


@pytest.mark.parametrize("shape", ["scalar", "per layer"])
def test_lam_gradient_matches_finite_differences(shape):
    fm, theta, task = mlp_setup(seed=2)
    lam = torch.tensor(2.0, dtype=torch.float64) if shape == "scalar" else \
        torch.tensor([2.0, 1.5, 3.0, 2.5], dtype=torch.float64)
    lam_var = lam.clone().requires_grad_(True)
    query_loss_through_layer(fm, theta, lam_var, task, inner_exact(), max_iter=300).backward()
    eps = 1e-5
    fd = torch.zeros_like(lam).reshape(-1)
    for i in range(fd.numel()):
        e = torch.zeros_like(fd)
        e[i] = eps
        up = query_loss_through_layer(fm, theta, lam + e.reshape(lam.shape), task, inner_exact())
        down = query_loss_through_layer(fm, theta, lam - e.reshape(lam.shape), task, inner_exact())
        fd[i] = (up - down) / (2 * eps)
    assert rel(lam_var.grad.reshape(-1), fd) < 1e-5


def linear_task(seed=0, dim=6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(30, dim, generator=g, dtype=torch.float64)
    w = torch.randn(dim, 1, generator=g, dtype=torch.float64)
    y = (x @ w)[:, 0] + 0.1 * torch.randn(30, generator=g, dtype=torch.float64)
    return Task(x[:8], y[:8], x[8:], y[8:])


@pytest.mark.parametrize("shape", ["scalar", "per layer", "per parameter"])
def test_linear_regression_closed_form(shape):
    # y ≈ w·x + b with half-MSE: L̂(φ) = ½ φᵀAφ − cᵀφ + const in φ = (w, b), so
    # φ* = (A + Λ)⁻¹(c + Λθ), ∂L/∂θ = Λ(A + Λ)⁻¹∇L(φ*), ∂L/∂λᵢ = −(φ* − θ)ᵢ[(A + Λ)⁻¹∇L(φ*)]ᵢ
    torch.manual_seed(0)
    fm = FunctionalModel(nn.Linear(6, 1).double(), loss_fn=half_mse)
    task = linear_task()
    theta = torch.randn(7, dtype=torch.float64)
    lam = {"scalar": torch.tensor(2.0), "per layer": torch.tensor([2.0, 0.7]),
           "per parameter": torch.linspace(0.5, 3.0, 7)}[shape].double()
    th, lv = theta.clone().requires_grad_(True), lam.clone().requires_grad_(True)
    query_loss_through_layer(fm, th, lv, task, NewtonCG(steps=5, cg_iters=50, tol=1e-13),
                             max_iter=50).backward()
    xs = torch.cat([task.x_support, torch.ones(8, 1, dtype=torch.float64)], 1)
    xq = torch.cat([task.x_query, torch.ones(22, 1, dtype=torch.float64)], 1)
    A, c = xs.T @ xs / 8, xs.T @ task.y_support / 8
    L = torch.diag(expand_lam(fm, lam))
    phi = torch.linalg.solve(A + L, c + L @ theta)
    v = xq.T @ (xq @ phi - task.y_query) / 22
    w = torch.linalg.solve(A + L, v)
    assert rel(th.grad, L @ w) < 1e-8
    g_lam = -(phi - theta) * w
    g_lam = {"scalar": g_lam.sum().reshape(()), "per layer": torch.stack([g_lam[:6].sum(), g_lam[6]]),
             "per parameter": g_lam}[shape]
    assert rel(lv.grad, g_lam) < 1e-8


def test_layer_rejects_bad_lam():
    fm, theta, task = mlp_setup()
    with pytest.raises(ValueError, match="lam must be > 0"):
        implicit_solution(fm, theta, -1.0, task.x_support, task.y_support, GradientDescent())
    with pytest.raises(ValueError, match="one value per parameter tensor"):
        implicit_solution(fm, theta, torch.ones(3), task.x_support, task.y_support, GradientDescent())
