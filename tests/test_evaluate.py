"""The evaluation's record of the inner solve, against a second implementation of the proximal
problem (an nn.Module and torch.autograd, no imaml code)."""
import pytest
import torch
from torch import nn
from torch.nn.utils import vector_to_parameters

from imaml import IMAML, MAML, FunctionalModel, GradientDescent, Task
from imaml.evaluate import evaluate

LAM = 1.0


class ListSampler:
    """The sampler interface evaluate uses: .batch(indices).tasks()."""

    def __init__(self, tasks):
        self._tasks = tasks

    def batch(self, indices):
        picked = [self._tasks[i] for i in indices]
        return type("Batch", (), {"tasks": lambda self: picked})()


def setup(n_tasks=5):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(1)
    tasks = [Task(torch.randn(6, 4, generator=g, dtype=torch.float64), torch.arange(3).repeat(2),
                  torch.randn(9, 4, generator=g, dtype=torch.float64), torch.arange(3).repeat(3))
             for _ in range(n_tasks)]
    return net, FunctionalModel(net), tasks


def reference_grad_norms(net, theta, task, lr, steps):
    """‖∇G‖ at θ and after ``steps`` GD steps of ``lr`` on G(w) = CE + (λ/2)‖w − θ‖²."""
    def grad_G(w):
        w = w.detach().requires_grad_(True)
        vector_to_parameters(w, net.parameters())
        params = list(net.parameters())
        loss = nn.functional.cross_entropy(net(task.x_support), task.y_support)
        gs = torch.autograd.grad(loss, params)
        return torch.cat([g.reshape(-1) for g in gs]) + LAM * (w.detach() - theta)

    w, norms = theta.clone(), []
    for _ in range(steps):
        norms.append(float(grad_G(w).norm()))
        w = w - lr * grad_G(w)
    return norms[0], float(grad_G(w).norm())


def test_inner_grad_norms_match_a_second_implementation():
    net, fm, tasks = setup()
    theta = fm.theta().detach().clone()
    method = IMAML(lam=LAM, inner=GradientDescent(lr=0.1, steps=6))
    res = evaluate(method, fm, theta, ListSampler(tasks), num_tasks=5, batch_size=2, progress=False)
    ref = [reference_grad_norms(net, theta, t, 0.1, 6) for t in tasks]
    assert torch.allclose(torch.tensor(res.inner_start), torch.tensor([r[0] for r in ref]), rtol=1e-10)
    assert torch.allclose(torch.tensor(res.inner_end), torch.tensor([r[1] for r in ref]), rtol=1e-10)
    assert all(e < s for s, e in zip(res.inner_start, res.inner_end))
    assert res.inner_grew == 0 and res.inner_warning is None
    assert "0 of 5 tasks" in res.inner_summary()


def test_a_diverging_inner_solve_is_reported():
    # lr·λ = 3 > 2: the proximal term alone makes GD diverge, on every task
    net, fm, tasks = setup()
    theta = fm.theta().detach().clone()
    method = IMAML(lam=LAM, inner=GradientDescent(lr=3.0, steps=6))
    res = evaluate(method, fm, theta, ListSampler(tasks), num_tasks=5, progress=False)
    ref = [reference_grad_norms(net, theta, t, 3.0, 6) for t in tasks]
    assert torch.allclose(torch.tensor(res.inner_end), torch.tensor([r[1] for r in ref]), rtol=1e-8)
    assert res.inner_grew == 5
    assert "on 5 of 5 tasks" in res.inner_warning


def test_inner_stats_only_for_a_proximal_problem_or_on_request():
    _, fm, tasks = setup(2)
    theta = fm.theta()
    maml = MAML(inner=GradientDescent(lr=0.1, steps=2))
    res = evaluate(maml, fm, theta, ListSampler(tasks), num_tasks=2, progress=False)
    assert res.inner_end is None and res.inner_warning is None and res.inner_summary() is None
    res = evaluate(maml, fm, theta, ListSampler(tasks), num_tasks=2, progress=False, inner_stats=True)
    assert len(res.inner_end) == 2  # ‖∇L̂(φ)‖ for λ = 0
    imaml = IMAML(lam=LAM, inner=GradientDescent(lr=0.1, steps=2))
    res = evaluate(imaml, fm, theta, ListSampler(tasks), num_tasks=2, progress=False, inner_stats=False)
    assert res.inner_end is None


def test_regression_reports_the_query_loss_and_one_task_no_interval():
    from imaml.data import SinusoidTasks
    torch.manual_seed(0)
    fm = FunctionalModel(nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)),
                         loss_fn=nn.functional.mse_loss)
    method = IMAML(lam=LAM, inner=GradientDescent(lr=0.05, steps=4))
    tasks = SinusoidTasks(shots=5, queries=7, seed=3)
    res = evaluate(method, fm, fm.theta(), tasks, num_tasks=4, progress=False)
    assert res.metric == "loss" and res.accuracies == [] and res.num_tasks == 4
    # each task's loss, recomputed by hand: adapt, then the MSE on the query set
    for i, loss in enumerate(res.losses):
        t = tasks.sample(i)
        phi = method.adapt(fm, fm.theta(), t.x_support, t.y_support).phi
        assert loss == pytest.approx(float(((fm.forward(phi, t.x_query) - t.y_query) ** 2).mean()))
    assert res.mean == pytest.approx(sum(res.losses) / 4) and "query loss" in str(res)
    one = evaluate(method, fm, fm.theta(), tasks, num_tasks=1, progress=False)
    assert "one task: no confidence interval" in str(one)
