"""The vmapped batch path against the per-task loop (float64, so only summation order differs)."""
import pytest
import torch

from imaml import (FOMAML, IMAML, MAML, Adam, FunctionalModel, GradientDescent, Nesterov,
                   NewtonCG, Reptile, Task, TruncatedMAML, conv4)
from imaml.batched import batch_meta_gradient
from imaml.data.sampler import TaskBatch
from imaml.inner import Batch, run


def setup(B=4, seed=0):
    torch.manual_seed(seed)
    fm = FunctionalModel(conv4(1, 3, hidden=8, image_size=8).double())
    g = torch.Generator().manual_seed(seed)
    tb = TaskBatch(torch.randn(B, 6, 1, 8, 8, generator=g, dtype=torch.float64),
                   torch.arange(3).repeat(2).expand(B, -1),
                   torch.randn(B, 9, 1, 8, 8, generator=g, dtype=torch.float64),
                   torch.arange(3).repeat(3).expand(B, -1))
    return fm, fm.theta(), tb


def inner_states(method, fm, theta, tb):
    """The batch path's inner solves: one ``run`` on the batch's problems."""
    problems = Batch(lambda x, y: method.support_problem(fm, theta, x, y), tb.x_support, tb.y_support)
    return run(method.inner, problems, theta)


METHODS = [
    IMAML(inner=GradientDescent(lr=0.1, steps=5)),
    IMAML(inner=Nesterov(lr=0.1, momentum=0.5, steps=5)),
    IMAML(inner=GradientDescent(lr=0.1, steps=5), cg_max_iter=40, cg_rtol=1e-4),
    IMAML(inner=GradientDescent(lr=0.1, steps=5), curvature="ggn"),
    IMAML(inner=GradientDescent(lr=0.1, steps=5), hvp_mode="fwd-rev"),
    IMAML(inner=GradientDescent(lr=0.5, steps=6, adaptive=True, tol=0.05), linear_solver="minres"),
    IMAML(inner=Nesterov(lr=0.5, steps=6, adaptive=True, tol=0.05), cg_max_iter=8),
    IMAML(inner=GradientDescent(lr=0.5, steps=8, adaptive=True, tol=0.05, step_rule="bb"),
          linear_solver="minres"),
    MAML(inner=GradientDescent(lr=0.5, steps=3, adaptive=True)),
    MAML(inner=GradientDescent(lr=0.1, steps=3)),
    MAML(inner=GradientDescent(lr=0.1, steps=3), lam=1.0),
    FOMAML(inner=GradientDescent(lr=0.1, steps=3)),
    Reptile(inner=GradientDescent(lr=0.1, steps=3)),
    Reptile(inner=Adam(lr=0.01, steps=4, batch_size=4)),  # Reptile's inner loop: mini-batches
    IMAML(inner=NewtonCG(steps=3, cg_iters=4), linear_solver="minres"),  # iMAML-HF
    IMAML(inner=NewtonCG(steps=3, cg_iters=4), curvature="ggn"),  # the GGN configs' HF
    IMAML(inner=NewtonCG(steps=6, cg_iters=3, tol=0.05, damping=1.0), linear_solver="minres"),
    # every method batches, with every inner solver it accepts
    MAML(inner=Nesterov(lr=0.1, momentum=0.5, steps=3)),
    MAML(inner=GradientDescent(lr=0.5, steps=6, adaptive=True, tol=0.05)),
    TruncatedMAML(inner=GradientDescent(lr=0.1, steps=4), truncate=2),
    TruncatedMAML(inner=GradientDescent(lr=0.1, steps=3), truncate=0),
    FOMAML(inner=NewtonCG(steps=3, cg_iters=4), lam=1.0),
    FOMAML(inner=Nesterov(lr=0.1, momentum=0.5, steps=3)),
    Reptile(inner=Nesterov(lr=0.5, steps=6, adaptive=True, tol=0.05)),
]


