import pytest
import torch
from torch import nn

from imaml import (FunctionalModel, GradientDescent, Nesterov, NewtonCG, NonFiniteError,
                   ProximalProblem, task_loss)
from imaml.synthetic import exact_meta_gradient, regression_task

LAM = 2.0


def quadratic_problem(seed=0):
    model, theta, task = regression_task(seed=seed)
    _, phi_star, H = exact_meta_gradient(task, theta, LAM)
    L = float(torch.linalg.eigvalsh(H).max()) + LAM
    return ProximalProblem(task_loss(model, task.x_support, task.y_support), theta, LAM), phi_star, L


@pytest.mark.parametrize("solver_fn", [
    lambda L: GradientDescent(lr=1 / L, steps=10_000, tol=1e-8),
    lambda L: Nesterov(lr=1 / L, momentum=0.5, steps=10_000, tol=1e-8),
    lambda L: NewtonCG(steps=50, cg_iters=5, tol=1e-8),
    # adaptive steps from a first trial 100x too long for this G: rejected and halved
    lambda L: GradientDescent(lr=100 / L, steps=10_000, tol=1e-8, adaptive=True),
    lambda L: Nesterov(lr=100 / L, momentum=0.9, steps=10_000, tol=1e-8, adaptive=True),
    lambda L: GradientDescent(lr=100 / L, steps=10_000, tol=1e-8, adaptive=True, step_rule="bb"),
    lambda L: GradientDescent(lr=1e-3 / L, steps=10_000, tol=1e-8, adaptive=True, step_rule="bb"),
])
def test_solver_reaches_tolerance(solver_fn):
    problem, phi_star, L = quadratic_problem()
    res = solver_fn(L).solve(problem, problem.theta)
    assert res.converged and res.grad_norm <= LAM * 1e-8 and res.stop_reason == "tolerance"
    # strong convexity: ‖φ − φ*‖ ≤ ‖∇G(φ)‖/λ ≤ tol
    assert float((res.phi - phi_star).norm()) <= 1e-8
    assert res.steps > 0 and res.grad_norms[-1] == res.grad_norm
    # the reported norm is the true one at the returned point
    assert res.grad_norm == pytest.approx(float(problem.grad(res.phi).norm()), rel=1e-6, abs=1e-14)


def test_adaptive_step_converges_where_the_fixed_step_diverges():
    problem, _, L = quadratic_problem(seed=2)
    lr = 3.0 / L  # beyond 2/L: fixed-step GD diverges on this quadratic
    fixed = GradientDescent(lr=lr, steps=200, report=True).solve(problem, problem.theta)
    adaptive = GradientDescent(lr=lr, steps=200, tol=1e-6, adaptive=True).solve(problem, problem.theta)
    assert fixed.grad_norm > fixed.grad_norms[0]
    assert adaptive.converged and adaptive.rejected >= 1
    # every accepted step decreased G: the objective along the accepted iterates is monotone
    assert adaptive.grad_norm < 1e-3 * adaptive.grad_norms[0]


def test_adaptive_nesterov_beats_adaptive_gd_on_an_ill_conditioned_problem():
    from conftest import spd_matrix
    A = spd_matrix(40, cond=200.0) * 0.5  # eigenvalues 0.5 .. 100; with λ = 2, κ(G) ≈ 41
    b = torch.randn(40, dtype=torch.float64)
    problem = ProximalProblem(lambda p: 0.5 * p @ A @ p - b @ p, torch.zeros(40, dtype=torch.float64), LAM)
    phi_star = torch.linalg.solve(A + LAM * torch.eye(40, dtype=torch.float64), b)
    kw = dict(lr=1.0, steps=10_000, tol=1e-9, adaptive=True)  # a first step 100x too long
    gd = GradientDescent(**kw).solve(problem, problem.theta)
    nag = Nesterov(momentum=0.9, **kw).solve(problem, problem.theta)
    assert gd.converged and nag.converged
    assert float((nag.phi - phi_star).norm()) <= 1e-9
    # each iteration costs a gradient, accepted or not: Nesterov needs far fewer
    assert nag.steps + nag.rejected < 0.6 * (gd.steps + gd.rejected)


