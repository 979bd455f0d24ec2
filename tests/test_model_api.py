"""The model API: adapting part of a network (ANIL), models with several inputs, parameters as
dicts. Checked against central finite differences and against an equivalent single-input model."""
import pytest
import torch
from torch import nn

from imaml import (FOMAML, IMAML, MAML, FunctionalModel, GradientDescent, NewtonCG, Reptile, Task,
                   TaskBatch, TruncatedMAML, implicit_solution)
from imaml.batched import batch_meta_gradient
from imaml.registry import adapt_names

LAM = 2.0


def rel(a, b):
    return float((a - b).norm() / b.norm())


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def make_task(seed=1, n_support=9, n_query=12):
    g = torch.Generator().manual_seed(seed)
    return Task(torch.randn(n_support, 4, generator=g, dtype=torch.float64),
                torch.arange(3).repeat(n_support // 3),
                torch.randn(n_query, 4, generator=g, dtype=torch.float64),
                torch.arange(3).repeat(n_query // 3))


def exact_imaml():
    # the inner problem solved to ‖∇G‖ ≤ 2e-12 and the linear system to rounding
    return IMAML(lam=LAM, inner=NewtonCG(steps=100, cg_iters=30, tol=1e-12), cg_max_iter=100,
                 cg_rtol=1e-14, linear_solver="minres")


def finite_differences(fm, theta, task, method, eps=1e-5):
    def outer(th):
        phi = method.adapt(fm, th, task.x_support, task.y_support).phi
        return float(fm.loss(phi, task.x_query, task.y_query))
    e = torch.eye(theta.numel(), dtype=theta.dtype)
    return torch.tensor([(outer(theta + eps * ei) - outer(theta - eps * ei)) / (2 * eps)
                         for ei in e], dtype=theta.dtype)


def test_adapt_mask_names_the_head_and_rejects_unknown_names():
    fm = FunctionalModel(mlp(), adapt=["2."])
    assert fm.adapted_names() == ["2.weight", "2.bias"]
    assert float(fm.adapt_mask.sum()) == 8 * 3 + 3 and fm.adapt_mask.shape == (fm.num_params,)
    assert FunctionalModel(mlp(), adapt=["2.bias", "0"]).adapted_names() == ["0.weight", "0.bias", "2.bias"]
    with pytest.raises(ValueError, match=r"adapt names no parameter.*'head'.*0.weight"):
        FunctionalModel(mlp(), adapt=["head"])
    assert adapt_names({"adapt": "13., 12."}) == ["13.", "12."] and adapt_names({}) is None


@pytest.mark.slow
def test_anil_meta_gradient_matches_finite_differences_and_keeps_the_body():
    """Head adapted, body meta-only: ∂/∂θ_body = v_b − H_bh w_h (one more Hessian product)
    against central differences of θ -> L_test(φ*(θ)) over every coordinate."""
    fm, task = FunctionalModel(mlp(), adapt=["2."]), make_task()
    theta = fm.theta()
    method = exact_imaml()
    r = method.meta_gradient(fm, theta, task)
    assert r.inner.converged and r.cg.converged
    body = fm.adapt_mask == 0
    assert torch.equal(r.phi[body], theta[body])  # the body is never moved
    assert not torch.equal(r.phi[~body], theta[~body])
    fd = finite_differences(fm, theta, task, method)
    assert rel(r.grad, fd) < 1e-6
    assert rel(r.grad[body], fd[body]) < 1e-6 and float(fd[body].norm()) > 1e-3
    # leaving out the body's implicit term (first-order in the body) is measurably wrong
    v = torch.func.grad(lambda p: fm.loss(p, task.x_query, task.y_query))(r.phi)
    assert rel(v[body], fd[body]) > 1e-2


def test_anil_maml_matches_finite_differences():
    fm, task = FunctionalModel(mlp(1), adapt=["2."]), make_task(3)
    theta = fm.theta()
    method = MAML(inner=GradientDescent(lr=0.3, steps=4))
    r = method.meta_gradient(fm, theta, task)
    assert rel(r.grad, finite_differences(fm, theta, task, method, eps=1e-6)) < 1e-6


@pytest.mark.parametrize("method", [
    IMAML(inner=GradientDescent(lr=0.3, steps=6, adaptive=True, tol=0.05, step_rule="bb"),
          linear_solver="minres"),
    IMAML(inner=GradientDescent(lr=0.3, steps=6), cg_max_iter=8),
    MAML(inner=GradientDescent(lr=0.3, steps=3)),
    FOMAML(inner=GradientDescent(lr=0.3, steps=3)),
], ids=lambda m: type(m).__name__)
def test_anil_batched_equals_loop(method):
    fm = FunctionalModel(mlp(2), adapt=["2."])
    tasks = [make_task(s) for s in range(3)]
    tb = TaskBatch(*(torch.stack([getattr(t, k) for t in tasks])
                     for k in ("x_support", "y_support", "x_query", "y_query")))
    r = batch_meta_gradient(method, fm, fm.theta(), tb)
    ref = torch.stack([method.meta_gradient(fm, fm.theta(), t).grad for t in tasks])
    assert rel(r.grads, ref) < 1e-9


class TwoInputs(nn.Module):
    """A model of two inputs (positional or keyword): the MLP on their concatenation."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, a, b):
        return self.net(torch.cat([a, b], -1))


def split_task(task, as_dict):
    def split(x):
        return {"a": x[..., :1], "b": x[..., 1:]} if as_dict else (x[..., :1], x[..., 1:])
    return Task(split(task.x_support), task.y_support, split(task.x_query), task.y_query)


@pytest.mark.parametrize("as_dict", [False, True], ids=["tuple", "dict"])
def test_two_input_model_equals_the_single_input_model(as_dict):
    net = mlp(4)
    one, two = FunctionalModel(net), FunctionalModel(TwoInputs(net))
    task = make_task(5)
    method = IMAML(lam=LAM, inner=GradientDescent(lr=0.3, steps=10), cg_max_iter=10)
    a = method.meta_gradient(one, one.theta(), task)
    b = method.meta_gradient(two, two.theta(), split_task(task, as_dict))
    assert torch.allclose(a.grad, b.grad, rtol=1e-12, atol=1e-14)
    assert a.query_loss == pytest.approx(b.query_loss, rel=1e-12)
    # and the vmapped path takes tuple and dict inputs too
    tasks = [split_task(make_task(s), as_dict) for s in (6, 7)]
    stack = (lambda xs: {k: torch.stack([x[k] for x in xs]) for k in xs[0]}) if as_dict else \
        (lambda xs: tuple(torch.stack(parts) for parts in zip(*xs)))
    tb = TaskBatch(stack([t.x_support for t in tasks]), torch.stack([t.y_support for t in tasks]),
                   stack([t.x_query for t in tasks]), torch.stack([t.y_query for t in tasks]))
    assert len(tb) == 2 and isinstance(tb[1].x_support, dict if as_dict else tuple)
    r = batch_meta_gradient(method, two, two.theta(), tb)
    ref = torch.stack([method.meta_gradient(two, two.theta(), t).grad for t in tasks])
    assert rel(r.grads, ref) < 1e-9


def test_task_rejects_inputs_that_disagree_on_the_number_of_examples():
    x = (torch.zeros(6, 1), torch.zeros(5, 3))
    with pytest.raises(ValueError, match=r"support set disagree.*\[5, 6\]"):
        Task(x, torch.zeros(6), (torch.zeros(2, 1), torch.zeros(2, 3)), torch.zeros(2))


def test_implicit_layer_takes_and_returns_parameter_dicts():
    fm, task = FunctionalModel(mlp(6)), make_task(8)
    inner = GradientDescent(lr=0.3, steps=20)
    flat = fm.theta().requires_grad_(True)
    params = {n: t.detach().clone().requires_grad_(True) for n, t in fm.unflatten(fm.theta()).items()}
    phi_flat = implicit_solution(fm, flat, LAM, task.x_support, task.y_support, inner)
    phi_dict = implicit_solution(fm, params, LAM, task.x_support, task.y_support, inner)
    assert isinstance(phi_dict, dict) and list(phi_dict) == fm.names
    assert torch.equal(fm.flatten(phi_dict), phi_flat)
    fm.loss(phi_flat, task.x_query, task.y_query).backward()
    fm.loss(fm.flatten(phi_dict), task.x_query, task.y_query).backward()
    assert torch.allclose(fm.flatten({n: p.grad for n, p in params.items()}), flat.grad,
                          rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("method", [
    IMAML(inner=GradientDescent(lr=0.3, steps=5)), MAML(inner=GradientDescent(lr=0.3, steps=3)),
    FOMAML(inner=GradientDescent(lr=0.3, steps=3)), Reptile(inner=GradientDescent(lr=0.3, steps=3)),
    TruncatedMAML(inner=GradientDescent(lr=0.3, steps=4), truncate=2),
], ids=lambda m: type(m).__name__)
def test_methods_take_theta_as_a_parameter_dict(method):
    fm, task = FunctionalModel(mlp(9)), make_task(10)
    flat = method.meta_gradient(fm, fm.theta(), task)
    as_dict = method.meta_gradient(fm, fm.unflatten(fm.theta()), task)
    assert torch.equal(flat.grad, as_dict.grad) and torch.equal(flat.phi, as_dict.phi)
    assert set(fm.unflatten(as_dict.grad)) == set(fm.names)


# -- arguments checked at the call, naming the argument (issue 24) ------------------------------

def test_api_arguments_are_checked_at_the_call_naming_the_argument():
    import numpy as np
    from imaml import meta_step
    fm = FunctionalModel(mlp())
    task = make_task()
    x, y = task.x_support, task.y_support
    cases = [
        (lambda: IMAML(lam=None), TypeError, "lam must be a number, got NoneType"),
        (lambda: IMAML(lam=float("inf")), ValueError, "lam must be > 0 and finite"),
        (lambda: GradientDescent(steps="5"), TypeError, "steps must be a whole number.*str '5'"),
        (lambda: GradientDescent(tol=float("inf")), ValueError, "tol must be >= 0 and finite"),
        (lambda: IMAML(cg_max_iter=2.5), TypeError, "cg_max_iter must be a whole number"),
        (lambda: IMAML(inner=None), TypeError, "inner must be an imaml inner solver"),
        (lambda: MAML(inner=torch.optim.SGD), TypeError, "inner must be.*a class, not an instance"),
        (lambda: FunctionalModel(mlp(), loss_fn=None), TypeError, "loss_fn must be a function"),
        (lambda: FunctionalModel("net"), TypeError, "module must be a torch.nn.Module"),
        (lambda: IMAML().meta_gradient(fm, fm.theta().tolist(), task), TypeError,
         "theta must be a flat tensor.*got list.*torch.as_tensor"),
        (lambda: FOMAML().meta_gradient(fm, fm.theta().numpy(), task), TypeError,
         "theta must be a flat tensor.*got ndarray"),
        (lambda: Reptile().meta_gradient(fm, fm.theta(), (x, y, x, y)), TypeError,
         "task must be an imaml.Task"),
        (lambda: Task(x, y.numpy(), x, y), TypeError, "targets of the support set must be a torch"),
        (lambda: Task(x, y, np.asarray(x), y), TypeError, "inputs of the query set must be torch"),
        (lambda: Task(x[:0], y[:0], x, y), ValueError, "the support set is empty"),
        (lambda: Task(x, y, x[:0], y[:0]), ValueError, "the query set is empty"),
        (lambda: meta_step(FOMAML(), fm, torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1),
                           [task]), ValueError, "optimizer does not step 4 of the 4 parameter"),
    ]
    for call, kind, message in cases:
        with pytest.raises(kind, match=message):
            call()


def test_a_loss_that_cannot_give_a_meta_gradient_is_named():
    net = mlp()
    task = make_task()
    for loss_fn, kind, message in (
            (lambda out, y: 1.0, TypeError, "loss_fn must return a torch tensor.*float"),
            (lambda out, y: nn.functional.cross_entropy(out, y, reduction="none"), ValueError,
             r"loss_fn must return a single value.*shape \(9,\)")):
        with pytest.raises(kind, match=message):
            FOMAML().meta_gradient(FunctionalModel(net, loss_fn=loss_fn),
                                   FunctionalModel(net).theta(), task)
    # regression targets [N] against outputs [N, 1]: torch would broadcast them to [N, N]
    reg = FunctionalModel(nn.Linear(4, 1).double(), loss_fn=nn.functional.mse_loss)
    yr = torch.randn(9, dtype=torch.float64)
    bad = Task(task.x_support, yr, task.x_support, yr)
    with pytest.raises(ValueError, match=r"targets of shape \(9,\) against outputs of shape "
                                         r"\(9, 1\) would be broadcast to \(9, 9\)"):
        IMAML().meta_gradient(reg, reg.theta(), bad)
    good = Task(task.x_support, yr[:, None], task.x_support, yr[:, None])
    assert torch.isfinite(IMAML().meta_gradient(reg, reg.theta(), good).grad).all()


def test_a_loaded_model_refuses_a_support_set_of_fewer_classes_than_its_ways(tmp_path):
    """A 5-way model adapted on 3 classes would still predict among 5: refused, naming why."""
    import numpy as np
    from imaml.checkpoint import MetaModel, build_network, save_checkpoint
    save_checkpoint(tmp_path / "m.pt", build_network("omniglot", 5), dataset="omniglot", ways=5,
                    shots=1, queries=1, method={"name": "imaml-gd", "inner_steps": 1})
    mm = MetaModel.load(tmp_path / "m.pt")
    x = torch.rand(5, 1, 28, 28)
    with pytest.raises(ValueError, match=r"labels 0..4 of this 5-way model.*\[0, 1, 2\]"):
        mm.predict(x[:3], torch.arange(3), x)
    with pytest.raises(TypeError, match="x_query must be a torch.Tensor, got ndarray"):
        mm.predict(x, torch.arange(5), np.zeros((2, 1, 28, 28)))
    with pytest.raises(ValueError, match=r"x_query has shape \(5, 1, 32, 32\); this omniglot "
                                         r"network takes images \[N, 1, 28, 28\]"):
        mm.predict(x, torch.arange(5), torch.rand(5, 1, 32, 32))
    assert mm.predict(x, torch.arange(5), x).shape == (5,)