@pytest.mark.parametrize("method", METHODS, ids=lambda m: f"{type(m).__name__}-{type(m.inner).__name__}")
def test_batched_equals_loop(method):
    fm, theta, tb = setup()
    r = batch_meta_gradient(method, fm, theta, tb)
    loop = [method.meta_gradient(fm, theta, t) for t in tb.tasks()]
    ref = torch.stack([x.grad for x in loop])
    # Adam divides by √v: where a gradient is rounding noise (the convolution biases, which
    # batch norm cancels) the two summation orders part by more than elsewhere
    tol = 1e-7 if isinstance(method.inner, Adam) else 1e-10
    assert float((r.grads - ref).norm() / ref.norm()) < tol
    close = dict(rtol=1e-10, atol=1e-12)  # float64: summation order only
    assert torch.allclose(r.query_loss, torch.tensor([x.query_loss for x in loop], dtype=torch.float64), **close)
    assert torch.equal(r.query_accuracy, torch.tensor([x.query_accuracy for x in loop], dtype=r.query_accuracy.dtype))
    assert float((r.grad - ref.mean(0)).norm() / ref.mean(0).norm()) < tol
    # the diagnostics agree with the per-task results too
    assert r.inner_converged.tolist() == [x.inner.converged for x in loop]
    norms = [float("nan") if x.inner.grad_norm is None else x.inner.grad_norm for x in loop]
    if isinstance(method, IMAML) and method.inner.tol > 0:
        assert torch.allclose(r.inner_grad_norm, torch.tensor(norms, dtype=torch.float64), **close)
    for x, steps in zip(loop, r.inner_steps.tolist()):
        assert x.inner.steps == steps
    if isinstance(method, IMAML):
        assert r.negative_curvature.tolist() == [x.cg.negative_curvature for x in loop]
        rel = [x.cg.residual / x.cg.residual_norms[0] for x in loop]
        assert torch.allclose(r.cg_residual, torch.tensor(rel, dtype=torch.float64), rtol=1e-8)