def test_barzilai_borwein_needs_far_fewer_gradients_than_the_growth_rule():
    from conftest import spd_matrix
    A = spd_matrix(40, cond=200.0) * 0.5
    b = torch.randn(40, dtype=torch.float64)
    problem = ProximalProblem(lambda p: 0.5 * p @ A @ p - b @ p, torch.zeros(40, dtype=torch.float64), LAM)
    phi_star = torch.linalg.solve(A + LAM * torch.eye(40, dtype=torch.float64), b)
    for lr in (1.0, 1e-4):  # a first trial 100x too long, and one 100x too short
        kw = dict(lr=lr, steps=10_000, tol=1e-9, adaptive=True)
        grow = GradientDescent(**kw).solve(problem, problem.theta)
        bb = GradientDescent(step_rule="bb", **kw).solve(problem, problem.theta)
        assert grow.converged and bb.converged
        assert float((bb.phi - phi_star).norm()) <= 1e-9
        assert bb.steps + bb.rejected < 0.5 * (grow.steps + grow.rejected)


def test_barzilai_borwein_rejects_bad_settings():
    with pytest.raises(ValueError, match="step_rule"):
        GradientDescent(step_rule="bb")  # not adaptive
    with pytest.raises(ValueError, match="step_rule"):
        GradientDescent(step_rule="newton", adaptive=True)
    with pytest.raises(ValueError, match="memory"):
        GradientDescent(step_rule="bb", adaptive=True, memory=0)


def test_nesterov_needs_fewer_steps_than_gd():
    problem, _, L = quadratic_problem(seed=1)
    gd = GradientDescent(lr=1 / L, steps=10_000, tol=1e-10).solve(problem, problem.theta)
    kappa = L / LAM
    mu = (kappa ** 0.5 - 1) / (kappa ** 0.5 + 1)
    nag = Nesterov(lr=1 / L, momentum=mu, steps=10_000, tol=1e-10).solve(problem, problem.theta)
    assert gd.converged and nag.converged and nag.steps < gd.steps


def test_step_budget_reports_not_converged():
    problem, _, L = quadratic_problem()
    res = GradientDescent(lr=1 / L, steps=3, tol=1e-12).solve(problem, problem.theta)
    assert res.steps == 3 and not res.converged and res.grad_norm > LAM * 1e-12
    assert res.stop_reason == "step_cap"
    res = GradientDescent(lr=1 / L, steps=3).solve(problem, problem.theta)
    assert res.grad_norm is None and not res.converged  # no tolerance: no extra gradient


def test_newton_cg_on_indefinite_network_hessian():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    fm = FunctionalModel(net)
    x, y = torch.randn(20, 5, dtype=torch.float64), torch.randint(0, 4, (20,))
    theta = fm.theta() * 3  # large weights: saturated tanh, strongly indefinite Hessian
    problem = ProximalProblem(task_loss(fm, x, y), theta, lam=0.01)
    res = NewtonCG(steps=300, cg_iters=5, tol=1e-6, report=True).solve(problem, theta)
    # it reaches the tolerance it was asked for (‖∇G‖ ≤ λ·tol = 1e-8, from about 1) and says so
    assert res.converged and res.stop_reason == "tolerance" and res.grad_norm <= 0.01 * 1e-6
    assert res.grad_norm == pytest.approx(float(problem.grad(res.phi).norm()), rel=1e-6)
    assert float(problem.value(res.phi)) < float(problem.value(theta))
    assert res.negative_curvature > 0  # the case this solver must cope with did occur


