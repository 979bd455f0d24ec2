"""The implicit layer φ*(θ, λ): gradients with respect to θ and λ against iMAML's meta-gradient,
central finite differences and the closed form of a linear model."""
import pytest
import torch
from torch import nn

from imaml import IMAML, FunctionalModel, GradientDescent, NewtonCG, Task
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


@pytest.mark.parametrize("solver", ["cg", "minres"])
def test_layer_gradient_equals_imaml_meta_gradient(solver):
    fm, theta, task = mlp_setup()
    inner = GradientDescent(lr=0.1, steps=40)
    ref = IMAML(lam=2.0, inner=inner, cg_max_iter=5, linear_solver=solver).meta_gradient(fm, theta, task)
    th = theta.clone().requires_grad_(True)
    record = {}
    query_loss_through_layer(fm, th, 2.0, task, inner, linear_solver=solver, max_iter=5,
                             record=record).backward()
    assert rel(th.grad, ref.grad) < 1e-10  # iterate for iterate: 5 steps, not converged
    assert record["linear"].iterations == 5 and torch.equal(record["inner"].phi, ref.phi)


def inner_exact():
    return NewtonCG(steps=60, cg_iters=80, tol=1e-14)


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