@pytest.mark.parametrize("inner_cls", [GradientDescent, Nesterov])
def test_tolerance_masking_matches_early_stopping(inner_cls):
    fm, theta, tb = setup(B=6, seed=3)
    kw = {"momentum": 0.3} if inner_cls is Nesterov else {}
    # a tolerance that some tasks meet within the 10-step budget and others do not
    probe = IMAML(lam=2.0, inner=inner_cls(lr=0.1, steps=10, **kw))
    first = [min(probe.adapt(fm, theta, t.x_support, t.y_support).grad_norms) for t in tb.tasks()]
    tol = sorted(first)[len(first) // 2] * 1.0001 / 2.0
    method = IMAML(lam=2.0, inner=inner_cls(lr=0.1, steps=10, tol=tol, **kw))
    loop = [method.meta_gradient(fm, theta, t) for t in tb.tasks()]
    stopped_early = [x.inner.steps < 10 for x in loop]
    assert any(stopped_early) and not all(stopped_early)
    r = batch_meta_gradient(method, fm, theta, tb)
    ref = torch.stack([x.grad for x in loop])
    assert float((r.grads - ref).norm() / ref.norm()) < 1e-9


def test_cg_masking_reports_negative_curvature():
    fm, theta, tb = setup(B=3, seed=1)
    method = IMAML(lam=0.01, inner=GradientDescent(lr=0.1, steps=3), cg_max_iter=30)
    r = batch_meta_gradient(method, fm, theta, tb)
    loop = [method.meta_gradient(fm, theta, t) for t in tb.tasks()]
    assert [x.cg.negative_curvature for x in loop] == r.negative_curvature.tolist()
    assert any(x.cg.negative_curvature for x in loop)
    assert torch.isfinite(r.grads).all()
    ref = torch.stack([x.grad for x in loop])
    assert float((r.grads - ref).norm() / ref.norm()) < 1e-8


def test_loop_path_equals_vmap_path():
    """``vectorised=False`` (the trainer's batching 'loop') gives the same per-task figures."""
    fm, theta, tb = setup()
    for method in (METHODS[5], METHODS[8], METHODS[11]):  # iMAML, MAML, FOMAML
        r, loop = (batch_meta_gradient(method, fm, theta, tb, vectorised=v) for v in (True, False))
        for a, b in zip(r.__dict__.values(), loop.__dict__.values()):
            assert (a is None) == (b is None)
            if a is not None and a.is_floating_point():  # (norms: NaN where not evaluated)
                a, b = a.nan_to_num(), b.nan_to_num()
                assert float((a - b).norm()) <= 1e-9 * float(b.norm()), method
            elif a is not None:
                assert torch.equal(a, b), method


def test_batched_newton_cg_equals_each_task_solve():
    """Each task of the vmapped Newton-CG keeps its own line search, damping and stopping: on
    tasks that stop at different steps, for different reasons, every count equals its solve."""
    fm, theta, tb = setup(B=5, seed=6)
    reasons = []
    for inner in (NewtonCG(steps=12, cg_iters=3, tol=0.4, damping=1.0),
                  NewtonCG(steps=12, cg_iters=3, tol=0.02, max_backtracks=2, warm_start=False)):
        method = IMAML(lam=2.0, inner=inner)
        loop = [inner.solve(method.problem(fm, theta, t), theta) for t in tb.tasks()]
        s, _ = inner_states(method, fm, theta, tb)
        assert torch.allclose(s.phi, torch.stack([r.phi for r in loop]), rtol=1e-9, atol=1e-12)
        assert s.converged.tolist() == [r.converged for r in loop]
        assert s.steps.tolist() == [r.steps for r in loop]
        assert torch.allclose(s.grad_norm, torch.tensor([r.grad_norm for r in loop],
                                                        dtype=torch.float64), rtol=1e-8)
        assert len({r.steps for r in loop}) > 1  # the tasks stopped at different steps
        reasons += [r.stop_reason for r in loop]
    assert set(reasons) == {"tolerance", "step_cap", "line_search"}


def test_per_parameter_lambda_batched_equals_loop():
    """A tensor λ (what learn_lam trains): the vmapped meta-gradients and ∂L_test/∂λ equal the
    per-task path and the implicit layer's autograd backward (``implicit_solution``)."""
    fm, theta, tb = setup(B=3, seed=4)
    lam = 0.5 + torch.rand(theta.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    method = IMAML(lam=lam, inner=GradientDescent(lr=0.3, steps=6, adaptive=True, tol=0.05),
                   linear_solver="minres", cg_max_iter=6)
    r = batch_meta_gradient(method, fm, theta, tb)
    loop = [method.meta_gradient(fm, theta, t) for t in tb.tasks()]
    assert float((r.grads - torch.stack([x.grad for x in loop])).norm()) < 1e-9 * float(r.grads.norm())
    ref = torch.stack([x.lam_grad for x in loop])
    assert ref.shape == r.lam_grads.shape == (3, theta.numel())
    assert float((r.lam_grads - ref).norm() / ref.norm()) < 1e-9
    from imaml import implicit_solution
    moved = 0
    for i, t in enumerate(tb.tasks()):
        th, la = theta.clone().requires_grad_(True), lam.clone().requires_grad_(True)
        phi = implicit_solution(fm, th, la, t.x_support, t.y_support, method.inner,
                                linear_solver="minres", max_iter=6)
        gt, gl = torch.autograd.grad(fm.loss(phi, t.x_query, t.y_query), (th, la))
        assert float((gt - r.grads[i]).norm()) < 1e-9 * float(gt.norm())
        # (∂L/∂λ = −(φ − θ) w is 0 where the inner solve met its tolerance at θ: then 0 on both)
        assert float((gl - r.lam_grads[i]).norm()) <= 1e-9 * float(gl.norm())
        moved += bool(gl.any())
    assert moved >= 2


def test_batched_adaptive_solve_leaves_once_every_task_has_converged():
    fm, theta, tb = setup(B=4, seed=5)
    # (a ReLU network on random images: ‖∇G‖ stalls near its kinks, so a loose δ)
    method = IMAML(inner=GradientDescent(lr=0.3, steps=200, adaptive=True, tol=0.5,
                                         step_rule="bb"), linear_solver="minres")
    states, history = inner_states(method, fm, theta, tb)
    loop = [method.inner.solve(method.problem(fm, theta, t), theta) for t in tb.tasks()]
    assert all(r.converged for r in loop) and bool(states.converged.all())
    # the batch stopped at the slowest task's last iteration, not at the step cap of 200
    assert history.shape[1] == 1 + max(r.steps + r.rejected for r in loop) < 201
    assert torch.allclose(states.phi, torch.stack([r.phi for r in loop]), rtol=1e-9, atol=1e-12)


def test_batched_carried_adam_moments_equal_the_loop():
    """Reptile with Adam moments carried over (config inner_carry): the vmapped meta-gradients
    and each task's final moments equal the per-task solves."""
    fm, theta, tb = setup(B=3, seed=7)
    g = torch.Generator().manual_seed(1)
    m, v = 0.01 * torch.randn(2, theta.numel(), generator=g, dtype=torch.float64)
    inner = Adam(lr=0.01, steps=4, batch_size=4, carry=True).with_moments(m, v.abs(), 12)
    method = Reptile(inner=inner)
    r = batch_meta_gradient(method, fm, theta, tb)
    loop = [method.meta_gradient(fm, theta, t) for t in tb.tasks()]
    ref = torch.stack([x.grad for x in loop])
    assert float((r.grads - ref).norm() / ref.norm()) < 1e-7
    moments = torch.stack([x.inner.moments for x in loop])
    assert r.inner_moments.shape == (3, 2, theta.numel())
    assert torch.allclose(r.inner_moments, moments, rtol=1e-9, atol=1e-15)


def test_batched_accuracy_is_none_where_the_loop_has_none():
    """Integer labels but outputs that are not class scores [n, classes] (here [n, 3, 2]): the
    per-task path reports no accuracy, and so does the batched one, with the same gradients."""
    from torch import nn
    from torch.nn.functional import cross_entropy
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 6), nn.Unflatten(1, (3, 2))).double()
    fm = FunctionalModel(net, loss_fn=lambda out, y: cross_entropy(out.sum(-1), y))
    _, _, tb = setup()
    method = IMAML(inner=GradientDescent(lr=0.1, steps=3))
    r = batch_meta_gradient(method, fm, fm.theta(), tb)
    loop = [method.meta_gradient(fm, fm.theta(), t) for t in tb.tasks()]
    assert r.query_accuracy is None and all(x.query_accuracy is None for x in loop)
    ref = torch.stack([x.grad for x in loop])
    assert float((r.grads - ref).norm() / ref.norm()) < 1e-10