@pytest.mark.parametrize("solver", [
    GradientDescent(lr=0.05, steps=5000, tol=1e-3),
    GradientDescent(lr=1.0, steps=5000, tol=1e-3, adaptive=True, step_rule="bb"),
    Nesterov(lr=0.05, momentum=0.5, steps=5000, tol=1e-3, adaptive=True),
    NewtonCG(steps=100, cg_iters=3, tol=1e-3),
])
def test_per_parameter_lambda_tolerance_is_on_the_scaled_gradient(solver):
    """With one λ per parameter the test is ‖Λ⁻¹∇G‖ ≤ tol (‖∇G‖ ≤ λ·tol for a scalar λ): every
    solver stops on it, at the first iterate where it holds."""
    model, theta, task = regression_task(seed=2)
    lam = torch.full_like(theta, 4.0)
    lam[: len(theta) // 4] = 0.05  # a few small λ, as meta-learning gave the head
    problem = ProximalProblem(task_loss(model, task.x_support, task.y_support), theta, lam)
    res = solver.solve(problem, theta)
    g = problem.grad(res.phi)
    assert res.converged and res.stop_reason == "tolerance"
    assert float((g / lam).norm()) <= 1e-3
    assert res.grad_norm == pytest.approx(float(g.norm()), rel=1e-9)
    before = solver.solve(problem, theta, steps=res.steps + res.rejected - 1)
    assert not before.converged
    assert float((problem.grad(before.phi) / lam).norm()) > 1e-3
    # a scalar λ keeps ‖∇G‖ ≤ λ·tol
    scalar = ProximalProblem(problem.loss, theta, 0.5)
    res = solver.solve(scalar, theta)
    assert res.converged and float(scalar.grad(res.phi).norm()) <= 0.5 * 1e-3


def test_damped_newton_model_is_exact_on_a_quadratic():
    """On a quadratic G the undamped model q is exact, so every reduction ratio is 1 and μ
    shrinks by 2/3 per accepted step: a check of q(t d) computed from CG's identity."""
    problem, phi_star, _ = quadratic_problem()
    res = NewtonCG(steps=50, cg_iters=5, tol=1e-8, damping=1.0).solve(problem, problem.theta)
    assert res.converged and res.negative_curvature == 0
    assert res.damping == pytest.approx((2 / 3) ** res.steps, rel=1e-9)
    torch.testing.assert_close(res.phi, phi_star, rtol=0, atol=1e-6)


def test_damping_on_an_indefinite_network_hessian():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    fm = FunctionalModel(net)
    x, y = torch.randn(20, 5, dtype=torch.float64), torch.randint(0, 4, (20,))
    theta = fm.theta() * 3
    problem = ProximalProblem(task_loss(fm, x, y), theta, lam=0.01)
    plain = NewtonCG(steps=300, cg_iters=5, tol=1e-6, report=True).solve(problem, theta)
    damped = NewtonCG(steps=300, cg_iters=5, tol=1e-6, report=True, damping=1.0).solve(problem,
                                                                                       theta)
    # both reach the tolerance; the damped systems meet negative curvature less often and
    # need fewer Newton steps (measured: 86 against 143)
    assert plain.converged and damped.converged and damped.grad_norm <= 0.01 * 1e-6
    assert damped.negative_curvature < plain.negative_curvature
    assert damped.steps < 0.8 * plain.steps
    with pytest.raises(ValueError, match="damping"):
        NewtonCG(damping=-1.0)
    with pytest.raises(ValueError, match="damping"):
        NewtonCG(damping=float("nan"))


def test_non_finite_loss_raises():
    fm = FunctionalModel(nn.Linear(3, 2).double())
    x = torch.full((4, 3), float("nan"), dtype=torch.float64)
    problem = ProximalProblem(task_loss(fm, x, torch.zeros(4, dtype=torch.long)), fm.theta(), 1.0)
    for solver in (GradientDescent(steps=2), Nesterov(steps=2), NewtonCG(steps=2),
                   GradientDescent(steps=2, adaptive=True), Nesterov(steps=2, adaptive=True)):
        with pytest.raises(NonFiniteError, match="not finite"):
            solver.solve(problem, problem.theta)


def test_bad_solver_arguments():
    with pytest.raises(ValueError, match="lr"):
        GradientDescent(lr=0.0)
    with pytest.raises(ValueError, match="steps"):
        GradientDescent(steps=-1)
    with pytest.raises(ValueError, match="tol"):
        Nesterov(tol=-1.0)
    with pytest.raises(ValueError, match="momentum"):
        Nesterov(momentum=1.0)
    with pytest.raises(ValueError, match="cg_iters"):
        NewtonCG(cg_iters=0)


def test_newton_cg_with_gauss_newton_curvature():
    from imaml.functional import make_ggn
    torch.manual_seed(3)
    fm = FunctionalModel(nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 4)).double())
    x, y = torch.randn(20, 5, dtype=torch.float64), torch.randint(0, 4, (20,))
    theta = fm.theta() * 3
    problem = ProximalProblem(task_loss(fm, x, y), theta, lam=0.01,
                              curvature=lambda phi: make_ggn(fm, x, y, phi))
    res = NewtonCG(steps=30, cg_iters=5, tol=1e-6, report=True).solve(problem, theta)
    assert res.negative_curvature == 0 and res.line_search_failures == 0
    assert res.grad_norm < 0.05 * res.grad_norms[0]
    assert float(problem.value(res.phi)) < float(problem.value(theta))


