from dataclasses import replace

import pytest
import torch
from torch import nn

from imaml import (FOMAML, IMAML, MAML, FunctionalModel, GradientDescent, Nesterov, NewtonCG,
                   NonFiniteError, Reptile, Task, TruncatedMAML, meta_step, task_loss)
from imaml.inner import Adam
from imaml.linear import dense_matrix
from imaml.synthetic import exact_meta_gradient, regression_task

LAM = 2.0


def rel(a, b):
    return float((a - b).norm() / b.norm())


def classification_setup(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    fm = FunctionalModel(net)
    g = torch.Generator().manual_seed(seed + 1)
    task = Task(torch.randn(9, 4, generator=g, dtype=torch.float64), torch.arange(3).repeat(3),
                torch.randn(12, 4, generator=g, dtype=torch.float64), torch.arange(3).repeat(4))
    return fm, fm.theta(), task


def finite_difference_meta_gradient(method, fm, theta, task, eps=1e-6):
    """Central differences of θ -> L_test(φ_K(θ)), coordinate by coordinate."""
    def outer(th):
        phi = method.adapt(fm, th, task.x_support, task.y_support).phi
        return float(fm.loss(phi, task.x_query, task.y_query))
    e = torch.eye(theta.numel(), dtype=theta.dtype)
    return torch.tensor([(outer(theta + eps * ei) - outer(theta - eps * ei)) / (2 * eps) for ei in e],
                        dtype=theta.dtype)


# -- iMAML against the closed form -----------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
def test_imaml_matches_closed_form(seed):
    model, theta, task = regression_task(seed=seed)
    exact, _, _ = exact_meta_gradient(task, theta, LAM)
    inner = GradientDescent(lr=0.05, steps=5000, tol=1e-12)
    r = IMAML(lam=LAM, inner=inner, cg_max_iter=20).meta_gradient(model, theta, task)
    assert r.inner.converged
    assert rel(r.grad, exact) < 1e-6


def test_imaml_error_falls_with_cg_steps_and_is_solver_independent():
    model, theta, task = regression_task(seed=2)
    exact, _, _ = exact_meta_gradient(task, theta, LAM)
    errs = []
    for cg in (1, 2, 5, 20):
        inner = GradientDescent(lr=0.05, steps=5000, tol=1e-12)
        errs.append(rel(IMAML(lam=LAM, inner=inner, cg_max_iter=cg).meta_gradient(model, theta, task).grad, exact))
    assert errs[0] > errs[1] > errs[2] > errs[3]
    assert errs[1] > 1e-3  # two CG steps leave an error ...
    assert errs[3] < 1e-6  # ... that twenty remove
    # The meta-gradient depends on the inner solution only, not on the solver that found it.
    for solver in (Nesterov(lr=0.05, momentum=0.6, steps=5000, tol=1e-12),
                   NewtonCG(steps=20, tol=1e-12)):
        g = IMAML(lam=LAM, inner=solver, cg_max_iter=20).meta_gradient(model, theta, task).grad
        assert rel(g, exact) < 1e-6


def test_imaml_ggn_on_linear_regression_matches_closed_form():
    # for a linear model with squared loss the Gauss-Newton matrix is the Hessian
    model, theta, task = regression_task(seed=1)
    exact, _, _ = exact_meta_gradient(task, theta, LAM)
    inner = GradientDescent(lr=0.05, steps=5000, tol=1e-12)
    r = IMAML(lam=LAM, inner=inner, cg_max_iter=20, curvature="ggn").meta_gradient(model, theta, task)
    assert rel(r.grad, exact) < 1e-6


def test_imaml_ggn_never_meets_negative_curvature():
    fm, theta, task = classification_setup()
    theta = theta * 4  # saturated tanh: an indefinite Hessian
    hess = IMAML(lam=0.05, inner=GradientDescent(lr=0.05, steps=3), cg_max_iter=30)
    ggn = IMAML(lam=0.05, inner=GradientDescent(lr=0.05, steps=3), cg_max_iter=30, curvature="ggn",
                cg_rtol=1e-10)
    assert hess.meta_gradient(fm, theta, task).cg.negative_curvature
    r = ggn.meta_gradient(fm, theta, task)
    assert not r.cg.negative_curvature and r.cg.converged


def test_imaml_on_network_matches_dense_linear_solve():
    fm, theta, task = classification_setup()
    method = IMAML(lam=LAM, inner=GradientDescent(lr=0.1, steps=3000, tol=1e-10), cg_max_iter=200,
                   cg_rtol=1e-12)
    r = method.meta_gradient(fm, theta, task)
    phi = r.phi
    from torch.func import grad
    H = dense_matrix(lambda v: grad(lambda p: torch.dot(grad(task_loss(fm, task.x_support, task.y_support))(p), v))(phi),
                     fm.num_params)
    v = grad(task_loss(fm, task.x_query, task.y_query))(phi)
    A = torch.eye(fm.num_params, dtype=torch.float64) + H / LAM
    assert rel(r.grad, torch.linalg.solve(A, v)) < 1e-8
    assert r.cg.converged and not r.cg.negative_curvature


# -- MAML and its relatives against finite differences -------------------------------------

@pytest.mark.parametrize("inner,lam", [
    (GradientDescent(lr=0.3, steps=5), 0.0),
    (GradientDescent(lr=0.2, steps=4), 1.5),
    (Nesterov(lr=0.2, momentum=0.7, steps=5), 0.0),
])
def test_maml_matches_finite_differences(inner, lam):
    fm, theta, task = classification_setup()
    method = MAML(inner=inner, lam=lam)
    g = method.meta_gradient(fm, theta, task).grad
    fd = finite_difference_meta_gradient(method, fm, theta, task)
    assert rel(g, fd) < 1e-6


def test_maml_approaches_exact_gradient_on_quadratic():
    model, theta, task = regression_task(seed=0)
    exact, _, _ = exact_meta_gradient(task, theta, LAM)
    errs = [rel(MAML(inner=GradientDescent(lr=0.05, steps=k), lam=LAM).meta_gradient(model, theta, task).grad, exact)
            for k in (5, 50, 500)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-8


def test_truncated_interpolates_fomaml_and_maml():
    fm, theta, task = classification_setup()
    gd = GradientDescent(lr=0.3, steps=6)
    maml = MAML(inner=gd).meta_gradient(fm, theta, task).grad
    fo = FOMAML(inner=gd).meta_gradient(fm, theta, task).grad
    assert torch.allclose(TruncatedMAML(inner=gd, truncate=6).meta_gradient(fm, theta, task).grad, maml)
    assert torch.allclose(TruncatedMAML(inner=gd, truncate=0).meta_gradient(fm, theta, task).grad, fo)
    t3 = TruncatedMAML(inner=gd, truncate=3).meta_gradient(fm, theta, task)
    assert rel(t3.grad, maml) < rel(fo, maml)
    assert t3.inner.steps == 6


def test_truncated_with_proximal_inner_loop():
    # with λ > 0 the unrolled steps are on G; T = K is MAML on G, T = 0 is FOMAML on G
    fm, theta, task = classification_setup()
    gd = GradientDescent(lr=0.2, steps=4)
    maml = MAML(inner=gd, lam=1.5).meta_gradient(fm, theta, task).grad
    fo = FOMAML(inner=gd, lam=1.5).meta_gradient(fm, theta, task).grad
    assert torch.allclose(TruncatedMAML(inner=gd, truncate=4, lam=1.5).meta_gradient(fm, theta, task).grad,
                          maml)
    assert torch.allclose(TruncatedMAML(inner=gd, truncate=0, lam=1.5).meta_gradient(fm, theta, task).grad,
                          fo)
    assert not torch.allclose(maml, MAML(inner=gd).meta_gradient(fm, theta, task).grad)


def test_imaml_fwd_rev_hvp_equals_rev_rev():
    fm, theta, task = classification_setup()
    inner = GradientDescent(lr=0.1, steps=20)
    a = IMAML(lam=LAM, inner=inner, cg_max_iter=10, hvp_mode="rev-rev").meta_gradient(fm, theta, task)
    b = IMAML(lam=LAM, inner=inner, cg_max_iter=10, hvp_mode="fwd-rev").meta_gradient(fm, theta, task)
    assert rel(a.grad, b.grad) < 1e-10


def test_imaml_newton_cg_with_gauss_newton_matches_dense_solve():
    from torch.func import jacrev, hessian
    fm, theta, task = classification_setup()
    method = IMAML(lam=LAM, inner=NewtonCG(steps=30, cg_iters=10, tol=1e-9), cg_max_iter=100,
                   cg_rtol=1e-12, curvature="ggn")
    r = method.meta_gradient(fm, theta, task)
    assert r.inner.converged and r.inner.negative_curvature == 0
    phi, x, y = r.phi, task.x_support, task.y_support
    J = jacrev(lambda p: fm.forward(p, x))(phi).reshape(-1, phi.numel())
    z = fm.forward(phi, x).detach()
    Hz = hessian(lambda out: fm.loss_fn(out, y))(z).reshape(z.numel(), z.numel())
    from torch.func import grad
    v = grad(task_loss(fm, task.x_query, task.y_query))(phi)
    A = torch.eye(fm.num_params, dtype=torch.float64) + J.T @ Hz @ J / LAM
    assert rel(r.grad, torch.linalg.solve(A, v)) < 1e-8


@pytest.mark.parametrize("solver", ["cg", "minres"])
def test_no_autograd_graph_survives_imaml(solver):
    # even when θ requires grad, nothing iMAML returns holds an autograd graph (which would keep
    # the inner trajectory alive); that memory stays flat in the inner steps is measured by
    # imaml bench and the synthetic study
    fm, theta, task = classification_setup()
    theta = theta.clone().requires_grad_(True)
    method = IMAML(lam=LAM, inner=GradientDescent(lr=0.1, steps=5, adaptive=True),
                   linear_solver=solver)
    r = method.meta_gradient(fm, theta, task)
    for t in (r.grad, r.phi, r.inner.phi, r.cg.x):
        assert t.grad_fn is None and not t.requires_grad


def test_fomaml_and_reptile_definitions():
    fm, theta, task = classification_setup()
    gd = GradientDescent(lr=0.3, steps=4)
    phi = theta
    for _ in range(4):  # an independent hand-written inner loop
        phi = phi - 0.3 * torch.autograd.functional.jacobian(task_loss(fm, task.x_support, task.y_support), phi)
    q = torch.autograd.functional.jacobian(task_loss(fm, task.x_query, task.y_query), phi)
    assert torch.allclose(FOMAML(inner=gd).meta_gradient(fm, theta, task).grad, q)
    assert torch.allclose(Reptile(inner=gd).meta_gradient(fm, theta, task).grad, theta - phi)


# -- the outer step ----------------------------------------------------------------------------

def test_meta_step_sgd_averages_task_gradients():
    fm, theta, task = classification_setup()
    _, _, task2 = classification_setup(seed=5)
    method = IMAML(lam=LAM, inner=GradientDescent(lr=0.1, steps=5))
    r1, r2 = method.meta_gradient(fm, theta, task), method.meta_gradient(fm, theta, task2)
    g = (r1.grad + r2.grad) / 2
    opt = torch.optim.SGD(fm.module.parameters(), lr=0.5)
    summary = meta_step(method, fm, opt, [task, task2])
    assert torch.allclose(fm.theta(), theta - 0.5 * g)
    assert summary.grad_norm == pytest.approx(float(g.norm()))
    # the summary's figures are the task means, scored independently here from the adapted φ
    accs = [float((fm.forward(r.phi, t.x_query).argmax(-1) == t.y_query).float().mean())
            for r, t in ((r1, task), (r2, task2))]
    assert summary.query_accuracy == pytest.approx(sum(accs) / 2)
    assert summary.query_loss == pytest.approx((r1.query_loss + r2.query_loss) / 2)


def test_meta_step_adam_reduces_query_loss():
    fm, theta, task = classification_setup()
    method = IMAML(lam=LAM, inner=GradientDescent(lr=0.1, steps=5))
    opt = torch.optim.Adam(fm.module.parameters(), lr=0.01)
    first = meta_step(method, fm, opt, [task]).query_loss
    for _ in range(30):
        last = meta_step(method, fm, opt, [task]).query_loss
    assert last < first


def test_meta_step_carries_adam_moments_as_explicit_state():
    """Reptile with Adam(carry=True) (the trainer's inner_carry): a step returns the batch-mean
    final moments and the inner steps they have seen; the next step, given that state, starts
    every inner solve from them (checked against solves started from them by hand); the method
    object itself is left as it was."""
    fm, theta, task = classification_setup()
    _, _, task2 = classification_setup(seed=5)
    method = Reptile(inner=Adam(lr=0.01, steps=3, carry=True))
    opt = torch.optim.SGD(fm.module.parameters(), lr=0.5)
    first = meta_step(method, fm, opt, [task, task2])
    m = torch.stack([r.inner.moments for r in first.results]).mean(0)
    assert torch.equal(first.state.moments, m) and first.state.inner_t == 3
    assert bool((m[1] > 0).any()) and method.inner.m0 is None and method.inner.t0 == 0
    theta1 = fm.theta()
    by_hand = Reptile(inner=Adam(lr=0.01, steps=3).with_moments(m[0], m[1], 3))
    g = sum(by_hand.meta_gradient(fm, theta1, t).grad for t in (task, task2)) / 2
    fresh = sum(method.meta_gradient(fm, theta1, t).grad for t in (task, task2)) / 2
    assert rel(g, fresh) > 1e-3  # the carried moments change the step
    second = meta_step(method, fm, opt, [task, task2], state=first.state)
    assert torch.allclose(fm.theta(), theta1 - 0.5 * g, rtol=0, atol=1e-12)
    assert second.state.inner_t == 6


def test_meta_step_learns_lambda_per_tensor():
    """learned_lam (the trainer's learn_lam): the step moves log λ of each tensor by Adam on
    λ_l Σ ∂L_test/∂λ_i, with the λ-gradient checked here by finite differences of the mean
    query loss in log λ of one tensor; the state carries the new λ per parameter."""
    from imaml.outer import LearnedLam
    fm, theta, task = classification_setup()
    _, _, task2 = classification_setup(seed=5)
    method = IMAML(lam=LAM, cg_max_iter=100, cg_rtol=1e-12, inner=GradientDescent(
        lr=0.5, steps=500, tol=1e-11, adaptive=True, step_rule="bb"))
    learned = LearnedLam(fm, LAM, lr=0.05)
    lam0 = learned.per_parameter().clone()

    def query_loss(lam):  # mean L_test at the adapted φ(θ, λ), θ fixed
        m = replace(method, lam=lam)
        return sum(m.meta_gradient(fm, theta, t).query_loss for t in (task, task2)) / 2

    opt = torch.optim.SGD(fm.module.parameters(), lr=0.0)  # θ stays: only λ moves
    summary = meta_step(method, fm, opt, [task, task2], learned_lam=learned)
    lam_grad = torch.stack([r.lam_grad for r in summary.results]).mean(0)
    first = slice(0, fm.numels[0])  # the first tensor's λ, in log space
    eps = 1e-3  # (smaller steps meet the inner solves' tolerance: 1e-4 agreed to 2e-4 only)
    up, down = lam0.clone(), lam0.clone()
    up[first] *= torch.exp(torch.tensor(eps, dtype=up.dtype))
    down[first] *= torch.exp(torch.tensor(-eps, dtype=up.dtype))
    fd = (query_loss(up) - query_loss(down)) / (2 * eps)
    assert float(LAM * lam_grad[first].sum()) == pytest.approx(fd, rel=1e-4)
    # Adam's first step moves each log λ_l by lr against the sign of its gradient (log λ in float32)
    step = summary.state.lam.log() - lam0.log()
    assert float(step[0]) == pytest.approx(-0.05 * (1 if fd > 0 else -1), rel=1e-5)
    assert torch.equal(summary.state.lam, learned.per_parameter())
    assert method.lam == LAM  # the method object is unchanged
    with pytest.raises(ValueError, match="learned_lam learns iMAML's λ; FOMAML"):
        meta_step(FOMAML(), fm, opt, [task], learned_lam=learned)


# -- bad arguments ---------------------------------------------------------------------------

def test_bad_arguments_raise_clear_errors():
    fm, theta, task = classification_setup()
    for lam in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lam"):
            IMAML(lam=lam)
    with pytest.raises(ValueError, match="lam"):
        MAML(lam=-1.0)
    with pytest.raises(ValueError, match="Nesterov"):
        MAML(inner=NewtonCG())
    with pytest.raises(ValueError, match="curvature"):
        IMAML(curvature="fisher")
    with pytest.raises(ValueError, match="truncate"):
        TruncatedMAML(inner=GradientDescent(steps=3), truncate=4)
    with pytest.raises(ValueError, match="support set has 9 inputs but 2 targets"):
        Task(task.x_support, task.y_support[:2], task.x_query, task.y_query)
    with pytest.raises(ValueError, match="flat parameter vector"):
        IMAML().meta_gradient(fm, theta[:-1], task)
    with pytest.raises(ValueError, match="at least one task"):
        meta_step(IMAML(), fm, torch.optim.SGD(fm.module.parameters(), lr=0.1), [])
    bad = Task(task.x_support, task.y_support, task.x_query * float("nan"), task.y_query)
    for method in (IMAML(), MAML(), FOMAML(), Reptile()):
        with pytest.raises(NonFiniteError, match="query loss"):
            method.meta_gradient(fm, theta, bad)


def test_adapted_module_leaves_the_meta_model_untouched():
    fm, theta, task = classification_setup()
    before = {k: v.clone() for k, v in fm.module.state_dict().items()}
    method = IMAML(lam=LAM, inner=GradientDescent(lr=0.1, steps=10, adaptive=True))
    clone = method.adapted_module(fm.module, task.x_support, task.y_support)
    after = fm.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical
    phi = method.adapt(fm, theta, task.x_support, task.y_support).phi
    assert torch.equal(clone(task.x_query), fm.forward(phi, task.x_query))
    assert not torch.equal(clone(task.x_query), fm.module(task.x_query))