def test_batched_fixed_step_solve_leaves_once_every_task_has_converged():
    """Fixed steps with a tolerance: the batch's ``run`` ends at the slowest task's last step,
    not at the step cap, and every task's φ, steps and ‖∇G‖ history equal its own solve."""
    fm, theta, tb = setup(B=4, seed=5)
    method = IMAML(inner=GradientDescent(lr=0.1, steps=300, tol=0.5))
    states, history = inner_states(method, fm, theta, tb)
    loop = [method.inner.solve(method.problem(fm, theta, t), theta) for t in tb.tasks()]
    assert all(r.converged for r in loop) and bool(states.converged.all())
    assert len({r.steps for r in loop}) > 1
    assert history.shape[1] == max(len(r.grad_norms) for r in loop) < 300
    assert states.steps.tolist() == [r.steps for r in loop]
    for i, r in enumerate(loop):
        assert torch.allclose(history[i, :len(r.grad_norms)],
                              torch.tensor(r.grad_norms, dtype=torch.float64), rtol=1e-9)
    assert torch.allclose(states.phi, torch.stack([r.phi for r in loop]), rtol=1e-9, atol=1e-12)


def test_a_solver_written_outside_the_library_serves_every_path():
    """CONTRIBUTING's recipe for an inner solver, followed outside ``imaml.inner``: a heavy-ball
    (Polyak momentum) solver is taken by IMAML and MAML, batches (vmapped = loop), and solved
    tightly gives iMAML the meta-gradient that gradient descent solved tightly gives."""
    from dataclasses import dataclass
    from typing import NamedTuple
    from imaml.inner import _Solver, _flags, _norm

    class HeavyBallState(NamedTuple):
        phi: torch.Tensor
        grad_norm: torch.Tensor
        converged: torch.Tensor
        steps: torch.Tensor
        rejected: torch.Tensor
        velocity: torch.Tensor

    @dataclass
    class HeavyBall(_Solver):
        lr: float = 0.1
        beta: float = 0.5
        steps: int = 10
        tol: float = 0.0
        report: bool = False

        def init(self, problem, phi0):
            no, zero, nan = _flags(phi0)
            return HeavyBallState(phi0, nan, no, zero, zero, torch.zeros_like(phi0))

        def step(self, problem, s, k, last):
            g = problem.grad(s.phi)
            n = _norm(g)
            done = s.converged | self._met(problem, g, n)
            v = self.beta * s.velocity - self.lr * g
            return s._replace(phi=torch.where(done, s.phi, s.phi + v),
                              velocity=torch.where(done, s.velocity, v),
                              grad_norm=torch.where(done, n, s.grad_norm), converged=done,
                              steps=s.steps + (~done).long()), n

    fm, theta, tb = setup()
    for method in (IMAML(inner=HeavyBall(steps=6), linear_solver="minres"),
                   IMAML(inner=HeavyBall(steps=8, tol=0.05)), MAML(inner=HeavyBall(steps=3)),
                   FOMAML(inner=HeavyBall(steps=3))):
        r = batch_meta_gradient(method, fm, theta, tb)
        ref = torch.stack([method.meta_gradient(fm, theta, t).grad for t in tb.tasks()])
        assert float((r.grads - ref).norm() / ref.norm()) < 1e-10
    # solved tightly, on a small network, both solvers give iMAML the same meta-gradient
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    small = FunctionalModel(net)
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.arange(3).repeat(4)
    task = Task(x[:6], y[:6], x[6:], y[6:])
    tight = dict(linear_solver="minres", cg_max_iter=200, cg_rtol=1e-13)
    hb = IMAML(inner=HeavyBall(lr=0.2, steps=2000, tol=1e-10), **tight).meta_gradient(
        small, small.theta(), task)
    gd = IMAML(inner=GradientDescent(lr=0.2, steps=4000, tol=1e-10), **tight).meta_gradient(
        small, small.theta(), task)
    assert hb.inner.converged and gd.inner.converged
    assert float((hb.grad - gd.grad).norm() / gd.grad.norm()) < 1e-8