def test_newton_cg_warm_started_line_search_saves_evaluations():
    torch.manual_seed(3)
    fm = FunctionalModel(nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 4)).double())
    x, y = torch.randn(20, 5, dtype=torch.float64), torch.randint(0, 4, (20,))
    theta = fm.theta() * 3
    problem = ProximalProblem(task_loss(fm, x, y), theta, lam=0.01)
    warm = NewtonCG(steps=30, cg_iters=5, report=True).solve(problem, theta)
    cold = NewtonCG(steps=30, cg_iters=5, report=True, warm_start=False).solve(problem, theta)
    # the same number of Newton steps, fewer objective evaluations, no worse an objective
    assert warm.steps == cold.steps == 30
    assert warm.evaluations < cold.evaluations
    assert float(problem.value(warm.phi)) <= float(problem.value(cold.phi)) * 1.05


def test_adam_equals_torch_adam_and_its_mini_batches_partition_the_support_set():
    """Adam as Reptile's inner loop: the full-batch iterates equal torch.optim.Adam(betas=(0,
    0.999)) on G; the mini-batch gradients of one epoch average to the full gradient."""
    from imaml import Adam
    from imaml.functional import inner_problem
    torch.manual_seed(0)
    fm = FunctionalModel(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double())
    x, y = torch.randn(20, 4, dtype=torch.float64), torch.arange(4).repeat(5) % 3
    theta = fm.theta()
    problem = inner_problem(fm, x, y, theta, 0.5)
    ours = Adam(lr=0.01, steps=7, beta1=0.0).solve(problem, theta)
    p = theta.clone().requires_grad_(True)
    opt = torch.optim.Adam([p], lr=0.01, betas=(0.0, 0.999), eps=1e-8)
    for _ in range(7):
        opt.zero_grad()
        problem.value(p).backward()
        opt.step()
    assert torch.allclose(ours.phi, p.detach(), rtol=1e-12, atol=1e-14)
    assert ours.steps == 7 and ours.stop_reason == "step_cap"
    # 4 batches of 5 cover the 20 examples once: their loss gradients average to the full one
    phi = theta + 0.1
    mean = sum(problem.batch_grad(phi, k, 5) for k in range(4)) / 4
    assert torch.allclose(mean, problem.grad(phi), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(problem.batch_grad(phi, 0, 5), problem.grad(phi))
    assert torch.equal(problem.batch_grad(phi, 3, 20), problem.grad(phi))  # a batch of all
    assert torch.equal(problem.batch_grad(phi, 0, 5), problem.batch_grad(phi, 4, 5))  # cycles


def test_adam_with_carried_moments_continues_torch_adam():
    """Carried moments (Reptile's code never resets Adam): starting from the moments of t0
    earlier steps, the iterates and the returned moments equal torch.optim.Adam continuing
    its own state."""
    from imaml import Adam
    from imaml.functional import inner_problem
    torch.manual_seed(1)
    fm = FunctionalModel(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double())
    x, y = torch.randn(20, 4, dtype=torch.float64), torch.arange(4).repeat(5) % 3
    theta = fm.theta()
    problem = inner_problem(fm, x, y, theta, 0.5)
    p = theta.clone().requires_grad_(True)
    opt = torch.optim.Adam([p], lr=0.01, betas=(0.3, 0.999), eps=1e-8)
    for _ in range(9):  # earlier steps on other gradients
        p.grad = torch.randn_like(p)
        opt.step()
    st = opt.state[p]
    m, v, t = st["exp_avg"].clone(), st["exp_avg_sq"].clone(), int(st["step"])
    with torch.no_grad():
        p.copy_(theta)
    for _ in range(5):
        opt.zero_grad()
        problem.value(p).backward()
        opt.step()
    solver = Adam(lr=0.01, steps=5, beta1=0.3, carry=True).with_moments(m, v, t)
    ours = solver.solve(problem, theta)
    assert torch.allclose(ours.phi, p.detach(), rtol=1e-12, atol=1e-14)
    assert torch.allclose(ours.moments[0], st["exp_avg"], rtol=1e-12, atol=1e-16)
    assert torch.allclose(ours.moments[1], st["exp_avg_sq"], rtol=1e-12, atol=1e-18)
    fresh = Adam(lr=0.01, steps=5, beta1=0.3).solve(problem, theta)
    assert fresh.moments is None and not torch.allclose(fresh.phi, ours.phi)
    with pytest.raises(ValueError, match="together"):
        Adam(m0=m)
